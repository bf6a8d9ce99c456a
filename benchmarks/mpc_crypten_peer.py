"""CrypTen as the peer of ``mpc_inference.py``: the same MLPs, 3 parties, batch 1 and 100.

CrypTen 0.4.1 is not a dependency of modelshield (it depends on the retired ``sklearn``
name and on torch.onnx internals that moved in torch 2.13). For this benchmark only, it
is installed ``--no-deps`` into a throwaway directory with the two packages it imports:

    .venv/bin/pip install --no-deps --target /tmp/crypten_site crypten==0.4.1 \\
        omegaconf antlr4-python3-runtime==4.9.3
    PYTHONPATH=/tmp/crypten_site scripts/loopback.sh .venv/bin/python \\
        benchmarks/mpc_crypten_peer.py --out benchmarks/results/mpc_crypten_peer.json

and two shims make it import and export: ``torch.onnx._internal.registration`` is aliased
to its new home and ``torch.onnx.export`` is called with ``dynamo=False``. CrypTen runs
its parties as processes over gloo on 127.0.0.1 (``run_multiprocess``), with its default
trusted-first-party provider for multiplication triples — a weaker trust model than
MPyC's honest majority, where no party is trusted.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

SIZES = {
    "digits-mlp-64-32-10": ([64, 32, 10], (1, 8, 8)),
    "mnist-mlp-784-128-10": ([784, 128, 10], (1, 28, 28)),
}


def _shims() -> Any:
    reg = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
    sys.modules.setdefault("torch.onnx._internal.registration", reg)
    torch.onnx.export = functools.partial(torch.onnx.export, dynamo=False)  # type: ignore[assignment]
    import crypten  # type: ignore[import-not-found]

    return crypten


def mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "mpc_crypten_peer.json"
    )
    ap.add_argument("--parties", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    crypten = _shims()
    import crypten.communicator as comm  # type: ignore[import-not-found]
    import crypten.mpc as cmpc  # type: ignore[import-not-found]

    results: dict[str, Any] = {
        "benchmark": "mpc_crypten_peer",
        "date": date.today().isoformat(),
        "command": "PYTHONPATH=/tmp/crypten_site scripts/loopback.sh .venv/bin/python "
        "benchmarks/mpc_crypten_peer.py " + " ".join(sys.argv[1:]),
        "crypten": getattr(crypten, "__version__", "0.4.1"),
        "torch": torch.__version__,
        "parties": args.parties,
        "models": {},
    }
    out_q: dict[str, Any] = {}

    for name, (sizes, shape) in SIZES.items():
        torch.manual_seed(0)
        net = mlp(sizes)

        @cmpc.run_multiprocess(world_size=args.parties)
        def run(net: nn.Module = net, shape: tuple[int, ...] = shape, name: str = name) -> None:
            torch.set_num_threads(1)
            crypten.cfg.communicator.verbose = True
            res: dict[str, Any] = {}
            for b in (1, 100):
                x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(1))
                private = crypten.nn.from_pytorch(net, x)
                private.encrypt(src=0)  # party 0: the model owner
                xe = crypten.cryptensor(x, src=1)  # party 1: the data owner
                private(xe).get_plain_text()  # warm-up
                c = comm.get()
                c.reset_communication_stats()
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    out = private(xe).get_plain_text(dst=1)
                dt = (time.perf_counter() - t0) / args.reps
                stats = c.get_communication_stats()
                res[str(b)] = {
                    "seconds_per_batch": dt,
                    "bytes_per_batch": stats["bytes"] / args.reps,
                    "max_abs_error": float((out - net(x).detach()).abs().max())
                    if c.get_rank() == 1
                    else None,
                }
            Path(f"/tmp/crypten_{name}_{comm.get().get_rank()}.json").write_text(json.dumps(res))

        run()
        per_party = [
            json.loads(Path(f"/tmp/crypten_{name}_{r}.json").read_text())
            for r in range(args.parties)
        ]
        out_q[name] = {
            b: {
                "seconds_per_batch": max(p[b]["seconds_per_batch"] for p in per_party),
                "bytes_per_party_per_batch": [p[b]["bytes_per_batch"] for p in per_party],
                "max_abs_error": per_party[1][b]["max_abs_error"],
            }
            for b in ("1", "100")
        }
        print(name, json.dumps(out_q[name]), flush=True)
    results["models"] = out_q
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
