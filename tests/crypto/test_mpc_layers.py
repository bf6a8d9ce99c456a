"""MPC layers against plaintext: each supported layer, on fresh random inputs, in fixed point.

These run the secure program with one in-process MPyC party (the same arithmetic,
truncation and comparisons as a multi-party run, without the network); the real
multi-process runs are in ``test_mpc_cli.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

if importlib.util.find_spec("mpyc") is None:  # not importorskip: MPyC parses sys.argv on import
    pytest.skip("MPyC is not installed", allow_module_level=True)

from modelshield.core.errors import UnsupportedModelError
from modelshield.crypto.mpc.engine import run_local
from modelshield.crypto.mpc.model import compile_model, load_mpc_model
from tests.crypto.mpc_helpers import LAYERS, check_labels, layer_error, make_net


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_matches_plaintext(name: str) -> None:
    err, bound, seed = layer_error(name, run_local)
    assert err <= bound, f"{name}: |MPC - plaintext| = {err:.2e} > {bound:.2e} (seed {seed})"


def test_argmax_and_threshold_labels() -> None:
    check_labels(run_local)


def test_more_fractional_bits_less_error() -> None:
    net, shape = make_net("relu", 0)
    x = np.random.default_rng(1).random((32, 10))
    model = compile_model(net, shape)
    ref = model.forward(x)
    errs = {f: float(np.abs(run_local(model, x, frac_bits=f) - ref).max()) for f in (6, 10, 16)}
    assert errs[6] > errs[10] > errs[16], errs
    assert errs[16] < 1e-3 < errs[6], errs


def test_trailing_softmax_is_dropped_and_tanh_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.Softmax(dim=1)).eval()
    m = compile_model(net, (4,))
    assert [la.kind for la in m.layers] == ["affine"] and m.output == "softmax"
    with pytest.raises(UnsupportedModelError, match="Tanh"):
        compile_model(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval(), (4,))
    with pytest.raises(UnsupportedModelError, match="MaxPool2d"):
        compile_model(
            nn.Sequential(
                nn.Conv2d(1, 1, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 2)
            ).eval(),
            (1, 6, 6),
        )


def test_a_party_listens_on_its_own_address_only() -> None:
    """MPyC binds every interface by default; a modelshield party binds its own HOST."""
    import asyncio

    from modelshield.crypto.mpc.commands import free_ports
    from modelshield.crypto.mpc.engine import make_runtime

    ports = free_ports(2)
    rt = make_runtime(1, [("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])])
    loop = rt._loop
    server = loop.run_until_complete(loop.create_server(asyncio.Protocol, port=ports[1]))
    try:
        assert [s.getsockname() for s in server.sockets] == [("127.0.0.1", ports[1])]
    finally:
        server.close()
        loop.run_until_complete(server.wait_closed())


def test_model_files_torchscript_and_state_dict(tmp_path: Path) -> None:
    """The same loader as everywhere else: TorchScript, and state_dict + --arch."""
    from tests.conftest import tiny_net

    torch.manual_seed(0)
    net = tiny_net().eval()
    x = np.random.default_rng(0).random((8, 36))
    with torch.no_grad():
        ref = net(torch.from_numpy(x).float().reshape(8, 1, 6, 6)).double().numpy()
    torch.jit.save(torch.jit.script(net), tmp_path / "model.ts")
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    for path, arch in (
        (tmp_path / "model.ts", None),
        (tmp_path / "weights.pt", "tests.conftest:tiny_net"),
    ):
        model, _ = load_mpc_model(str(path), (1, 6, 6), arch=arch)
        assert np.abs(model.forward(x) - ref).max() < 1e-5
        assert np.abs(run_local(model, x) - ref).max() < 1e-2


@pytest.mark.parametrize("kind", ["logistic", "linear"])
def test_training_program_matches_plaintext_gd(kind: str) -> None:
    """The MPC training program (one in-process party) against the same algorithm in float."""
    from modelshield.crypto.mpc.engine import make_runtime, run_program
    from modelshield.crypto.mpc.train import plaintext_gd, train_program

    rng = np.random.default_rng(0)
    x = rng.random((60, 4))
    y = (x @ np.array([1.0, -2.0, 0.5, 1.0]) > 0.25).astype(np.int64)
    prog = train_program(
        role="data", frac_bits=16, int_bits=16, epochs=15, lr=0.5, kind=kind, xy=(x, y)
    )
    r = run_program(make_runtime(), prog, timeout=120)
    w, b = plaintext_gd([(x, y)], epochs=15, lr=0.5, kind=kind)
    assert np.abs(r["weights"]["w"] - w).max() < 1e-3
    assert abs(float(r["weights"]["b"][0]) - b) < 1e-3
    assert np.abs(w).max() > 0.05  # it did learn something the comparison can miss


def _convmake_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 2, dilation=2, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("fmt", ["module", "torchscript", "export"])
def test_convolutions_are_im2col_with_batchnorm_folded(fmt: str, tmp_path: Path) -> None:
    """Only the kernels are shared (no unrolled matrix); padding, stride, dilation, BN."""
    net = _convmake_net()
    x = torch.rand((6, 2, 7, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x).double().numpy()
    if fmt == "module":
        model = compile_model(net, (2, 7, 7))
    else:
        path = tmp_path / "m"
        if fmt == "torchscript":
            torch.jit.save(torch.jit.script(net), path)
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            torch.export.save(
                torch.export.export(net, (x[:2],), dynamic_shapes=({0: batch},)), path
            )
        model, _ = load_mpc_model(str(path), (2, 7, 7))
    assert [la.kind for la in model.layers] == ["conv", "relu", "conv", "relu", "affine"]
    convs = [la.spec() for la in model.layers if la.kind == "conv"]
    assert [(c["in"], c["out"], c["out_shape"]) for c in convs] == [
        (18, 3, [3, 4, 4]),
        (12, 4, [4, 2, 2]),
    ]
    xf = x.double().reshape(6, -1).numpy()
    assert np.abs(model.forward(xf) - ref).max() < 1e-6
    assert np.abs(run_local(model, xf) - ref).max() < 1e-3


def test_grouped_convolution_falls_back_to_the_unrolled_matrix() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(36, 3)).eval()
    model = compile_model(net, (2, 5, 5))
    assert [la.kind for la in model.layers] == ["affine"]
    x = np.random.default_rng(0).random((4, 50))
    with torch.no_grad():
        ref = net(torch.from_numpy(x).float().reshape(4, 2, 5, 5)).double().numpy()
    assert np.abs(run_local(model, x) - ref).max() < 1e-3
