"""HE-friendly training: replace ReLU by a trainable quadratic and fine-tune.

Each ``nn.ReLU`` becomes a :class:`PolyAct` ``a0 + a1·x + a2·x²`` initialised to the
least-squares fit of ReLU over the pre-activations the model sees on its training data,
then the whole network is fine-tuned (as in the "trainable polynomial activation" line of
work, e.g. Ali et al. 2020, and the degree-2 networks of CryptoNets). The report gives
the accuracy of the original model, of the plain swap and of the fine-tuned model, so the
accuracy cost of encryption-friendliness is measured, not assumed.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn

from modelshield.core.data import Dataset
from modelshield.core.errors import InvalidConfigError, UnsupportedModelError

logger = logging.getLogger(__name__)


class Square(nn.Module):
    """``x²``: the CryptoNets / TenSEAL-tutorial activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x


class PolyAct(nn.Module):
    """Trainable ``a0 + a1·x + a2·x²`` (``coeffs = [a0, a1, a2]``)."""

    def __init__(self, coeffs: tuple[float, float, float] = (0.0, 0.5, 0.25)) -> None:
        super().__init__()
        self.coeffs = nn.Parameter(torch.tensor(coeffs, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        c = self.coeffs
        return c[0] + c[1] * x + c[2] * x * x


def _coeffs(m: nn.Module) -> list[float]:
    assert isinstance(m, PolyAct)
    return [float(v) for v in m.coeffs.detach()]


def _accuracy(model: nn.Module, data: Dataset, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            correct += int((model(data.x[i : i + batch]).argmax(1) == data.y[i : i + batch]).sum())
    return correct / max(1, len(data))


def _graph_of(model: nn.Module) -> torch.fx.GraphModule | None:
    """The fx graph of an exported program (bare, or inside the loader's wrapper)."""
    inner = getattr(model, "program", model)
    return inner if isinstance(inner, torch.fx.GraphModule) else None


def _relus_to_modules(gm: torch.fx.GraphModule) -> None:
    """Turn each ``aten.relu`` call of an exported graph into an ``nn.ReLU`` submodule
    call, so it can be swapped for a :class:`PolyAct` like any other ReLU."""
    relu_ops = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}
    k = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in relu_ops:
            name = f"he_relu{k}"
            k += 1
            gm.add_submodule(name, nn.ReLU())
            with gm.graph.inserting_after(node):
                repl = gm.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(repl)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


def make_he_friendly(
    model: nn.Module,
    train: Dataset,
    test: Dataset | None = None,
    *,
    epochs: int = 2,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` with every ``nn.ReLU`` a fitted, fine-tuned :class:`PolyAct`.

    Returns (model, report): accuracies on ``test`` (else ``train``) of the original,
    the swapped-before-fine-tuning and the fine-tuned model, and the accuracy cost in
    percentage points.
    """
    from modelshield.crypto.he.plan import fit_quadratic

    if epochs < 0:
        raise InvalidConfigError(f"epochs must be ≥ 0, got {epochs}")
    started = time.time()
    torch.manual_seed(seed)
    new = copy.deepcopy(model).float()
    graph = _graph_of(new)
    if graph is not None:
        _relus_to_modules(graph)
    relus = [(n, m) for n, m in new.named_modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise UnsupportedModelError(
            "the model has no ReLU to replace (nn.ReLU modules, or aten.relu in a torch.export "
            "graph); TorchScript models cannot be edited: give a .pt2 or a state_dict + --arch"
        )
    seen: dict[str, list[Tensor]] = {n: [] for n, _ in relus}
    hooks = [
        m.register_forward_hook(lambda _m, inp, _o, n=n: seen[n].append(inp[0].detach()))
        for n, m in relus
    ]
    new.eval()
    with torch.no_grad():
        new(train.x[:1024].float())
    for h in hooks:
        h.remove()
    fits = {}
    for name, _ in relus:
        coeffs, rng = fit_quadratic("relu", torch.cat(seen[name]).double().numpy())
        fits[name] = {"coeffs": list(coeffs), "range": list(rng)}
        parent = new.get_submodule(name.rsplit(".", 1)[0]) if "." in name else new
        setattr(parent, name.rsplit(".", 1)[-1], PolyAct(coeffs))
    for p in new.parameters():
        p.requires_grad_(True)
    evald = test if test is not None else train
    before = _accuracy(model, evald)
    swapped = _accuracy(new, evald)
    opt = torch.optim.Adam(new.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        new.train()
        perm = torch.randperm(len(train), generator=g)
        for i in range(0, len(train), batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(new(train.x[idx].float()), train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        logger.info(
            "HE-friendly fine-tuning: epoch %d/%d, loss %.4f",
            epoch + 1,
            epochs,
            float(loss.detach()),
        )
    new.eval()
    after = _accuracy(new, evald)
    report = {
        "replaced": list(fits),
        "initial_fits": fits,
        "final_coeffs": {n: _coeffs(new.get_submodule(n)) for n in fits},
        "accuracy_relu": before,
        "accuracy_swapped": swapped,
        "accuracy_finetuned": after,
        "accuracy_cost_pp": 100 * (before - after),
        "evaluated_on": "test" if test is not None else "train",
        "epochs": epochs,
        "wall_time": time.time() - started,
    }
    return new, report
