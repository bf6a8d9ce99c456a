"""A deep ReLU CNN under encryption (issue 10): how the ReLU stand-ins are fitted matters.

``small_cnn`` (three 3×3 conv + ReLU layers, global average pooling, a linear head; width
8) is trained on bundled digits (1,200 train / 597 test). Its ReLUs must become degree-2
polynomials for CKKS. The script compares, on the test split (never used for fitting):

* ``one-quadratic-per-layer``: one least-squares quadratic per ReLU layer over its
  observed range (CryptoNets / Hesamifard et al. 2017), the compiler's former rule;
* ``per-unit``: one quadratic per neuron fitted to the model's own activations, as
  ``he compile`` now does by default (with its end-to-end refinement);
* ``finetuned``: ``make_he_friendly`` (``he finetune``): trainable quadratics, fine-tuned.

It reports each plan's plaintext agreement with the ReLU model and accuracy, then runs the
per-unit and fine-tuned plans encrypted (throughput packing) on ``--encrypted`` test
samples and checks the decrypted predictions against the plans' plaintext ones.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/he_deep_relu.py --out benchmarks/results/he_deep_relu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from modelshield.core.architectures import small_cnn
from modelshield.core.data import load_dataset
from modelshield.crypto.he import runtime
from modelshield.crypto.he.keys import load_public, make_context, public_bytes
from modelshield.crypto.he.params import choose_params
from modelshield.crypto.he.plan import Plan, compile_model, predict_labels
from modelshield.crypto.he.train import make_he_friendly


def plaintext(plan: Plan, x: torch.Tensor, ref: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    pred = torch.from_numpy(predict_labels(plan, plan.forward(x)))
    return {
        "agreement_with_model": float((pred == ref).double().mean()),
        "accuracy": float((pred == y).double().mean()),
    }


def encrypted(plan: Plan, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    params = choose_params(plan.depth, max(plan.max_abs))
    ctx = make_context(params, galois=False)
    started = time.perf_counter()
    logits, _ = runtime.run_local(
        ctx, load_public(public_bytes(ctx)), plan, x.numpy(), "throughput"
    )
    seconds = time.perf_counter() - started
    pred = predict_labels(plan, logits)
    plain = predict_labels(plan, plan.forward(x))
    return {
        "n": len(y),
        "encrypted_accuracy": float((pred == y.numpy()).mean()),
        "agreement_with_plan": float((pred == plain).mean()),
        "seconds": seconds,
        "samples_per_second": len(y) / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/he_deep_relu.json")
    ap.add_argument("--steps", type=int, default=600, help="training steps of the ReLU CNN")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--encrypted", type=int, default=64, help="test samples run encrypted")
    args = ap.parse_args()
    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    torch.manual_seed(0)
    net = small_cnn((1, 8, 8), 10, width=8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(args.steps):
        idx = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        ref = net(test.x).argmax(1)
    calib = train.x[:1024]
    rows: dict[str, dict[str, object]] = {
        "relu_model": {"accuracy": float((ref == test.y).double().mean())}
    }
    t = time.perf_counter()
    old = compile_model(net, (1, 8, 8), calib, fits=[("layer", 0.5)], refine=False)
    rows["one-quadratic-per-layer"] = {
        **plaintext(old, test.x, ref, test.y),
        "compile_s": time.perf_counter() - t,
    }
    t = time.perf_counter()
    new = compile_model(net, (1, 8, 8), calib)
    rows["per-unit"] = {
        **plaintext(new, test.x, ref, test.y),
        "compile_s": time.perf_counter() - t,
        "fidelity": new.fidelity,
    }
    he_net, rep = make_he_friendly(net, train, test, epochs=args.finetune_epochs, lr=3e-3)
    ft = compile_model(he_net, (1, 8, 8), calib)
    with torch.no_grad():
        ft_ref = he_net(test.x).argmax(1)
    rows["finetuned"] = {**plaintext(ft, test.x, ft_ref, test.y), "finetune": rep}
    k = args.encrypted
    rows["per-unit"]["encrypted"] = encrypted(new, test.x[:k], test.y[:k])
    rows["finetuned"]["encrypted"] = encrypted(ft, test.x[:k], test.y[:k])
    result = {
        "model": "small_cnn width 8 (3 conv+ReLU, avg pool, linear), digits 1200/597",
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
