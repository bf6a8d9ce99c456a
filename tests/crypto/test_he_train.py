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
    with pytest.raises(UnsupportedModelError, match=r"no nn\.ReLU"):
        make_he_friendly(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), train, epochs=0)
