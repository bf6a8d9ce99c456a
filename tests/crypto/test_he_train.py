"""The HE-friendly training helper: ReLU → fitted, fine-tuned quadratic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from modelshield.core.data import load_dataset
from modelshield.core.errors import UnsupportedModelError
from modelshield.crypto.he.plan import compile_model
from modelshield.crypto.he.train import PolyAct, make_he_friendly


def test_relu_is_swapped_fine_tuned_and_compiles_exactly() -> None:
    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(150):
        idx = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    he_net, rep = make_he_friendly(net, train, test, epochs=2, seed=0)
    assert rep["replaced"] == ["2"] and isinstance(he_net[2], PolyAct)
    assert isinstance(net[2], nn.ReLU)  # the original is untouched
    assert rep["accuracy_relu"] > 0.8
    assert rep["accuracy_finetuned"] >= rep["accuracy_swapped"] - 0.02
    assert rep["accuracy_cost_pp"] == pytest.approx(
        100 * (rep["accuracy_relu"] - rep["accuracy_finetuned"])
    )
    plan = compile_model(he_net, (1, 8, 8), test.x[:64])
    with torch.no_grad():
        ref = he_net(test.x[:64]).double().numpy()
    np.testing.assert_allclose(plan.forward(test.x[:64]), ref, rtol=1e-4, atol=1e-4)
    assert plan.activations[0]["kind"] == "poly"
    with pytest.raises(UnsupportedModelError, match="no ReLU to replace"):
        make_he_friendly(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), train, epochs=0)


def _trained_small_cnn(train: object, width: int = 8) -> nn.Module:
    from modelshield.core.architectures import small_cnn

    torch.manual_seed(0)
    net = small_cnn((1, 8, 8), 10, width=width)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(300):
        idx = torch.randint(0, len(train), (64,))  # type: ignore[arg-type]
        x, y = train.x[idx], train.y[idx]  # type: ignore[attr-defined]
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_deep_relu_cnn_per_unit_fits_beat_one_quadratic_per_layer() -> None:
    """Three ReLU layers: one CryptoNets-style quadratic per layer compounds its error; the
    compiler's per-unit, drift-corrected fits (then refined) keep the model's predictions."""
    from modelshield.crypto.he.plan import predict_labels

    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    net = _trained_small_cnn(train)
    with torch.no_grad():
        ref = net(test.x).argmax(1).numpy()
    calib = train.x[:512]
    plan = compile_model(net, (1, 8, 8), calib)
    agree = float((predict_labels(plan, plan.forward(test.x)) == ref).mean())
    assert plan.fidelity["calibration_samples"] == 512
    assert 0 <= plan.fidelity["calibration_agreement"] <= 1
    one_per_layer = compile_model(net, (1, 8, 8), calib, fits=[("layer", 0.5)], refine=False)
    agree_layer = float((predict_labels(plan, one_per_layer.forward(test.x)) == ref).mean())
    assert agree >= 0.9, agree  # on held-out digits, not the calibration inputs
    assert agree > agree_layer + 0.05, (agree, agree_layer)
    assert all(a["fit"] in ("unit", "layer") for a in plan.activations)


def test_finetuned_export_graph_compiles_its_polynomials_exactly(tmp_path: object) -> None:
    """A fine-tuned model saved with torch.export keeps its quadratics as aten mul/add
    nodes; the compiler reads them back (per unit) and the plan equals the model."""
    from pathlib import Path

    from modelshield.core.loading import load_model, save_exported

    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    net = _trained_small_cnn(train, width=4)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    prog = torch.export.export(net, (test.x[:2],), dynamic_shapes=({0: batch},))
    loaded = load_model(_save(prog, Path(str(tmp_path)) / "m.pt2"), input_shape=(1, 8, 8))
    he_net, rep = make_he_friendly(loaded.obj, train, test, epochs=1, seed=0)
    assert len(rep["replaced"]) == 3  # the graph's three aten.relu calls
    save_exported(he_net, test.x[:2], Path(str(tmp_path)) / "ft.pt2")
    ft = load_model(str(Path(str(tmp_path)) / "ft.pt2"), input_shape=(1, 8, 8)).obj
    plan = compile_model(ft, (1, 8, 8), test.x[:64])
    assert [a["kind"] for a in plan.activations] == ["poly"] * 3
    assert not plan.fidelity  # every activation exact: nothing approximated
    with torch.no_grad():
        ref = ft(test.x[:64]).double().numpy()
    np.testing.assert_allclose(plan.forward(test.x[:64]), ref, rtol=1e-4, atol=1e-4)


def _save(prog: object, path: object) -> str:
    torch.export.save(prog, path)  # type: ignore[arg-type]
    return str(path)


def test_elementwise_cube_in_a_graph_is_refused() -> None:
    class Cube(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h * h * h)

    with pytest.raises(UnsupportedModelError, match="not a polynomial of degree"):
        compile_model(Cube().eval(), (4,), torch.rand(16, 4))
