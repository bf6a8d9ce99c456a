"""Read a trained torch model as a plain sequence of steps, for the crypto engines.

Encrypted inference (:mod:`modelshield.crypto.he`) and secret-shared inference
(:mod:`modelshield.crypto.mpc`) both need the model as ``linear → activation → linear …``:
an ``nn.Sequential`` (or TorchScript) is read module by module, anything else through its
``torch.export`` graph (aten ops). Runs of linear steps (Linear, Conv2d, pooling, flatten,
BatchNorm in eval mode, dropout, elementwise affine maps) collapse into one dense affine map
(:func:`dense_affine`), read off the layers as ``W = f(I) − f(0)``, ``b = f(0)``;
activations are ReLU, sigmoid, softmax (last), square, or any elementwise polynomial of
degree ≤ 2 (e.g. a fine-tuned trainable quadratic). Anything else is refused with the
layer named and what would make it supported.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelshield.core.errors import UnsupportedModelError

MAX_AFFINE_ENTRIES = 8_000_000
"""Refuse a collapsed affine map larger than this (memory, and HE cost grows with it)."""

SUPPORTED = (
    "Linear, Conv2d (im2col), AvgPool2d / AdaptiveAvgPool2d, Flatten/view, BatchNorm "
    "(eval mode, folded), Dropout, and square / ReLU / sigmoid / PolyAct activations"
)

_HINTS = {
    "max_pool": "replace max pooling by average pooling and retrain",
    "maxpool": "replace max pooling by average pooling and retrain",
    "tanh": "replace tanh by ReLU or a PolyAct (see 'modelshield.crypto.he.train') and retrain",
    "gelu": "replace GELU by a PolyAct (see 'modelshield.crypto.he.train') and fine-tune",
    "add": "residual connections are not supported: use a plain sequential model",
    "cat": "concatenations are not supported: use a plain sequential model",
    "layer_norm": "layer normalisation divides by a data-dependent norm; use BatchNorm",
    "batch_norm": "export the model in eval mode so BatchNorm uses its running statistics",
}


def refuse(index: int, name: str) -> UnsupportedModelError:
    """The error for an unsupported layer: its index, its name and what would help."""
    hint = next((h for k, h in _HINTS.items() if k in name.lower()), None)
    hint = hint or f"supported layers are {SUPPORTED}"
    return UnsupportedModelError(f"layer {index} ({name}) is not supported: {hint}")


@dataclass
class Affine:
    """``y = W x + b`` on flat vectors (``W``: out × in)."""

    w: np.ndarray
    b: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.w.shape[0]), int(self.w.shape[1])


# --------------------------------------------------------------------------------------
# Reading a model as a sequence of steps
# --------------------------------------------------------------------------------------


@dataclass
class Step:
    kind: str  # "linear" | "square" | "relu" | "sigmoid" | "poly" | "softmax"
    name: str
    fn: Callable[[Tensor], Tensor]
    coeffs: tuple[float, float, float] | None = None


_LINEAR_MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Identity,
)
_LINEAR_NAMES = {t.__name__ for t in _LINEAR_MODULES}


def _module_step(i: int, m: Any, name: str) -> Step:
    tname = getattr(m, "original_name", None) or type(m).__name__
    if tname in ("BatchNorm1d", "BatchNorm2d") and getattr(m, "training", False):
        raise refuse(i, f"{tname} in training mode (batch_norm)")
    if tname in _LINEAR_NAMES:
        return Step("linear", f"{name} ({tname})", m)
    if tname == "ReLU":
        return Step("relu", f"{name} (ReLU)", torch.relu)
    if tname == "Sigmoid":
        return Step("sigmoid", f"{name} (Sigmoid)", torch.sigmoid)
    if tname in ("Softmax", "LogSoftmax"):
        return Step("softmax", f"{name} ({tname})", m)
    if tname == "Square":
        return Step("square", f"{name} (Square)", lambda t: t * t)
    if tname == "PolyAct":
        c = [float(v) for v in m.coeffs.detach().cpu().reshape(-1)]
        if len(c) != 3:
            raise refuse(i, f"{name} (PolyAct of degree {len(c) - 1}; degree 2 only)")
        return Step("poly", f"{name} (PolyAct)", m, (c[0], c[1], c[2]))
    raise refuse(i, f"{name} ({tname})")


def _children_steps(module: Any) -> list[Step]:
    """Leaf modules in registration order (a Sequential, possibly nested; TorchScript too)."""
    leaves: list[tuple[str, Any]] = []

    def walk(m: Any, prefix: str) -> None:
        kids = list(m.named_children())
        tname = getattr(m, "original_name", None) or type(m).__name__
        if not kids or tname in ("PolyAct", "Square") or tname in _LINEAR_NAMES:
            leaves.append((prefix or tname, m))
            return
        for n, c in kids:
            walk(c, f"{prefix}.{n}" if prefix else n)

    walk(module, "")
    return [_module_step(i, m, n) for i, (n, m) in enumerate(leaves)]


_ATEN_LINEAR = {
    "aten.linear.default",
    "aten.conv2d.default",
    "aten.convolution.default",
    "aten.avg_pool2d.default",
    "aten.adaptive_avg_pool2d.default",
    "aten._adaptive_avg_pool2d.default",
    "aten.mean.dim",
    "aten._native_batch_norm_legit_no_training.default",
    "aten.batch_norm.default",
    "aten.dropout.default",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.alias.default",
    "aten.detach.default",
}
_ATEN_RESHAPE = {
    "aten.flatten.using_ints",
    "aten.view.default",
    "aten.reshape.default",
    "aten._unsafe_view.default",
}


def _graph_steps(gm: torch.fx.GraphModule, example: Tensor) -> list[Step]:
    """The data path of an exported (aten) graph as steps; weights are read as constants."""
    env: dict[torch.fx.Node, Any] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            env[n] = out
            return out

    with torch.no_grad():
        _Rec(gm).run(example)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model takes {len(placeholders)} inputs; want one")
    chain: set[torch.fx.Node] = {placeholders[0]}
    steps: list[Step] = []
    cur = placeholders[0]
    nodes = list(gm.graph.nodes)
    skip: set[torch.fx.Node] = set()
    for pos, n in enumerate(nodes):
        if n.op in ("placeholder", "get_attr") or n in skip:
            continue
        if n.op == "output":
            break
        deps = [a for a in n.all_input_nodes if a in chain]
        if not deps or not n.users:
            continue  # a weight transform (t, expand...), or a guard / assert nobody reads
        name = str(n.target)
        if name in _ATEN_ELEMENTWISE and cur in deps:
            region = _elementwise_region(nodes, pos, cur, chain)
            if region is not None and len(region) > 1:
                step = _region_step(region, cur, env, len(steps))
                skip.update(region)
                chain.update(region)
                cur = region[-1]
                steps.append(step)
                continue
        if name.startswith(("aten.sym_size", "aten.sym_numel", "aten.sym_stride")):
            continue  # a shape read: reshapes are replayed from the recorded shapes
        if n.target is operator.getitem:
            if n.args[0] is cur and isinstance(env[cur], (tuple, list)):
                idx = int(n.args[1])
                steps.append(Step("linear", "getitem", lambda t, idx=idx: t[idx]))  # type: ignore[misc]
                chain.add(n)
                cur = n
                continue
            raise refuse(len(steps), name)
        if deps != [cur] and not (name == "aten.mul.Tensor" and n.args[0] is n.args[1] is cur):
            raise refuse(len(steps), f"{name}: it combines several tensors (e.g. a residual add)")
        chain.add(n)
        cur = n
        idx = len(steps)
        if name in ("aten.relu.default", "aten.relu_.default"):
            steps.append(Step("relu", name, torch.relu))
        elif name == "aten.sigmoid.default":
            steps.append(Step("sigmoid", name, torch.sigmoid))
        elif name in ("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int",
                      "aten._log_softmax.default"):  # fmt: skip
            steps.append(Step("softmax", name, lambda t: torch.softmax(t, dim=-1)))
        elif (name == "aten.mul.Tensor" and n.args[0] is n.args[1]) or (
            name in ("aten.pow.Tensor_Scalar", "aten.square.default")
            and (name == "aten.square.default" or n.args[1] == 2)
        ):
            steps.append(Step("square", name, lambda t: t * t))
        elif name in _ATEN_RESHAPE:
            tail = tuple(int(s) for s in env[n].shape[1:])
            steps.append(Step("linear", name, lambda t, tail=tail: t.reshape(t.shape[0], *tail)))  # type: ignore[misc]
        elif name in _ATEN_LINEAR:
            fn = _aten_call(n.target, n.args, dict(n.kwargs), chain, env)
            if name == "aten.dropout.default" and len(n.args) > 2 and n.args[2]:
                raise refuse(idx, "dropout in training mode: export the model in eval mode")
            steps.append(Step("linear", name, fn))
        else:
            raise refuse(idx, name)
    return steps


_ATEN_ELEMENTWISE = {
    "aten.mul.Tensor",
    "aten.mul.Scalar",
    "aten.add.Tensor",
    "aten.add.Scalar",
    "aten.sub.Tensor",
    "aten.sub.Scalar",
    "aten.rsub.Scalar",
    "aten.neg.default",
    "aten.div.Tensor",
    "aten.div.Scalar",
    "aten.pow.Tensor_Scalar",
    "aten.square.default",
    "aten.select.int",
    "aten.unsqueeze.default",
}
"""Elementwise ops (and the constant reads between them) that a polynomial activation such
as a trainable ``a0 + a1·x + a2·x²`` becomes in an exported graph."""


def _elementwise_region(
    nodes: list[torch.fx.Node], pos: int, cur: torch.fx.Node, chain: set[torch.fx.Node]
) -> list[torch.fx.Node] | None:
    """The run of elementwise nodes from ``nodes[pos]`` that reads only ``cur`` (and
    constants) and hands exactly one value on, or None."""
    region: list[torch.fx.Node] = []
    inside: set[torch.fx.Node] = set()
    for n in nodes[pos:]:
        if n.op != "call_function" or str(n.target) not in _ATEN_ELEMENTWISE:
            break
        deps = [a for a in n.all_input_nodes if a in chain or a in inside]
        if not deps:
            continue  # a constant transform (e.g. selecting a coefficient)
        if any(a in chain and a is not cur for a in deps):
            break
        region.append(n)
        inside.add(n)
    while region:
        leaving = [r for r in region if any(u not in inside for u in r.users)]
        if leaving == [region[-1]]:
            return region
        inside.discard(region.pop())
    return None


def _region_step(
    region: list[torch.fx.Node], cur: torch.fx.Node, env: dict[Any, Any], index: int
) -> Step:
    """An elementwise region as a step: affine (``linear``) or quadratic (``poly``),
    read off by evaluating it at z = 0, 1, −1 and checked at other points; else refused."""

    def fn(t: Tensor) -> Tensor:
        local: dict[Any, Any] = {cur: t}

        def sub(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                if a in local:
                    return local[a]
                v = env[a]
                return v.to(t.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            if isinstance(a, (list, tuple)):
                return type(a)(sub(v) for v in a)
            return a

        for n in region:
            local[n] = n.target(*sub(n.args), **{k: sub(v) for k, v in n.kwargs.items()})  # type: ignore[operator]
        return local[region[-1]]  # type: ignore[no-any-return]

    shape = env[cur].shape[1:]
    with torch.no_grad():
        one = torch.ones((1, *shape), dtype=torch.float64)
        f0, f1, fm = fn(0 * one), fn(one), fn(-one)
        a0, a1, a2 = f0, (f1 - fm) / 2, (f1 + fm) / 2 - f0
        probe = (
            torch.randn(
                (4, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
            )
            * 3
        )
        want = fn(probe)
        got = a0 + a1 * probe + a2 * probe * probe
    names = ", ".join(str(n.target) for n in region)
    if want.shape != got.shape or not torch.allclose(
        want, got, rtol=1e-6, atol=1e-6 * (1 + float(want.abs().max()))
    ):
        raise refuse(
            index, f"{names}: an elementwise function that is not a polynomial of degree ≤ 2"
        )
    if float(a2.abs().max()) == 0.0:
        return Step("linear", f"elementwise affine ({names})", fn)
    coeffs = tuple(c.reshape(-1).numpy().copy() for c in (a0, a1, a2))
    return Step("poly", f"polynomial activation ({names})", fn, coeffs)  # type: ignore[arg-type]


def _aten_call(
    target: Any, args: Any, kwargs: dict[str, Any], chain: set[Any], env: dict[Any, Any]
) -> Callable[[Tensor], Tensor]:
    """``target(*args)`` with the data-path argument replaced by the step's input."""

    def fn(t: Tensor) -> Any:
        def sub(a: Any) -> Any:
            if isinstance(a, torch.fx.Node):
                if a in chain:
                    return t
                v = env[a]  # weights follow the data's dtype (float64 when collapsing)
                return v.to(t.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            if isinstance(a, (list, tuple)):
                return type(a)(sub(v) for v in a)
            return a

        return target(*sub(args), **{k: sub(v) for k, v in kwargs.items()})

    return fn


def read_steps(module: nn.Module, inputs: Tensor) -> list[Step]:
    """``module`` as steps, traced on (a batch of) ``inputs`` shaped as the model wants:
    a program exported with a static batch size is read on exactly that many rows."""
    from modelshield.core.loading import _ExportedModule

    batch = None
    if isinstance(module, _ExportedModule):
        batch = int(module.batch_size) if module.batch_size else None
        module = module.program
    if batch is None:
        example = inputs[:2]
    elif len(inputs) >= batch:
        example = inputs[:batch]
    else:
        example = inputs[:1].expand(batch, *inputs.shape[1:]).clone()
    if isinstance(module, torch.fx.GraphModule):
        return _graph_steps(module, example)
    if isinstance(module, torch.jit.ScriptModule):
        return _children_steps(module)
    if isinstance(module, nn.Sequential) or not list(module.children()):
        return _children_steps(module)
    try:
        ep = torch.export.export(module.eval(), (example,))
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot read the model's layers ({type(exc).__name__}); "
            "give an nn.Sequential, a TorchScript Sequential or a torch.export .pt2 file"
        ) from exc
    return _graph_steps(ep.module(), example)  # type: ignore[arg-type]


