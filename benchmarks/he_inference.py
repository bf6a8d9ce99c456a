"""Encrypted inference on MNIST (issue 10): modelshield's plans vs naive TenSEAL.

Trains two models on MNIST (normalised as the TenSEAL tutorial): a 784-128-10 MLP with a
square activation and the TenSEAL-tutorial CNN (Conv2d(1, 4, 7, stride 3) → square →
Linear(256, 64) → square → Linear(64, 10)). For each, in one run:

- modelshield, throughput packing (SIMD across samples) on the test set: encrypted vs
  plaintext accuracy, argmax agreement, max |error|, samples/s;
- modelshield, latency packing (one sample per ciphertext): seconds per sample;
- the naive TenSEAL baseline, one sample per ciphertext as the tutorial writes it
  (``enc.mm(W) + b`` for the linear layers, ``im2col_encoding`` + ``conv2d_im2col`` +
  ``pack_vectors`` for the CNN's convolution, tutorial parameters N=8192,
  [31, 26×6, 31], scale 2^26): seconds per sample and max |error| against plaintext.

    .venv/bin/python benchmarks/he_inference.py --out benchmarks/results/he_inference.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dp_mnist import load_mnist

from modelshield.crypto.he import runtime
from modelshield.crypto.he.keys import load_public, make_context, public_bytes
from modelshield.crypto.he.params import choose_params
from modelshield.crypto.he.plan import compile_model
from modelshield.crypto.he.train import Square


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), Square(), nn.Linear(128, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, kernel_size=7, padding=0, stride=3),
        Square(),
        nn.Flatten(),
        nn.Linear(256, 64),
        Square(),
        nn.Linear(64, 10),
    )


def train(model: nn.Module, data: dict[str, torch.Tensor], epochs: int, seed: int) -> float:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data["x_train"], data["y_train"]
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())


def naive_context() -> Any:
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[31, 26, 26, 26, 26, 26, 26, 31]
    )
    ctx.global_scale = 2**26
    ctx.generate_galois_keys()
    return ctx


def naive_sample(ctx: Any, model: nn.Module, x: torch.Tensor, kind: str) -> np.ndarray:
    """The tutorial's way: one sample, ``mm`` + plain bias (and im2col for the CNN)."""
    import tenseal as ts

    lin = [m for m in model if isinstance(m, nn.Linear)]
    if kind == "mlp":
        enc = ts.ckks_vector(ctx, x.reshape(-1).tolist())
    else:
        conv = model[0]
        enc_x, windows = ts.im2col_encoding(ctx, x.view(28, 28).tolist(), 7, 7, 3)
        chans = [
            enc_x.conv2d_im2col(k, windows) + b
            for k, b in zip(conv.weight.view(4, 7, 7).tolist(), conv.bias.tolist(), strict=True)
        ]
        enc = ts.CKKSVector.pack_vectors(chans)
        enc.square_()
    for i, layer in enumerate(lin):
        enc = enc.mm(layer.weight.T.tolist()) + layer.bias.tolist()
        if i < len(lin) - 1:
            enc.square_()
    return np.asarray(enc.decrypt())


def bench(name: str, model: nn.Module, data: dict[str, torch.Tensor], args: Any) -> dict[str, Any]:
    x = data["x_test"][: args.limit]
    y = data["y_test"][: args.limit].numpy()
    t = time.perf_counter()
    plan = compile_model(model, (1, 28, 28), data["x_train"][:1024])
    compile_s = time.perf_counter() - t
    params = choose_params(plan.depth, max(plan.max_abs))
    ctx = make_context(params, galois=True)
    pub = load_public(public_bytes(ctx))
    with torch.no_grad():
        plain = model(x).double().numpy()
    enc, thr = runtime.run_local(ctx, pub, plan, x.numpy(), "throughput")
    k = args.latency_samples
    t = time.perf_counter()
    runtime.run_local(ctx, pub, plan, x[-1:].numpy(), "latency")  # encodes the diagonals once
    warmup_s = time.perf_counter() - t
    lat_out, lat = runtime.run_local(ctx, pub, plan, x[:k].numpy(), "latency")
    nctx = naive_context()
    kn = args.naive_samples
    t = time.perf_counter()
    naive = np.stack([naive_sample(nctx, model, x[i], name) for i in range(kn)])
    naive_s = (time.perf_counter() - t) / kn
    enc_pred, plain_pred = enc.argmax(1), plain.argmax(1)
    return {
        "model": name,
        "plan": plan.summary()["layers"],
        "params": params.to_dict(),
        "compile_seconds": compile_s,
        "n": len(y),
        "plaintext_accuracy": float((plain_pred == y).mean()),
        "encrypted_accuracy": float((enc_pred == y).mean()),
        "argmax_agreement": float((enc_pred == plain_pred).mean()),
        "max_abs_error_throughput": float(np.abs(enc - plain).max()),
        "max_abs_error_latency": float(np.abs(lat_out - plain[:k]).max()),
        "max_abs_logit": float(np.abs(plain).max()),
        "throughput": {**thr, "samples_per_second": len(y) / thr["seconds"]},
        "latency": {
            **lat,
            "samples": k,
            "seconds_per_sample": lat["seconds"] / k,
            "first_request_seconds": warmup_s,
        },
        "naive_tenseal": {
            "samples": kn,
            "seconds_per_sample": naive_s,
            "samples_per_second": 1 / naive_s,
            "max_abs_error": float(np.abs(naive - plain[:kn]).max()),
            "argmax_agreement": float((naive.argmax(1) == plain_pred[:kn]).mean()),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/he_inference.json")
    ap.add_argument("--limit", type=int, default=10000, help="test samples (throughput mode)")
    ap.add_argument("--latency-samples", type=int, default=3)
    ap.add_argument("--naive-samples", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "models": [],
    }
    for name, factory in (("mlp", mlp), ("cnn", cnn)):
        model = factory()
        t = time.perf_counter()
        acc = train(model, data, args.epochs, args.seed)
        print(
            f"{name}: trained in {time.perf_counter() - t:.0f} s, test accuracy {acc:.4f}",
            flush=True,
        )
        r = bench(name, model, data, args)
        results["models"].append(r)
        print(
            json.dumps({k: v for k, v in r.items() if k not in ("plan", "params")}, indent=1),
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
