"""The extraction attacks over HTTP against `modelshield serve`'s gateway on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelshield.core.errors import QueryBudgetExceeded
from modelshield.core.oracles.http import HttpOracle
from modelshield.core.threat import QueryAccess
from modelshield.extraction import jacobian_augmentation, knockoff
from modelshield.serve.app import create_app, load_gateway
from modelshield.serve.server import serve_in_thread
from tests.conftest import Bundle

pytestmark = pytest.mark.network


def _gateway(bundle: Bundle, *defenses: str) -> tuple[str, object]:
    gateway = load_gateway(str(bundle.model_pt2), list(defenses))
    url, stop = serve_in_thread(create_app(gateway))
    return f"{url}/predict", stop


def _data(bundle: Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    d = np.load(bundle.data)
    return torch.from_numpy(d["x"]).float(), torch.from_numpy(d["y"]).long()


def test_knockoff_over_http_plain_and_label_only(bundle: Bundle) -> None:
    x, _ = _data(bundle)
    pool, held = x[:80], x[80:]
    model = bundle.module.eval()

    def victim_labels(t: torch.Tensor) -> torch.Tensor:  # evaluation only, not over HTTP
        with torch.no_grad():
            return model(t).argmax(1)

    fids = {}
    for defence, raw in (("", "probs"), ("label-only", "label")):
        url, stop = _gateway(bundle, *([defence] if defence else []))
        try:
            oracle = HttpOracle(url, QueryAccess(output=raw), raw_output=raw, num_classes=3)
            _, res = knockoff(
                oracle, pool, queries=60, num_classes=3, epochs=30, seed=0,
                x_eval=held, victim=victim_labels,
            )  # fmt: skip
        finally:
            stop()  # type: ignore[operator]
        assert res.queries_used == 60 and oracle.queries_used == 60
        fids[raw] = res.fidelity
    assert fids["probs"] > 0.8 and fids["label"] > 0.6  # blobs: easy to copy either way


def test_jacobian_over_http_stops_at_the_gateways_budget(bundle: Bundle) -> None:
    x, _ = _data(bundle)
    url, stop = _gateway(bundle, "label-only", "budget=40")
    try:
        oracle = HttpOracle(url, QueryAccess(output="label"), raw_output="label", num_classes=3)
        with pytest.raises(QueryBudgetExceeded, match="budget"):
            jacobian_augmentation(oracle, x[:10], queries=100, num_classes=3, epochs=5, seed=0)
        assert oracle.queries_used <= 100
    finally:
        stop()  # type: ignore[operator]