def trim_outputs(steps: list[Step]) -> tuple[list[Step], str]:
    """Strip a trailing output map (sigmoid / softmax / ReLU: monotone or argmax-neutral,
    applied after decryption or not at all); returns the steps and the map's name."""
    output = "identity"
    if steps and steps[-1].kind in ("sigmoid", "softmax", "relu"):
        output = steps[-1].kind
        steps = steps[:-1]
    return steps, output


def run_steps(steps: Sequence[Step], x: Tensor) -> Tensor:
    h: Any = x
    for s in steps:
        h = s.fn(h)
    return h  # type: ignore[no-any-return]


def dense_affine(
    steps: Sequence[Step], in_shape: tuple[int, ...]
) -> tuple[Affine, tuple[int, ...]]:
    """The dense affine map of a run of linear steps (``W = f(I) - f(0)``, ``b = f(0)``)."""
    d = int(np.prod(in_shape))
    with torch.no_grad():
        zero = run_steps(steps, torch.zeros((1, *in_shape), dtype=torch.float64))
        out_shape = tuple(int(s) for s in zero.shape[1:])
        out_dim = int(np.prod(out_shape))
        if out_dim * d > MAX_AFFINE_ENTRIES:
            raise UnsupportedModelError(
                f"the layers {', '.join(s.name for s in steps)} collapse to a {out_dim}×{d} "
                f"matrix (over {MAX_AFFINE_ENTRIES:,} entries): use a smaller model or put "
                "convolutions first, where the input is small"
            )
        cols = []
        for start in range(0, d, 1024):
            eye = torch.eye(d, dtype=torch.float64)[start : start + 1024]
            cols.append(run_steps(steps, eye.reshape(-1, *in_shape)).reshape(eye.shape[0], -1))
        w = (torch.cat(cols) - zero.reshape(1, -1)).T.numpy()
    return Affine(np.ascontiguousarray(w), zero.reshape(-1).numpy().copy()), out_shape


def to_double(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if isinstance(fn, nn.Module) and not isinstance(fn, torch.jit.ScriptModule):
        import copy

        m = copy.deepcopy(fn).double().requires_grad_(False)
        return m  # type: ignore[no-any-return]

    def run(t: Tensor) -> Tensor:
        if isinstance(fn, torch.jit.ScriptModule):
            return fn(t.float()).double()  # type: ignore[no-any-return]
        try:
            return fn(t)
        except RuntimeError:  # float32 weights in an aten call: run in float32
            return fn(t.float()).double()

    return run
