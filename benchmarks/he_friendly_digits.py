"""HE-friendly fine-tuning on bundled digits (issue 10): the accuracy cost of a quadratic.

A 64-32-10 ReLU MLP is trained on digits (1,200 train / 597 test). Then (a) its ReLU is
replaced by the least-squares quadratic over the observed range, as ``he compile`` does,
and (b) :func:`modelshield.crypto.he.train.make_he_friendly` swaps in a trainable
quadratic and fine-tunes. Both are run encrypted (throughput packing) on the test split.

    .venv/bin/python benchmarks/he_friendly_digits.py --out benchmarks/results/he_friendly_digits.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from modelshield.core.data import load_dataset
from modelshield.crypto.he import runtime
from modelshield.crypto.he.keys import load_public, make_context, public_bytes
from modelshield.crypto.he.params import choose_params
from modelshield.crypto.he.plan import compile_model, predict_labels
from modelshield.crypto.he.train import make_he_friendly


def encrypted_accuracy(
    model: nn.Module, calib: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> float:
    plan = compile_model(model, (1, 8, 8), calib)
    params = choose_params(plan.depth, max(plan.max_abs))
    ctx = make_context(params, galois=False)
    logits, _ = runtime.run_local(
        ctx, load_public(public_bytes(ctx)), plan, x.numpy(), "throughput"
    )
    return float((predict_labels(plan, logits) == y.numpy()).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/he_friendly_digits.json")
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    digits = load_dataset("digits")
    train, test = digits.subset(range(1200)), digits.subset(range(1200, 1797))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(600):
        idx = torch.randint(0, len(train), (64,))
        loss = nn.functional.cross_entropy(net(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    he_net, report = make_he_friendly(net, train, test, epochs=args.epochs, seed=0)
    report["encrypted_accuracy_fitted_relu"] = encrypted_accuracy(
        net, train.x[:1024], test.x, test.y
    )
    report["encrypted_accuracy_finetuned"] = encrypted_accuracy(
        he_net, train.x[:1024], test.x, test.y
    )
    report.update(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv)
    )
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(
        json.dumps(
            {k: v for k, v in report.items() if "fits" not in k and "coeffs" not in k}, indent=1
        )
    )


if __name__ == "__main__":
    main()
