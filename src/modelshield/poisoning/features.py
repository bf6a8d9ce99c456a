"""The layers poisoning defences read: penultimate activations and the final linear layer.

Spectral signatures and activation clustering read a model's penultimate representation
(the input of its last linear layer); fine-pruning removes units of that representation.
Both work for an ``nn.Module`` (a forward hook on its last ``nn.Linear``) and for a
``torch.export`` program (the graph's last ``aten.linear``/``aten.addmm`` node, read by
running the graph through an FX interpreter), so a ``.pt2`` file is as good as the
module that produced it. For global-average-pooled CNNs the penultimate units are the
channels of the last convolutional block, the layer Liu et al. (2018) prune.
"""

from __future__ import annotations

import copy
import io
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from modelshield.core.classifier import Classifier
from modelshield.core.errors import UnsupportedModelError

_LINEAR_OPS = ("aten.linear.default", "aten.addmm.default")


def _unwrap(module: Any) -> tuple[Any, int | None]:
    """(inner module, static batch size or None): the program inside a loader wrapper."""
    from modelshield.core.loading import _ExportedModule

    if isinstance(module, _ExportedModule):
        return module.program, module.batch_size
    return module, None


def _last_linear_node(gm: torch.fx.GraphModule) -> torch.fx.Node | None:
    last = None
    for node in gm.graph.nodes:
        if node.op == "call_function" and str(node.target) in _LINEAR_OPS:
            last = node
    return last


def _last_linear_module(module: nn.Module) -> nn.Linear | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class _Tap(torch.fx.Interpreter):
    """Runs a graph and keeps the value of one node (the last linear layer's input)."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, arg: int) -> None:
        super().__init__(gm)
        self.node, self.arg = node, arg
        self.value: Tensor | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        if n is self.node:
            src = n.args[self.arg]
            self.value = self.env[src] if isinstance(src, torch.fx.Node) else None
        return super().run_node(n)


class _TapModule(nn.Module):
    """``x -> features`` for an exported graph (so the loader's re-batching applies)."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
        super().__init__()
        self.gm, self.node = gm, node
        self.arg = 1 if str(node.target) == "aten.addmm.default" else 0

    def forward(self, x: Tensor) -> Tensor:
        tap = _Tap(self.gm, self.node, self.arg)
        tap.run(x)
        if tap.value is None:  # pragma: no cover - a linear node always has an input
            raise UnsupportedModelError("could not read the penultimate layer of the graph")
        return tap.value


@torch.no_grad()
def penultimate_features(model: Classifier, x: Tensor, batch_size: int = 256) -> Tensor:
    """Activations feeding the model's last linear layer, ``(N, D)``, on the CPU.

    Raises :class:`UnsupportedModelError` when the model has no linear layer to read.
    """
    inner, static = _unwrap(model.module)
    outs: list[Tensor] = []
    if isinstance(inner, torch.fx.GraphModule):
        node = _last_linear_node(inner)
        if node is None:
            raise UnsupportedModelError(
                "the exported graph has no linear layer to read features from"
            )
        from modelshield.core.loading import _ExportedModule

        runner = _ExportedModule(_TapModule(inner, node), static)
        for i in range(0, len(x), batch_size):
            xb = model.preprocess(x[i : i + batch_size].to(model.device))
            outs.append(runner(xb).flatten(1).cpu())
    elif isinstance(inner, nn.Module):
        layer = _last_linear_module(inner)
        if layer is None:
            raise UnsupportedModelError(
                f"{type(inner).__name__} has no nn.Linear layer to read features from"
            )
        grabbed: list[Tensor] = []
        handle = layer.register_forward_hook(lambda _m, inp, _o: grabbed.append(inp[0]))
        try:
            for i in range(0, len(x), batch_size):
                grabbed.clear()
                model(x[i : i + batch_size].to(model.device))
                outs.append(grabbed[-1].flatten(1).cpu())
        finally:
            handle.remove()
    else:
        raise UnsupportedModelError(f"cannot read the layers of a {type(inner).__name__}")
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs).float()


def final_linear_weight(model: Classifier) -> Tensor:
    """The weight ``(C, D)`` of the model's last linear layer (its columns are the
    penultimate units), as a live parameter of the model."""
    inner, _ = _unwrap(model.module)
    if isinstance(inner, torch.fx.GraphModule):
        node = _last_linear_node(inner)
        w = None
        if node is not None:
            ref = node.args[1] if str(node.target) == "aten.linear.default" else node.args[2]
            if isinstance(ref, torch.fx.Node) and ref.op == "get_attr":
                w = inner.get_parameter(str(ref.target))
            elif isinstance(ref, torch.fx.Node) and ref.op == "call_function" and ref.args:
                # addmm reads the transposed weight: t(get_attr)
                src = ref.args[0]
                if isinstance(src, torch.fx.Node) and src.op == "get_attr":
                    w = inner.get_parameter(str(src.target))
        if w is None:
            raise UnsupportedModelError("cannot find the last linear layer's weight in the graph")
        return w
    if isinstance(inner, nn.Module):
        layer = _last_linear_module(inner)
        if layer is None:
            raise UnsupportedModelError(f"{type(inner).__name__} has no nn.Linear layer")
        return layer.weight
    raise UnsupportedModelError(f"cannot read the layers of a {type(inner).__name__}")


def clone_module(module: Any) -> Any:
    """A deep copy of a model's module (quietly: deep-copying an exported graph trips a
    deprecation warning inside torch's pytree code).

    TorchScript modules are copied by a save/load round trip: ``copy.deepcopy`` gives them
    parameters that are clones in the autograd graph (not leaves), which no optimiser takes.
    """
    if isinstance(module, torch.jit.ScriptModule):
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        first = next(iter(module.parameters()), None)
        return torch.jit.load(buf, map_location=first.device if first is not None else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(module)
