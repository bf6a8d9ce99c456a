"""`audit inversion`, `audit attribute` and their scan probes, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.train import train_classifier
from tests.cli.test_cli import assert_one_line_error
from tests.conftest import Bundle, run_cli


def test_audit_inversion(tmp_path: Path, bundle: Bundle) -> None:
    out = tmp_path / "inv"
    r = run_cli(
        "audit",
        "inversion",
        "--model",
        str(bundle.model_pt2),
        "--data",
        str(bundle.data),
        "--steps",
        "100",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["classes"] == [0, 1, 2] and 0 <= res["nearest_fraction"] <= 1
    report = json.loads((out / "report.json").read_text())
    assert report["probes"][0]["probe"] == "model-inversion"
    assert report["probes"][0]["plots"][0]["kind"] == "images"


@pytest.fixture(scope="module")
def tabular(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """y = (b(x) + s) mod 3, s the sensitive column 0 and b a linear argmax over the others:
    the model (3000 records) learned b, the attacker's 200 auxiliary records are too few to."""
    root = tmp_path_factory.mktemp("tab")
    g = torch.Generator().manual_seed(1)

    def table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand(n, 9, generator=g)
        s = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), n, replacement=True, generator=g)
        x[:, 0] = s.float() / 2
        w = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
        return x, ((x[:, 1:] @ w.T).argmax(dim=1) + s) % 3

    x, y = table(3000)
    aux_x, aux_y = table(200)
    net = nn.Sequential(nn.Linear(9, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    train_classifier(net, x, y, epochs=40, lr=3e-3, seed=0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    torch.export.save(
        torch.export.export(net.eval(), (x[:2],), dynamic_shapes=({0: batch},)), root / "m.pt2"
    )
    np.savez(root / "train.npz", x=x.numpy(), y=y.numpy())
    np.savez(root / "aux.npz", x=aux_x.numpy(), y=aux_y.numpy())
    return root / "m.pt2", root / "train.npz", root / "aux.npz"


def test_audit_attribute_and_scan_probe(tmp_path: Path, tabular: tuple[Path, Path, Path]) -> None:
    model, train, aux = tabular
    out = tmp_path / "attr"
    r = run_cli(
        "audit",
        "attribute",
        "--model",
        str(model),
        "--train-data",
        str(train),
        "--data",
        str(aux),
        "--sensitive",
        "0",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["accuracy"] > res["baseline_accuracy"] and res["advantage_ci"][0] > 0
    assert res["values"] == [0.0, 0.5, 1.0]
    scan = run_cli(
        "scan",
        "--model",
        str(model),
        "--data",
        str(aux),
        "--train-data",
        str(train),
        "--sensitive-feature",
        "0",
        "--only",
        "attribute-inference",
        "--out",
        str(tmp_path / "scan"),
    )
    assert scan.returncode == 0, scan.stderr
    (probe,) = json.loads((tmp_path / "scan" / "report.json").read_text())["probes"]
    assert probe["status"] == "ok" and probe["grade"] in "CDF"
    assert_one_line_error(
        run_cli(
            "audit",
            "attribute",
            "--model",
            str(model),
            "--train-data",
            str(train),
            "--data",
            str(aux),
            "--sensitive",
            "9",
            "--out",
            str(tmp_path / "bad"),
        ),
        "--sensitive",
    )
