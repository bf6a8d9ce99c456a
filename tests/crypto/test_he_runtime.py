"""Encrypted execution against plaintext torch outputs, per layer type and packing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

ts = pytest.importorskip("tenseal")

from modelshield.core.errors import DataError, InvalidConfigError, UnsupportedModelError  # noqa: E402
from modelshield.crypto.he import runtime  # noqa: E402
from modelshield.crypto.he.keys import load_public, make_context, public_bytes  # noqa: E402
from modelshield.crypto.he.params import SEAL_128_MAX_BITS, choose_params  # noqa: E402
from modelshield.crypto.he.plan import (  # noqa: E402
    Plan,
    apply_output,
    compile_model,
    load_plan,
)
from modelshield.crypto.he.train import PolyAct, Square  # noqa: E402

TOL = 1e-3  # |decrypted − plaintext| relative to max(1, max |output|), scale ≥ 2^26


def _encrypted(plan: Plan, x: torch.Tensor, modes: tuple[str, ...]) -> dict[str, np.ndarray]:
    params = choose_params(plan.depth, max(plan.max_abs))
    assert params.total_bits <= SEAL_128_MAX_BITS[params.poly_modulus_degree]
    ctx = make_context(params, galois="latency" in modes)
    pub = load_public(public_bytes(ctx))
    # latency mode costs ~0.3-1 s a sample: two samples show the chain is right
    return {
        m: runtime.run_local(ctx, pub, plan, (x if m == "throughput" else x[:2]).numpy(), m)[0]
        for m in modes
    }


def _check(model: nn.Module, shape: tuple[int, ...], x: torch.Tensor, **kw: Any) -> Plan:
    """Plan == torch model exactly (exact layers), and decrypted == plan within TOL."""
    model.eval()
    plan = compile_model(model, shape, x, **kw)
    with torch.no_grad():
        ref = model(x).double().numpy()
    np.testing.assert_allclose(apply_output(plan, plan.forward(x)), ref, rtol=1e-5, atol=1e-6)
    modes = ("throughput", "latency")
    for mode, out in _encrypted(plan, x, modes).items():
        err = np.abs(apply_output(plan, out) - ref[: len(out)]).max()
        assert err <= TOL * max(1.0, np.abs(ref).max()), (mode, err)
    return plan


def test_params_follow_depth_and_seal_bounds() -> None:
    p = choose_params(3, 10.0)
    assert p.poly_modulus_degree == 8192 and p.total_bits <= 218 and p.scale_bits >= 26
    assert len(p.coeff_mod_bit_sizes) == 5 and "128-bit" in p.to_dict()["security"]
    deep = choose_params(8, 10.0)
    assert deep.poly_modulus_degree == 16384 and deep.total_bits <= 438
    assert choose_params(3, 10.0, min_slots=8192).poly_modulus_degree == 16384
    with pytest.raises(InvalidConfigError, match="depth 40"):
        choose_params(40, 10.0, min_scale_bits=40)


def test_logistic_regression_on_tabular_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 1), nn.Sigmoid())
    x = torch.randn(40, 6)
    plan = _check(model, (6,), x)
    assert plan.output == "sigmoid" and plan.depth == 1


def test_mlp_with_square_and_biases_in_both_packings() -> None:
    # the bias-after-mm trap (TenSEAL #462) would show here: every layer has a bias
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 8), Square(), nn.Linear(8, 8), Square(), nn.Linear(8, 3))
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.bias, -0.5, 0.5)
    plan = _check(model, (12,), torch.rand(20, 12))
    assert [la if isinstance(la, str) else "affine" for la in plan.layers] == [
        "affine", "square", "affine", "square", "affine",
    ]  # fmt: skip


def test_conv_first_cnn_with_batchnorm_avgpool_and_polyact() -> None:
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, stride=1, padding=1),
        bn,
        nn.AvgPool2d(2),
        PolyAct((0.1, 0.5, 0.3)),
        nn.Flatten(),
        nn.Linear(48, 5),
    )
    plan = _check(model, (1, 8, 8), torch.rand(16, 1, 8, 8))
    assert plan.affines[0].shape == (48, 64)  # conv + BN + pool folded into one map


def test_relu_model_gets_a_fitted_polynomial_and_stays_close() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(200, 10)
    plan = compile_model(model, (10,), x)
    assert plan.activations[0]["kind"] == "relu" and "quadratic fitted" in plan.notes[0]
    lo, hi = plan.activations[0]["range"]
    assert lo < 0 < hi
    with torch.no_grad():
        ref = model(x).numpy()
    approx = plan.forward(x)
    assert np.abs(approx - ref).max() < 0.3 * np.abs(ref).max()
    out = _encrypted(plan, x, ("throughput",))["throughput"]
    assert np.abs(out - approx).max() <= TOL * max(1.0, np.abs(approx).max())


def test_torch_export_graph_and_torchscript_compile_the_same_plan() -> None:
    from modelshield.core.loading import _ExportedModule

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, stride=2)
            self.fc = nn.Linear(18, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            h = h * h
            return self.fc(h.view(h.shape[0], -1))

    torch.manual_seed(4)
    net = Net().eval()
    x = torch.rand(8, 1, 7, 7)
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(net, (x,), dynamic_shapes=({0: batch},))
    plan = _check(_ExportedModule(prog.module(), None), (1, 7, 7), x)
    seq = nn.Sequential(net.conv, Square(), nn.Flatten(), net.fc)
    scripted = torch.jit.script(seq)
    plan2 = compile_model(scripted, (1, 7, 7), x)
    np.testing.assert_allclose(plan2.affines[0].w, plan.affines[0].w, atol=1e-6)


def test_plan_round_trips_through_its_directory(tmp_path: Any) -> None:
    model = nn.Sequential(nn.Linear(4, 3), Square(), nn.Linear(3, 2))
    x = torch.rand(5, 4)
    plan = compile_model(model, (4,), x)
    plan.save(tmp_path / "plan")
    again = load_plan(tmp_path / "plan")
    np.testing.assert_allclose(again.forward(x), plan.forward(x))


def test_unsupported_layers_are_named_with_a_fix() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 2))
    with pytest.raises(
        UnsupportedModelError, match=r"layer 1 \(1 \(MaxPool2d\)\).*average pooling"
    ):
        compile_model(model, (1, 8, 8))
    with pytest.raises(UnsupportedModelError, match="Tanh"):
        compile_model(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)), (3,))

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x + self.a(x))

    with pytest.raises(UnsupportedModelError, match="residual"):
        compile_model(Residual(), (4,))


def test_wrong_input_shapes_are_refused() -> None:
    plan = compile_model(nn.Sequential(nn.Linear(4, 2)), (4,))
    with pytest.raises(DataError, match=r"shape \(3, 5\).*\(n, 4\)"):
        plan.forward(np.zeros((3, 5)))
    params = choose_params(plan.depth, 1.0)
    ctx = make_context(params, galois=False)
    with pytest.raises(DataError, match="one ciphertext per input feature"):
        runtime.evaluate(
            ctx, plan, runtime.encrypt(ctx, plan, np.zeros((2, 4)), "throughput")[:3], "throughput"
        )


def test_public_context_cannot_decrypt() -> None:
    params = choose_params(1, 1.0)
    ctx = make_context(params, galois=False)
    data = public_bytes(ctx)
    pub = ts.context_from(data)
    assert not pub.is_private() and not pub.has_secret_key()
    enc = ts.ckks_vector(ctx, [1.0, 2.0, 3.0])
    on_server = ts.ckks_vector_from(pub, enc.serialize())
    with pytest.raises(ValueError):
        on_server.decrypt()
    with pytest.raises(ValueError):
        pub.secret_key()
    plan = compile_model(nn.Sequential(nn.Linear(3, 2)), (3,))
    blobs = runtime.encrypt(ctx, plan, np.ones((2, 3)), "throughput")
    with pytest.raises(InvalidConfigError, match="secret key"):
        runtime.decrypt(pub, blobs, 2, "throughput", 2)
    # and the server refuses a context that carries the secret key
    with pytest.raises(InvalidConfigError, match="secret key"):
        load_public(ctx.serialize(save_secret_key=True))


def test_choose_mode_by_request_size() -> None:
    plan = compile_model(nn.Sequential(nn.Linear(64, 16), Square(), nn.Linear(16, 10)), (64,))
    params = choose_params(plan.depth, 10.0)
    assert runtime.choose_mode(plan, params, 1) == "latency"
    assert runtime.choose_mode(plan, params, 1000) == "throughput"


def test_static_batch_export_is_compiled_through_its_rebatching_wrapper() -> None:
    from modelshield.core.loading import _ExportedModule

    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    prog = torch.export.export(net, (torch.rand(2, 1, 3, 3),))  # batch fixed at 2
    x = torch.rand(16, 1, 3, 3)
    plan = compile_model(_ExportedModule(prog.module(), 2), (1, 3, 3), x)
    ref = compile_model(net, (1, 3, 3), x)
    np.testing.assert_allclose(plan.forward(x), ref.forward(x), atol=1e-9)
    assert plan.activations[0]["kind"] == "relu"


def test_a_constant_beyond_the_ckks_range_is_a_clear_error() -> None:
    """SEAL's 'encoded value is too large' becomes a one-line DataError naming the range."""
    from modelshield.crypto.layers import Affine

    w = np.eye(4)
    plan = Plan(
        input_shape=(4,),
        layers=[Affine(w, np.zeros(4)), "square", Affine(w, np.full(4, 1e30))],
        max_abs=[1.0, 1.0, 1.0, 1.0],
    )
    with pytest.raises(DataError, match="left the range the CKKS parameters were chosen for"):
        _encrypted(plan, torch.rand(3, 4), ("throughput",))
