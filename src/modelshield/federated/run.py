"""``modelshield fl``: one federated run, or the same attack under several aggregators,
with ``result.json`` and a report. Each run's rounds are kept under ``OUT/runs/NAME``; a
re-run with the same settings reuses the runs that finished (resume)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from modelshield.core.device import select_device
from modelshield.core.errors import PrivacyBudgetExceeded
from modelshield.core.io import atomic_write_json
from modelshield.core.results import ProbeResult
from modelshield.federated.task import FLConfig, train_test
from modelshield.report import build_report, write_reports
from modelshield.scan.rubric import grade_susceptibility, rubric_document
from modelshield.scan.rundir import run_record

logger = logging.getLogger(__name__)

BASELINE = "no-attack"


def check_budget(cfg: FLConfig) -> None:
    """Central DP: refuse, before anything runs, a run whose rounds would spend more than
    ``max_epsilon`` (the strategy also checks before every round)."""
    if cfg.dp != "central" or cfg.max_epsilon <= 0:
        return
    from modelshield.privacy.accounting import compute_epsilon

    eps = compute_epsilon(
        sample_rate=cfg.fraction,
        noise_multiplier=cfg.noise_multiplier,
        steps=cfg.rounds,
        delta=cfg.delta,
    )
    if eps > cfg.max_epsilon:
        raise PrivacyBudgetExceeded(
            f"{cfg.rounds} rounds at q={cfg.fraction:g}, sigma={cfg.noise_multiplier:g} would spend "
            f"epsilon {eps:.3f} > --max-epsilon {cfg.max_epsilon:g}"
        )


def plan_runs(cfg: FLConfig, compare: list[str]) -> dict[str, FLConfig]:
    """The runs to make: the configured one, or a no-attack baseline and the attack under
    every aggregator of ``compare``."""
    if not compare:
        return {cfg.aggregator: cfg}
    runs: dict[str, FLConfig] = {}
    if cfg.attack:
        runs[BASELINE] = replace(cfg, attack="", malicious=0.0, aggregator="fedavg")
    for name in compare:
        runs[name] = replace(cfg, aggregator=name)
    return runs


def _finished(path: Path, cfg: FLConfig) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("config") != cfg.to_run_config() or len(doc.get("rounds", [])) != cfg.rounds + 1:
        return None
    return doc  # type: ignore[no-any-return]


def _series(rounds: list[dict[str, Any]], key: str) -> list[float | None]:
    return [r.get(key) for r in rounds]


def run_probe(name: str, cfg: FLConfig, rounds: list[dict[str, Any]], seed: int) -> ProbeResult:
    """The report section of one run: accuracy and ASR per round."""
    last = rounds[-1]
    attack = (
        f"{cfg.attack} by {cfg.n_malicious} of {cfg.num_clients} clients"
        if cfg.attack
        else "no attack"
    )
    grade, rule = (None, "informational")
    if cfg.attack == "backdoor":
        grade, rule = grade_susceptibility(last["asr"])
    eps = last.get("epsilon")
    dp_text = f"; client-level epsilon {eps:.3f} at delta {cfg.delta:g}" if eps is not None else ""
    x = [r["round"] for r in rounds]
    series = [{"name": "accuracy", "x": x, "y": _series(rounds, "accuracy")}]
    series.append({"name": "backdoor ASR", "x": x, "y": _series(rounds, "asr")})
    return ProbeResult(
        probe=f"fl-{name}",
        title=f"Federated learning: {cfg.aggregator}, {attack}",
        risk="poisoning",
        status="ok",
        seed=seed,
        wall_time=float(last.get("seconds", 0.0)),
        config=cfg.to_run_config(),
        figure={
            "name": "backdoor attack success rate" if cfg.attack == "backdoor" else "accuracy",
            "value": last["asr"] if cfg.attack == "backdoor" else last["accuracy"],
        },
        grade=grade,
        meaning=(
            f"After {cfg.rounds} rounds with {cfg.num_clients} clients ({cfg.partition} data) and "
            f"{cfg.aggregator} aggregation under {attack}: accuracy {last['accuracy']:.3f}, "
            f"backdoor attack success rate {last['asr']:.3f}{dp_text}."
        ),
        recommendation=(
            "Use a robust aggregator (see the comparison) and bound client update norms."
            if cfg.attack
            else "Compare aggregators under attack with --compare."
        ),
        threat={
            "attacker": "controls a share of the clients" if cfg.attack else "none in this run",
            "attack": cfg.attack or "none",
            "access": "its clients' updates",
            "rule": rule,
        },
        details={"rounds": rounds, "rule": rule},
        plots=[
            {
                "kind": "line",
                "title": "Accuracy and backdoor ASR per round",
                "x_label": "round",
                "y_label": "rate",
                "series": series,
            }
        ],
    )


def comparison_probe(results: dict[str, dict[str, Any]], seed: int) -> ProbeResult:
    rows = []
    names = list(results)
    for name in names:
        last = results[name]["rounds"][-1]
        rows.append([name, f"{last['accuracy']:.4f}", f"{last['asr']:.4f}"])
    best = min(
        (n for n in names if n != BASELINE),
        key=lambda n: (results[n]["rounds"][-1]["asr"], -results[n]["rounds"][-1]["accuracy"]),
    )
    b = results[best]["rounds"][-1]
    return ProbeResult(
        probe="fl-comparison",
        title="Aggregators under attack",
        risk="poisoning",
        status="ok",
        seed=seed,
        figure={"name": f"lowest backdoor ASR ({best})", "value": b["asr"]},
        grade=None,
        meaning=f"Of the aggregators compared, {best} ends with the lowest attack success rate "
        f"({b['asr']:.3f}) at accuracy {b['accuracy']:.3f}.",
        recommendation="Deploy the aggregator that keeps both accuracy and ASR acceptable.",
        threat={
            "attacker": "controls a share of the clients",
            "attack": "see each run",
            "access": "updates",
            "rule": "informational",
        },
        details={"final": {n: results[n]["rounds"][-1] for n in names}},
        plots=[
            {
                "kind": "table",
                "title": "Final round",
                "columns": ["run", "accuracy", "backdoor ASR"],
                "rows": rows,
            },
            {
                "kind": "bar",
                "title": "Final accuracy",
                "labels": names,
                "values": [results[n]["rounds"][-1]["accuracy"] for n in names],
                "y_label": "accuracy",
            },
            {
                "kind": "bar",
                "title": "Final backdoor ASR",
                "labels": names,
                "values": [results[n]["rounds"][-1]["asr"] for n in names],
                "y_label": "attack success rate",
            },
        ],
    )


def run_federated(
    cfg: FLConfig,
    *,
    compare: list[str],
    runner: Callable[[FLConfig], dict[str, Any]],
    command: str = "",
    mode: str = "simulation",
) -> dict[str, Any]:
    """Make every planned run with ``runner`` (reusing finished ones); write result.json and
    the reports into ``cfg.out``."""
    started = time.time()
    cfg.validate()
    out = Path(cfg.out)
    plan = plan_runs(cfg, compare)
    for c in plan.values():
        c.validate()
    check_budget(cfg)
    train_test(cfg)  # load the data once up front: bad input fails before any engine starts
    results: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    for name, run_cfg in plan.items():
        run_cfg = replace(run_cfg, out=str(out / "runs" / name))
        done = _finished(Path(run_cfg.out) / "rounds.json", run_cfg)
        if done is not None:
            logger.info("%s: finished in an earlier run, reusing it", name)
            results[name] = done
            reused.append(name)
            continue
        logger.info(
            "%s: %d clients, %d rounds (%s)", name, run_cfg.num_clients, run_cfg.rounds, mode
        )
        results[name] = runner(run_cfg)
    main = cfg.aggregator if cfg.aggregator in results else next(iter(results))
    probes = [run_probe(n, plan[n], results[n]["rounds"], cfg.seed) for n in results]
    if len(results) > 1 and any(n != BASELINE for n in results):
        probes.append(comparison_probe(results, cfg.seed))
    train, test = train_test(cfg)
    report = build_report(
        probes=probes,
        run=run_record(
            command or "modelshield fl",
            cfg.seed,
            select_device("cpu"),
            started,
            resumed_probes=reused,
        ),
        target={
            "model": {
                "path": None,
                "sha256": None,
                "format": f"federated ({cfg.arch or 'default'})",
            },
            "data": test.describe(),
            "train_data": train.describe(),
        },
        rubric=rubric_document(),
    )
    written = write_reports(report, out)
    rounds = results[main]["rounds"]
    summary: dict[str, Any] = {
        "mode": mode,
        "config": cfg.to_run_config(),
        "main": main,
        "rounds": rounds,
        "accuracy": _series(rounds, "accuracy"),
        "asr": _series(rounds, "asr"),
        "final": rounds[-1],
        "runs": {
            n: {"config": plan[n].to_run_config(), "rounds": r["rounds"]}
            for n, r in results.items()
        },
        "reused": reused,
    }
    if any("epsilon" in r for r in rounds):
        summary["epsilon"] = _series(rounds, "epsilon")
    if len(results) > 1:
        summary["comparison"] = {n: r["rounds"][-1] for n, r in results.items()}
    result_path = out / "result.json"
    summary["paths"] = {
        "result": str(result_path),
        "html": str(written["html"]),
        "json": str(written["json"]),
    }
    atomic_write_json(result_path, summary)
    return summary
