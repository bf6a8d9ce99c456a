"""`modelshield watermark embed` → `watermark verify`, over a model file and over HTTP."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from modelshield.core.data import load_dataset
from modelshield.core.loading import load_model
from modelshield.report import load_schema
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, Run, run_cli


def wm(*args: str) -> Run:
    """``modelshield watermark ARGS`` through the real command."""
    return run_cli("watermark", *args)


@dataclass
class Embedded:
    root: Path
    out: Path
    key: Path
    train: Path
    test: Path
    stdout: str


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Embedded:
    """A digits MLP trained from scratch with a new watermark, through the real command."""
    root = tmp_path_factory.mktemp("wm-cli")
    train, test = load_dataset("digits").split(0.75, seed=0)
    train.to_npz(root / "train.npz")
    test.to_npz(root / "test.npz")
    out, key = root / "marked", root / "secret" / "key.json"
    r = wm(
        "embed",
        "--arch",
        "mlp",
        "--train-data",
        str(root / "train.npz"),
        "--data",
        str(root / "test.npz"),
        "--key",
        str(key),
        "--out",
        str(out),
        "--epochs",
        "15",
    )
    assert r.returncode == 0, r.stderr
    return Embedded(root, out, key, root / "train.npz", root / "test.npz", r.stdout)


def _seed_hex(key: Path) -> str:
    return str(json.loads(key.read_text())["seed"])


def test_embed_writes_model_key_and_report(embedded: Embedded) -> None:
    assert "verified" in embedded.stdout and str(embedded.key) in embedded.stdout
    assert stat.S_IMODE(embedded.key.stat().st_mode) == 0o600
    key = json.loads(embedded.key.read_text())
    pt2 = embedded.out / "model.pt2"
    assert key["model_sha256"] == hashlib.sha256(pt2.read_bytes()).hexdigest()
    assert key["n"] == 100 and key["num_classes"] == 10 and key["input_shape"] == [1, 8, 8]
    res = json.loads((embedded.out / "result.json").read_text())
    assert res["verified"] and res["p_value"] < 1e-6 and res["trigger_accuracy"] >= 0.95
    assert res["clean_accuracy_before"] is None and res["clean_accuracy_after"] > 0.9
    assert res["from_scratch"] and res["model_sha256"] == key["model_sha256"]
    secret = _seed_hex(embedded.key)
    for f in embedded.out.iterdir():
        assert secret not in f.read_bytes().decode("latin-1"), f.name
    report = json.loads((embedded.out / "report.json").read_text())
    (probe,) = report["probes"]
    assert probe["probe"] == "watermark-embed" and probe["grade"] is None
    assert sorted(p.name for p in embedded.key.parent.iterdir()) == ["key.json"]


def test_verify_the_marked_file_and_an_innocent_one(embedded: Embedded, tmp_path: Path) -> None:
    r = wm(
        "verify",
        "--model",
        str(embedded.out / "model.pt2"),
        "--key",
        str(embedded.key),
        "--out",
        str(tmp_path / "check"),
    )
    assert r.returncode == 0, r.stderr
    assert "VERIFIED" in r.stdout
    res = json.loads((tmp_path / "check" / "result.json").read_text())
    assert res["verified"] and res["p_value"] < 1e-6 and res["access"] == "white-box"
    assert res["same_file_as_embedded"] is True
    assert {"p_value", "verified", "trigger_accuracy", "matches", "n_triggers"} <= set(res)
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    pytest.importorskip("jsonschema").validate(report, load_schema())
    assert report["probes"][0]["grade"] is None and report["summary"]["overall_grade"] is None
    assert _seed_hex(embedded.key) not in (tmp_path / "check" / "report.html").read_text()

    # an innocent model: same data and architecture, trained without the key
    from modelshield.core.architectures import build
    from modelshield.core.train import train_classifier

    train = load_dataset(str(embedded.train))
    net = train_classifier(build("mlp", (1, 8, 8), 10), train.x, train.y, epochs=5, seed=3)
    torch.save(net.state_dict(), tmp_path / "innocent.pt")
    r = wm(
        "verify",
        "--model",
        str(tmp_path / "innocent.pt"),
        "--arch",
        "mlp",
        "--key",
        str(embedded.key),
        "--out",
        str(tmp_path / "innocent"),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "innocent" / "result.json").read_text())
    assert not res["verified"] and res["p_value"] > 1e-3 and "not verified" in r.stdout


@pytest.fixture
def server(embedded: Embedded) -> Iterator[tuple[str, dict[str, int]]]:
    """The marked model behind a real HTTP endpoint on 127.0.0.1: /probs and /label."""
    net = load_model(embedded.out / "model.pt2").classifier
    assert net is not None
    seen = {"rows": 0}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            x = torch.tensor(body["inputs"], dtype=torch.float32)
            seen["rows"] += len(x)
            with torch.no_grad():
                logits = net(x)
            out = (
                logits.argmax(1).tolist()
                if self.path.endswith("label")
                else torch.softmax(logits, 1).tolist()
            )
            blob = json.dumps({"outputs": out}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.network
def test_verify_over_http(embedded: Embedded, server: tuple, tmp_path: Path) -> None:
    url, seen = server
    results = {}
    for output in ("label", "probs"):
        before = seen["rows"]
        r = wm(
            "verify",
            "--oracle",
            f"{url}/{output}",
            "--oracle-output",
            output,
            "--key",
            str(embedded.key),
            "--out",
            str(tmp_path / output),
        )
        assert r.returncode == 0, r.stderr
        results[output] = json.loads((tmp_path / output / "result.json").read_text())
        assert seen["rows"] - before == 100  # one query per trigger, nothing more
    white = json.loads((embedded.out / "result.json").read_text())
    for res in results.values():
        assert res["verified"] and res["access"] == "label-only"
        assert res["matches"] == white["matches"] and res["p_value"] == white["p_value"]


def test_embed_fine_tunes_an_existing_model(bundle: Bundle, tmp_path: Path) -> None:
    key = tmp_path / "key.json"
    args = [
        "embed",
        "--model",
        str(bundle.model_pt2),
        "--train-data",
        str(bundle.train),
        "--data",
        str(bundle.data),
        "--key",
        str(key),
        "--out",
        str(tmp_path / "marked"),
        "--triggers",
        "30",
        "--epochs",
        "60",
        "--lr",
        "0.01",
    ]
    r = wm(*args)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "marked" / "result.json").read_text())
    assert res["verified"] and not res["from_scratch"]
    assert res["clean_accuracy_after"] >= res["clean_accuracy_before"] - 0.05
    assert (tmp_path / "marked" / "model.pt2").is_file()
    assert (
        res["source_model"]["sha256"] == hashlib.sha256(bundle.model_pt2.read_bytes()).hexdigest()
    )

    # a second embed with the same key path is refused before anything is trained or written
    again = wm(*[a if a != str(tmp_path / "marked") else str(tmp_path / "again") for a in args])
    assert_one_line_error(again, "already exists", "--force")
    assert not (tmp_path / "again").exists()
    assert json.loads(key.read_text())["model_sha256"] == res["model_sha256"]


def test_one_line_errors(embedded: Embedded, bundle: Bundle, tmp_path: Path) -> None:
    missing = wm(
        "verify",
        "--model",
        str(bundle.model_pt2),
        "--key",
        str(tmp_path / "nope.json"),
        "--out",
        str(tmp_path / "a"),
    )
    assert_one_line_error(missing, "no such file")
    wrong_shape = wm(
        "verify",
        "--model",
        str(bundle.model_pt2),
        "--key",
        str(embedded.key),
        "--out",
        str(tmp_path / "b"),
    )
    assert_one_line_error(wrong_shape, "shape (1, 8, 8)")
    no_model = wm(
        "embed",
        "--train-data",
        str(embedded.train),
        "--key",
        str(tmp_path / "k.json"),
        "--out",
        str(tmp_path / "c"),
    )
    assert_one_line_error(no_model, "--arch")
    from modelshield.core.errors import InvalidConfigError
    from modelshield.scan.watermark import run_watermark_verify

    with pytest.raises(InvalidConfigError, match="exactly one"):  # checked before any work
        run_watermark_verify(model="m.pt2", oracle="http://127.0.0.1:9/p", key="k", out="d")
    for d in "abc":
        assert not (tmp_path / d).exists()
    assert not (tmp_path / "k.json").exists()


def test_a_model_on_normalised_inputs_is_marked_and_verified_through_mean_std(
    tmp_path: Path,
) -> None:
    """--mean/--std: the data and the triggers reach the model normalised, as in every scan.

    The model expects ``(x - 0.5) / 0.1``; on raw inputs its accuracy collapses, so a run
    that ignored the options would report a low 'before' accuracy and a broken model."""
    from torch import nn

    train, test = load_dataset("digits").split(0.75, seed=0)
    train.to_npz(tmp_path / "train.npz")
    test.to_npz(tmp_path / "test.npz")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xn = (train.x - 0.5) / 0.1
    for _ in range(300):
        i = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(xn[i]), train.y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        assert (net(test.x).argmax(1) == test.y).float().mean() < 0.6  # raw inputs: broken
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (test.x[:2],), dynamic_shapes=({0: batch},))  # type: ignore[attr-defined]
    torch.export.save(prog, tmp_path / "model.pt2")
    key, out = tmp_path / "key.json", tmp_path / "marked"
    r = wm("embed", "--model", str(tmp_path / "model.pt2"), "--train-data",
           str(tmp_path / "train.npz"), "--data", str(tmp_path / "test.npz"), "--key", str(key),
           "--out", str(out), "--triggers", "30", "--epochs", "40", "--lr", "0.005",
           "--mean", "0.5", "--std", "0.1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["clean_accuracy_before"] > 0.85, res
    assert res["verified"] and res["clean_accuracy_after"] >= res["clean_accuracy_before"] - 0.05
    # the saved model keeps its input contract: it still expects normalised inputs
    marked = load_model(out / "model.pt2", input_shape=(1, 8, 8), mean=0.5, std=0.1)
    assert marked.classifier is not None
    assert marked.classifier.accuracy(test.x, test.y) >= res["clean_accuracy_after"] - 1e-6
    v = wm("verify", "--model", str(out / "model.pt2"), "--key", str(key), "--out",
           str(tmp_path / "v"), "--mean", "0.5", "--std", "0.1")  # fmt: skip
    assert v.returncode == 0, v.stderr
    assert json.loads((tmp_path / "v" / "result.json").read_text())["verified"]
