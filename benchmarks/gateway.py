"""The defended serving gateway (issue 7): what each defence costs an attacker and an honest user.

Victim: ``small_cnn`` trained on 900 of the bundled digits (8×8, 10 classes), served by
:mod:`modelshield.serve` on 127.0.0.1 (uvicorn in a thread). The other 897 digits are split
into a test set (450, the honest user's queries and the fidelity set) and the attacker's
own 447 digits.

* **Attack**: Knockoff Nets (Orekondy et al. 2019, ``modelshield.extraction.knockoff``,
  random strategy) through :class:`~modelshield.core.oracles.HttpOracle` against the
  gateway with one defence at a time. The pool is the attacker's digits augmented (shift
  by up to one pixel, Gaussian noise 0.05) to ``--pool`` inputs; the copy (small_cnn,
  ``--epochs``) is trained from scratch at each budget of ``--queries``; fidelity is its
  top-1 agreement with the victim on the test set.
* **Honest user**: accuracy of the answers the gateway serves on the test set (and their
  top-1 agreement with the undefended model), and the latency of ``--latency-requests``
  one-row requests in a row (median, p95), each through HttpOracle (a new connection per
  request, as urllib does).
* **PRADA** (Juuti et al. 2019): W trajectories of whole query streams fed to the
  detector in-process (the gateway's code path without HTTP): ``--benign-clients``
  streams of ``--benign-queries`` test-distribution digits drawn i.i.d. (false positives),
  and ``--streams`` knockoff streams (random order of the augmented pool, and of a pool of
  uniform noise images) and Jacobian-augmentation streams (Papernot et al. 2017,
  ``modelshield.extraction.jacobian_augmentation``, 10 seeds per class, lambda 0.1). For
  each threshold ``delta`` in ``--deltas``: the fraction of streams flagged and the
  queries until the flag. The knockoff runs through the gateway with ``prada`` active also
  report whether the live attacker was flagged (``GET /stats``).
* **Detectors side by side** (``--detectors-only`` runs just this part and adds it to an
  existing ``--json`` file under ``"detectors"``): PRADA at ``--prada-delta`` and the
  ``ood`` monitor (maximum-softmax-probability KS test + predicted-class chi-square test
  against a reference set, alpha spending) at each of ``--ood-alphas``, on the same
  streams: benign (``--benign-clients`` × ``--benign-queries`` digits drawn without
  replacement from held-out digits outside the reference set), knockoff streams from the
  augmented pool, from uniform noise and from the attacker's own natural digits (in
  distribution: each of its 447 digits once, and 3000 draws with replacement), and the
  Jacobian streams. The reference set (the owner's validation data) is the first
  ``--reference-size`` test digits. Then the knockoff-over-HTTP row with
  ``--ood-http`` (``ood`` in block mode): the honest user, where the attacker is blocked,
  and the fidelity of a copy trained on the answers it got before the block.

Run inside a loopback-only namespace (ENVIRONMENT.md)::

    scripts/loopback.sh .venv/bin/python benchmarks/gateway.py \
        --json benchmarks/results/gateway_cpu.json
    scripts/loopback.sh .venv/bin/python benchmarks/gateway.py --detectors-only \
        --json benchmarks/results/gateway_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any, Literal

import torch

from modelshield import __version__
from modelshield.core.architectures import build
from modelshield.core.classifier import Classifier, from_torch
from modelshield.core.data import load_dataset
from modelshield.core.errors import OracleError
from modelshield.core.oracle import ClassifierOracle
from modelshield.core.oracles import HttpOracle
from modelshield.core.threat import QueryAccess
from modelshield.core.train import train_classifier
from modelshield.extraction import jacobian_augmentation, knockoff
from modelshield.serve.app import Backend, Gateway, create_app
from modelshield.serve.defenses import OodDefense, parse_defense
from modelshield.serve.detector import PradaMonitor
from modelshield.serve.server import serve_in_thread

logger = logging.getLogger("benchmarks.gateway")

DEFENCES = [
    "none",
    "label-only",
    "top-k=1",
    "round=1",
    "noise=0.05",
    "noise=0.5",
    "reverse-sigmoid=1.0",
    "budget=1000",
    "rate=200/s",
    "prada=0.9",
    "prada=0.9,action=block",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


# -- data and victim ----------------------------------------------------------------------------
def setup(seed: int, epochs: int) -> dict[str, Any]:
    data = load_dataset("digits")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train, test, attacker = perm[:900], perm[900:1350], perm[1350:]
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # the initial weights: torch seeds each process at random
    net = train_classifier(
        build("small_cnn", (1, 8, 8), 10), data.x[train], data.y[train], epochs=epochs, seed=seed
    )
    clf = from_torch(net, input_shape=(1, 8, 8), num_classes=10, name="digits-small_cnn")
    with torch.no_grad():
        acc = float((clf(data.x[test]).argmax(1) == data.y[test]).float().mean())
    return {
        "clf": clf,
        "test_idx": test,
        "x_all": data.x,
        "x_test": data.x[test],
        "y_test": data.y[test],
        "x_attacker": data.x[attacker],
        "y_attacker": data.y[attacker],
        "victim": {
            "arch": "small_cnn",
            "train": len(train),
            "test": len(test),
            "attacker_digits": len(attacker),
            "epochs": epochs,
            "test_accuracy": acc,
            "train_s": round(time.perf_counter() - t0, 2),
        },
    }


def augmented_pool(x: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` inputs from the attacker's digits: shifted by up to a pixel, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = x[torch.arange(size) % len(x)]
    shifts = torch.randint(-1, 2, (size, 2), generator=g)
    out = torch.empty_like(base)
    for i in range(size):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        img = torch.roll(base[i], shifts=(dy, dx), dims=(1, 2))
        if dy:
            img[:, 0 if dy > 0 else -1, :] = 0
        if dx:
            img[:, :, 0 if dx > 0 else -1] = 0
        out[i] = img
    out = (out + 0.05 * torch.randn(out.shape, generator=g)).clamp(0, 1)
    return out[torch.randperm(size, generator=g)]


# -- through HTTP --------------------------------------------------------------------------------
class Served:
    """A gateway on 127.0.0.1 with one defence (``"none"``: no defence)."""

    def __init__(
        self, clf: Classifier, defence: str, reference: torch.Tensor | None = None
    ) -> None:
        defences = [] if defence == "none" else [parse_defense(defence)]
        for d in defences:
            if isinstance(d, OodDefense):
                d.reference = reference
        self.gateway = Gateway(Backend(clf), defences)
        self.url, self._stop = serve_in_thread(create_app(self.gateway))
        self.labels = self.gateway.labels_only

    def oracle(self, client: str, **kwargs: Any) -> HttpOracle:
        kind: Literal["label", "probs"] = "label" if self.labels else "probs"
        return HttpOracle(
            self.url + "/predict",
            QueryAccess(output=kind),
            raw_output=kind,
            headers={"X-Client-Id": client},
            retries=30,
            **kwargs,
        )

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/stats", timeout=30) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def stop(self) -> None:
        self._stop()


def honest_user(served: Served, s: dict[str, Any], n_latency: int) -> dict[str, Any]:
    clf: Classifier = s["clf"]
    x, y = s["x_test"], s["y_test"]
    try:
        out = served.oracle("honest-accuracy").query(x)
    except OracleError as exc:  # e.g. a budget smaller than the test set
        return {"refused": str(exc)}
    pred = out if out.ndim == 1 else out.argmax(1)
    with torch.no_grad():
        plain = clf(x).argmax(1)
    client = served.oracle("honest-latency")
    times = []
    for i in range(n_latency):
        t0 = time.perf_counter()
        client.query(x[i % len(x) : i % len(x) + 1])
        times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "accuracy": float((pred == y).float().mean()),
        "agreement_with_undefended": float((pred == plain).float().mean()),
        "latency_ms_median": round(1000 * statistics.median(times), 3),
        "latency_ms_p95": round(1000 * times[int(0.95 * (len(times) - 1))], 3),
    }


def attack(
    served: Served, s: dict[str, Any], pool: torch.Tensor, queries: list[int], epochs: int
) -> dict[str, Any]:
    clf: Classifier = s["clf"]
    client = f"attacker-{queries[-1]}"
    oracle = served.oracle(client, max_concurrency=4)
    t0 = time.perf_counter()
    row: dict[str, Any] = {}
    try:
        _, res = knockoff(
            oracle,
            pool,
            queries=queries[-1],
            num_classes=10,
            strategy="random",
            epochs=epochs,
            seed=0,
            x_eval=s["x_test"],
            y_eval=s["y_test"],
            victim=clf,
            checkpoints=queries,
        )
        row["fidelity"] = {str(r["queries"]): r["fidelity"] for r in res.curve}
        row["copy_accuracy"] = {str(r["queries"]): r["accuracy"] for r in res.curve}
    except OracleError as exc:
        row["refused"] = str(exc)
        row["answered_before_refusal"] = served.stats()["clients"].get(client, {}).get("queries")
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    keys = {
        "prada": ("flagged", "flagged_at", "w", "min_w"),
        "ood": ("flagged", "flagged_at", "flagged_by", "tests", "ks_d", "confidence_p"),
    }
    for det in served.gateway.detectors:
        got = served.stats()["clients"].get(client, {}).get(det.name, {})
        row[det.name] = {k: got.get(k) for k in keys.get(det.name, ("flagged", "flagged_at"))}
    return row


# -- PRADA streams (in-process) --------------------------------------------------------------------
class RecordingOracle(ClassifierOracle):
    """Remembers every query, in order (to replay an attack's stream to the detector)."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__(clf, QueryAccess(output="probs"))
        self.stream: list[torch.Tensor] = []

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stream.append(x.detach().cpu().clone())
        return super()._forward(x)


def trajectory(
    stream: torch.Tensor, labels: Callable[[torch.Tensor], torch.Tensor]
) -> list[tuple[int, float]]:
    """``(query number, W)`` after every query once PRADA tests (never flags: delta ~ 0)."""
    mon = PradaMonitor(1e-9)
    ys = labels(stream)
    out = []
    for i in range(len(stream)):
        mon.update(stream[i : i + 1], ys[i : i + 1])
        if mon.last is not None and len(mon.distances) >= mon.min_samples:
            out.append((mon.queries, mon.last.w))
    return out


def summarise(trajs: list[list[tuple[int, float]]], deltas: list[float]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for delta in deltas:
        firsts = [next((q for q, w in t if w < delta), None) for t in trajs]
        hits = [f for f in firsts if f is not None]
        rows[str(delta)] = {
            "flagged": len(hits),
            "of": len(trajs),
            "rate": len(hits) / len(trajs) if trajs else None,
            "queries_until_flag_median": statistics.median(hits) if hits else None,
            "queries_until_flag_max": max(hits) if hits else None,
        }
    mins = [min(w for _, w in t) for t in trajs if t]
    return {
        "by_delta": rows,
        "min_w_median": round(statistics.median(mins), 4) if mins else None,
        "min_w_range": [round(min(mins), 4), round(max(mins), 4)] if mins else None,
        "stream_length": max((t[-1][0] for t in trajs if t), default=0),
    }


def prada_streams(
    s: dict[str, Any], args: argparse.Namespace, pool: torch.Tensor
) -> dict[str, Any]:
    clf: Classifier = s["clf"]

    def labels(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return clf(x).argmax(1)

    holdout = torch.cat([s["x_test"], s["x_attacker"]])
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    trajs = []
    for c in range(args.benign_clients):
        g = torch.Generator().manual_seed(1000 + c)
        trajs.append(
            trajectory(
                holdout[torch.randperm(len(holdout), generator=g)[: args.benign_queries]], labels
            )
        )
    out["benign_iid_digits"] = {
        **summarise(trajs, args.deltas),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    logger.info("prada benign: %s", out["benign_iid_digits"]["by_delta"])

    n = args.queries[-1]
    t0 = time.perf_counter()
    trajs = []
    for c in range(args.streams):
        g = torch.Generator().manual_seed(2000 + c)
        trajs.append(trajectory(pool[torch.randperm(len(pool), generator=g)[:n]], labels))
    out["knockoff_augmented_digits"] = {
        **summarise(trajs, args.deltas),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    logger.info("prada knockoff (digits): %s", out["knockoff_augmented_digits"]["by_delta"])

    t0 = time.perf_counter()
    trajs = []
    for c in range(args.streams):
        g = torch.Generator().manual_seed(3000 + c)
        trajs.append(trajectory(torch.rand(n, 1, 8, 8, generator=g), labels))
    out["knockoff_uniform_noise"] = {
        **summarise(trajs, args.deltas),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    logger.info("prada knockoff (noise): %s", out["knockoff_uniform_noise"]["by_delta"])

    t0 = time.perf_counter()
    trajs = []
    xa, ya = s["x_attacker"], s["y_attacker"]
    for c in range(args.jacobian_streams):
        g = torch.Generator().manual_seed(4000 + c)
        order = torch.randperm(len(xa), generator=g)
        seeds = torch.cat([xa[order][ya[order] == k][:10] for k in range(10)])
        rec = RecordingOracle(clf)
        jacobian_augmentation(
            rec,
            seeds,
            queries=args.jacobian_queries,
            num_classes=10,
            epochs=args.epochs,
            seed=c,
            lam=0.1,
        )
        trajs.append(trajectory(torch.cat(rec.stream), labels))
    out["jacobian_augmentation"] = {
        **summarise(trajs, args.deltas),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    logger.info("prada jacobian: %s", out["jacobian_augmentation"]["by_delta"])
    return out


# -- PRADA and ood side by side (in-process) ------------------------------------------------------
def _flag_summary(firsts: list[int | None]) -> dict[str, Any]:
    hits = [f for f in firsts if f is not None]
    return {
        "flagged": len(hits),
        "of": len(firsts),
        "rate": len(hits) / len(firsts) if firsts else None,
        "queries_until_flag_median": statistics.median(hits) if hits else None,
        "queries_until_flag_max": max(hits) if hits else None,
    }


def detector_streams(
    s: dict[str, Any], args: argparse.Namespace, pool: torch.Tensor
) -> dict[str, Any]:
    """Flag rates of PRADA and ood on the same streams (see the module docstring)."""
    clf: Classifier = s["clf"]
    backend = Backend(clf)
    x_ref, x_benign = s["x_reference"], s["x_benign_pool"]
    xa, ya = s["x_attacker"], s["y_attacker"]
    n = args.queries[-1]

    def g(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    streams: dict[str, Callable[[], list[torch.Tensor]]] = {
        "benign_iid_digits": lambda: [
            x_benign[torch.randperm(len(x_benign), generator=g(1000 + c))[: args.benign_queries]]
            for c in range(args.benign_clients)
        ],
        "knockoff_augmented_digits": lambda: [
            pool[torch.randperm(len(pool), generator=g(2000 + c))[:n]] for c in range(args.streams)
        ],
        "knockoff_uniform_noise": lambda: [
            torch.rand(n, 1, 8, 8, generator=g(3000 + c)) for c in range(args.streams)
        ],
        "knockoff_in_distribution_once": lambda: [
            xa[torch.randperm(len(xa), generator=g(5000 + c))] for c in range(args.streams)
        ],
        "knockoff_in_distribution_with_replacement": lambda: [
            xa[torch.randint(len(xa), (n,), generator=g(6000 + c))] for c in range(args.streams)
        ],
    }

    def jacobian() -> list[torch.Tensor]:
        out = []
        for c in range(args.jacobian_streams):
            order = torch.randperm(len(xa), generator=g(4000 + c))
            seeds = torch.cat([xa[order][ya[order] == k][:10] for k in range(10)])
            rec = RecordingOracle(clf)
            jacobian_augmentation(
                rec,
                seeds,
                queries=args.jacobian_queries,
                num_classes=10,
                epochs=args.epochs,
                seed=c,
                lam=0.1,
            )
            out.append(torch.cat(rec.stream))
        return out

    streams["jacobian_augmentation"] = jacobian
    oods = {}
    for alpha in args.ood_alphas:
        d = OodDefense(alpha, reference=x_ref)
        d.bind(backend)
        oods[alpha] = d
    with torch.no_grad():
        ref_conf = torch.softmax(clf(x_ref).double(), 1).max(1).values
    out: dict[str, Any] = {}
    for name, make in streams.items():
        t0 = time.perf_counter()
        xs = make()
        prada_first: list[int | None] = []
        ood_first: dict[float, list[int | None]] = {a: [] for a in args.ood_alphas}
        ood_by: dict[float, list[str | None]] = {a: [] for a in args.ood_alphas}
        confs = []
        for i, x in enumerate(xs):
            with torch.no_grad():
                probs = torch.softmax(clf(x).double(), 1)
            labels = probs.argmax(1)
            confs.append(float(probs.max(1).values.median()))
            mon = PradaMonitor(args.prada_delta)
            mon.update(x, labels)
            prada_first.append(mon.flagged_at)
            for alpha, d in oods.items():
                client = f"{name}-{i}"
                d.observe(client, x, labels, probs)
                st = d.client_stats(client) or {}
                ood_first[alpha].append(st.get("flagged_at"))
                ood_by[alpha].append(st.get("flagged_by"))
        out[name] = {
            "streams": len(xs),
            "stream_length": max(len(x) for x in xs),
            "median_confidence": round(statistics.median(confs), 4),
            "prada": {"delta": args.prada_delta, **_flag_summary(prada_first)},
            "ood": {
                str(a): {
                    **_flag_summary(ood_first[a]),
                    "flagged_by": {
                        k: ood_by[a].count(k) for k in ("confidence", "classes") if k in ood_by[a]
                    },
                }
                for a in args.ood_alphas
            },
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        logger.info("detectors, %s: %s", name, out[name])
    out["reference"] = {
        "size": len(x_ref),
        "median_confidence": round(float(ref_conf.median()), 4),
    }
    return out


def ood_http_runs(
    s: dict[str, Any], args: argparse.Namespace, pool: torch.Tensor
) -> list[dict[str, Any]]:
    """The knockoff-over-HTTP row with ood (block mode): who is served, who is blocked."""
    runs = []
    for defence in args.ood_http.split(";"):
        served = Served(s["clf"], defence, reference=s["x_reference"])
        try:
            honest = honest_user(served, s, args.latency_requests)
            honest["flagged"] = served.stats()["flagged"]
            attacked = attack(served, s, pool, args.queries, args.epochs)
        finally:
            served.stop()
        answered = attacked.get("answered_before_refusal")
        if answered:
            # What the blocked attacker keeps: a copy trained on the answers it got (the
            # same answers as the gateway's, which ood leaves unchanged), in-process.
            local = ClassifierOracle(s["clf"], QueryAccess(output="probs"))
            _, res = knockoff(
                local,
                pool,
                queries=answered,
                num_classes=10,
                strategy="random",
                epochs=args.epochs,
                seed=0,
                x_eval=s["x_test"],
                y_eval=s["y_test"],
                victim=s["clf"],
                checkpoints=[answered],
            )
            attacked["copy_from_answers_before_block"] = {
                "queries": answered,
                "fidelity": res.curve[-1]["fidelity"],
                "accuracy": res.curve[-1]["accuracy"],
            }
        runs.append({"defence": defence, "honest": honest, "knockoff": attacked})
        logger.info("%s: honest %s; knockoff %s", defence, honest, attacked)
    return runs


def detectors_section(
    s: dict[str, Any],
    args: argparse.Namespace,
    pool: torch.Tensor,
    command: str,
    machine: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    section: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command,
        "machine": machine,
        "config": {
            "prada_delta": args.prada_delta,
            "ood_alphas": args.ood_alphas,
            "ood_options": "min_samples=100, test_every=50, window=5000, classes=true",
            "reference": f"first {args.reference_size} of the victim's test digits",
            "benign_pool": "the other test digits and the attacker's digits "
            f"({len(s['x_benign_pool'])}), drawn without replacement",
            "ood_http": args.ood_http,
            "queries": args.queries,
            "epochs": args.epochs,
            "seed": args.seed,
        },
        "victim": s["victim"],
        "streams": detector_streams(s, args, pool),
        "http_runs": ood_http_runs(s, args, pool),
    }
    machine["loadavg_end"] = _loadavg()
    section["wall_s"] = round(time.perf_counter() - t0, 1)
    section["total_wall_s"] = round(time.perf_counter() - started, 1)
    return section


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "--queries", default="1000,3000", help="Knockoff budgets (the last is the run's)."
    )
    p.add_argument("--pool", type=int, default=4000, help="Augmented attacker pool size.")
    p.add_argument("--epochs", type=int, default=30, help="Victim, copy and substitute epochs.")
    p.add_argument("--defences", default=";".join(DEFENCES), help="';'-separated gateway defences.")
    p.add_argument("--latency-requests", type=int, default=200)
    p.add_argument("--benign-clients", type=int, default=20)
    p.add_argument("--benign-queries", type=int, default=500)
    p.add_argument("--streams", type=int, default=10, help="Knockoff streams per pool for PRADA.")
    p.add_argument("--jacobian-streams", type=int, default=5)
    p.add_argument("--jacobian-queries", type=int, default=1600)
    p.add_argument("--deltas", default="0.85,0.9,0.92,0.94,0.95")
    p.add_argument("--skip-prada-streams", action="store_true")
    p.add_argument(
        "--detectors-only",
        action="store_true",
        help="Only PRADA vs ood on the streams and the ood HTTP rows; merged into --json.",
    )
    p.add_argument("--skip-detectors", action="store_true", help="Skip PRADA vs ood.")
    p.add_argument("--prada-delta", type=float, default=0.9)
    p.add_argument("--ood-alphas", default="1e-3,1e-4")
    p.add_argument("--ood-http", default="ood=1e-4,action=block", help="';'-separated.")
    p.add_argument(
        "--reference-size", type=int, default=225, help="Test digits the owner keeps as reference."
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="Write the results here.")
    args = p.parse_args(argv)
    args.queries = [int(q) for q in args.queries.split(",")]
    args.deltas = [float(d) for d in args.deltas.split(",")]
    args.ood_alphas = [float(a) for a in args.ood_alphas.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("modelshield.core.oracles.http").setLevel(logging.ERROR)  # 429 retries
    logging.getLogger("modelshield.serve.defenses").setLevel(logging.ERROR)  # PRADA flags
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    started = time.perf_counter()

    s = setup(args.seed, args.epochs)
    logger.info("victim: %s", s["victim"])
    test_idx = s["test_idx"]
    s["x_reference"] = s["x_all"][test_idx[: args.reference_size]]
    s["x_benign_pool"] = torch.cat([s["x_all"][test_idx[args.reference_size :]], s["x_attacker"]])
    pool = augmented_pool(s["x_attacker"], args.pool, args.seed)
    command = "python benchmarks/gateway.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "modelshield": __version__,
    }
    if args.detectors_only:
        previous: dict[str, Any] = {}
        if args.json and os.path.exists(args.json):
            with open(args.json) as fh:
                previous = json.load(fh)
        previous["detectors"] = detectors_section(s, args, pool, command, machine, started)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(previous, fh, indent=2)
            logger.info("wrote %s", args.json)
        return previous
    runs = []
    for defence in args.defences.split(";"):
        served = Served(s["clf"], defence)
        try:
            honest = honest_user(served, s, args.latency_requests)
            attacked = attack(served, s, pool, args.queries, args.epochs)
        finally:
            served.stop()
        if defence.startswith("budget="):  # what one identity can take within its budget
            budget = int(defence.split("=")[1].split(",")[0])
            fresh = Served(s["clf"], defence)
            try:
                budgets = [q for q in args.queries if q <= budget] or [budget]
                attacked["within_budget"] = attack(fresh, s, pool, budgets, args.epochs)
            finally:
                fresh.stop()
        runs.append({"defence": defence, "honest": honest, "knockoff": attacked})
        logger.info("%s: honest %s; knockoff %s", defence, honest, attacked)

    result: dict[str, Any] = {
        "benchmark": "gateway",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": command,
        "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "victim": s["victim"],
        "knockoff": {
            "pool": f"{args.pool} attacker digits, shifted <= 1 px + N(0, 0.05) noise",
            "strategy": "random",
            "copy_arch": "small_cnn",
        },
        "runs": runs,
    }
    if not args.skip_prada_streams:
        result["prada_streams"] = prada_streams(s, args, pool)
    if not args.skip_detectors:
        result["detectors"] = detectors_section(s, args, pool, command, dict(machine), started)
    result["machine"]["loadavg_end"] = _loadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        logger.info("wrote %s", args.json)
    return result


if __name__ == "__main__":
    main()
