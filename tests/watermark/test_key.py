"""The watermark key: deterministic triggers, independent uniform labels, a secret file."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from modelshield.core.errors import DataError, InvalidConfigError
from modelshield.watermark import WatermarkKey, staged_key_file
from modelshield.watermark import key as key_mod

# Pinned: the same key must give these bytes on every machine and library version.
GOLDEN = {
    "noise": (
        "9f492b21c997fb7a80c28ec7345e8ace35319fc293be224fd5b2ec92abcbaf84",
        "61ca1ca361df71b092bbfaf56b97761115694ae544a5ded4a09aa9750f1a5c3f",
    ),
    "patterns": (
        "69200175af91dc3c03c672377bf0b182b2acf12300ce16ee2bc9aced774152ec",
        "7d52fb825dbb52419c7c6d5e76851a4f1c20f617c888789c20a2c157bb78ef39",
    ),
}
GOLDEN_LABELS = [8, 8, 0, 9, 2, 3, 5, 8, 5, 0, 0, 7, 5, 7, 1, 2, 8, 8, 3, 8]


def _key(kind: str = "noise", **kw: object) -> WatermarkKey:
    args: dict = {"seed": 12345, "n": 100, "input_shape": (1, 8, 8), "num_classes": 10}
    args.update(kw)
    return WatermarkKey(kind=kind, **args)


@pytest.mark.parametrize("kind", ["noise", "patterns"])
def test_same_key_gives_byte_identical_triggers(kind: str) -> None:
    k = _key(kind)
    x1, y1 = k.trigger_set()
    again = WatermarkKey.from_dict(json.loads(k.to_json()))
    x2, y2 = again.trigger_set()
    assert x1.dtype == torch.float32 and x1.shape == (100, 1, 8, 8)
    assert x1.numpy().tobytes() == x2.numpy().tobytes()
    assert torch.equal(y1, y2)
    levels, floats = GOLDEN[kind]
    assert hashlib.sha256(k.trigger_levels().tobytes()).hexdigest() == levels
    assert hashlib.sha256(x1.numpy().astype("<f4").tobytes()).hexdigest() == floats
    assert y1[:20].tolist() == GOLDEN_LABELS


def test_different_seeds_give_different_triggers_and_labels() -> None:
    a, b = _key(), _key(seed=12346)
    assert not torch.equal(a.triggers(), b.triggers())
    assert not torch.equal(a.labels(), b.labels())
    assert a.key_id != b.key_id


def test_labels_do_not_depend_on_the_inputs() -> None:
    """Labels come from their own stream: the trigger kind and bounds do not change them."""
    base = _key("noise").labels()
    assert torch.equal(_key("patterns").labels(), base)
    assert torch.equal(_key(bounds=(-1.0, 1.0)).labels(), base)
    assert torch.equal(_key(input_shape=(3, 4, 4)).labels(), base)


def test_labels_are_uniform() -> None:
    from scipy.stats import chisquare

    labels = torch.cat([_key(seed=s, n=200).labels() for s in range(100)])
    counts = torch.bincount(labels, minlength=10).numpy()
    assert chisquare(counts).pvalue > 1e-3
    odd = torch.cat([_key(seed=s, num_classes=7, n=200).labels() for s in range(50)])
    assert int(odd.max()) == 6 and chisquare(torch.bincount(odd).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("kind", ["noise", "patterns"])
def test_triggers_lie_on_the_level_grid_within_bounds(kind: str) -> None:
    k = _key(kind, bounds=(-1.0, 2.0), input_shape=(3, 6, 5))
    x = k.triggers().double()
    assert float(x.min()) >= -1.0 and float(x.max()) <= 2.0
    levels = torch.from_numpy(k.trigger_levels()).double()
    assert torch.allclose(x, -1.0 + levels * 3.0 / 255.0, atol=1e-6)
    assert len(torch.unique(k.triggers().flatten(1), dim=0)) == k.n  # all distinct


def test_noise_on_tabular_shapes_and_patterns_need_images() -> None:
    k = WatermarkKey.generate(input_shape=(13,), num_classes=3, n=10, seed=1)
    assert k.kind == "noise" and k.triggers().shape == (10, 13)
    with pytest.raises(InvalidConfigError, match="patterns"):
        WatermarkKey.generate(input_shape=(13,), num_classes=3, kind="patterns", seed=1)


def test_generate_draws_the_secret_from_the_os(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    np.random.seed(0)
    a = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=10)
    torch.manual_seed(0)
    np.random.seed(0)
    b = WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=10)
    assert a.seed != b.seed  # not from the global seed
    assert 0 <= a.seed < 2**128
    calls = []
    monkeypatch.setattr(key_mod.secrets, "randbits", lambda k: calls.append(k) or 42)
    assert WatermarkKey.generate(input_shape=(1, 8, 8), num_classes=10).seed == 42
    assert calls == [128]
    assert WatermarkKey.generate(input_shape=(4,), num_classes=2, seed=7).seed == 7


def test_save_load_round_trip_private_file(tmp_path: Path) -> None:
    k = _key().with_model("ab" * 32)
    path = k.save(tmp_path / "keys" / "key.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    d = json.loads(path.read_text())
    for field in ("version", "seed", "n", "input_shape", "bounds", "num_classes", "kind"):
        assert field in d
    assert d["model_sha256"] == "ab" * 32 and "created" in d
    back = WatermarkKey.load(path)
    assert back == k and back.seed == 12345
    assert torch.equal(back.triggers(), k.triggers())
    assert os.listdir(path.parent) == ["key.json"]  # no temporary files left


def test_existing_key_is_never_overwritten_silently(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    _key().save(path)
    with pytest.raises(InvalidConfigError, match="already exists"):
        _key(seed=1).save(path)
    assert WatermarkKey.load(path).seed == 12345
    _key(seed=1).save(path, overwrite=True)
    assert WatermarkKey.load(path).seed == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_staged_key_is_discarded_when_the_block_fails(tmp_path: Path) -> None:
    path = tmp_path / "key.json"
    with pytest.raises(RuntimeError), staged_key_file(_key(), path):
        assert len(list(tmp_path.iterdir())) == 1  # the private temporary file
        raise RuntimeError("writing the model failed")
    assert list(tmp_path.iterdir()) == []
    with staged_key_file(_key(), path) as commit:
        path.write_text("{}")  # someone else wrote the key meanwhile
        with pytest.raises(InvalidConfigError, match="already exists"):
            commit()
    assert path.read_text() == "{}" and len(list(tmp_path.iterdir())) == 1


def test_public_dict_never_shows_the_seed() -> None:
    k = _key(seed=2**127 + 12345)
    pub = json.dumps(k.public_dict())
    assert "seed" not in pub and f"{k.seed:032x}" not in pub and str(k.seed) not in pub
    assert k.public_dict()["key_id"] == k.key_id and len(k.key_id) == 16
    assert "seed" not in repr(k) and str(k.seed) not in repr(k)


def test_malformed_key_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        WatermarkKey.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not JSON"):
        WatermarkKey.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not a modelshield watermark key"):
        WatermarkKey.load(bad)
    d = _key().to_dict()
    del d["seed"]
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="missing field"):
        WatermarkKey.load(bad)
    d = _key().to_dict() | {"num_classes": 1}
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="num_classes"):
        WatermarkKey.load(bad)
    d = _key().to_dict() | {"version": 99}
    bad.write_text(json.dumps(d))
    with pytest.raises(DataError, match="version"):
        WatermarkKey.load(bad)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"n": 0}, "n "),
        ({"num_classes": 1}, "num_classes"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**128}, "seed"),
        ({"input_shape": ()}, "input_shape"),
        ({"bounds": (1.0, 0.0)}, "bounds"),
        ({"kind": "blobs"}, "kind"),
    ],
)
def test_invalid_keys(kw: dict, match: str) -> None:
    with pytest.raises(InvalidConfigError, match=match):
        _key(**kw)
