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


def plan_runs(
    cfg: FLConfig, compare: list[str], attacks: list[str] | None = None
) -> dict[str, FLConfig]:
    """The runs to make: the configured one; or, with several aggregators (``compare``)
    or attacks, a no-attack FedAvg baseline and every attack under every aggregator (named
    ``AGGREGATOR`` for one attack, ``AGGREGATOR@ATTACK`` for several)."""
    attacks = attacks if attacks is not None else ([cfg.attack] if cfg.attack else [])
    aggregators = compare or [cfg.aggregator]
    if len(aggregators) == 1 and len(attacks) <= 1:
        return {
            aggregators[0]: replace(
                cfg, aggregator=aggregators[0], attack=attacks[0] if attacks else ""
            )
        }
    runs: dict[str, FLConfig] = {}
    if attacks:
        runs[BASELINE] = replace(cfg, attack="", malicious=0.0, aggregator="fedavg")
    for attack in attacks or [""]:
        for name in aggregators:
            key = name if len(attacks) <= 1 else f"{name}@{attack}"
            runs[key] = replace(cfg, aggregator=name, attack=attack)
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
    plots: list[dict[str, Any]] = [
        {
            "kind": "line",
            "title": "Accuracy and backdoor ASR per round",
            "x_label": "round",
            "y_label": "rate",
            "series": series,
        }
    ]
    eps_rows = [r for r in rounds if r.get("epsilon") is not None]
    if eps_rows:
        plots.append(
            {
                "kind": "line",
                "title": f"Client-level epsilon ({cfg.dp} DP, delta {cfg.delta:g})",
                "x_label": "round",
                "y_label": "epsilon",
                "series": [
                    {
                        "name": "epsilon (PRV)",
                        "x": [r["round"] for r in eps_rows],
                        "y": [r["epsilon"] for r in eps_rows],
                    }
                ],
            }
        )
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
        plots=plots,
    )


def comparison_probe(
    results: dict[str, dict[str, Any]], plan: dict[str, FLConfig], seed: int
) -> ProbeResult:
    """Every run's final accuracy and backdoor ASR; per attack, the aggregator that holds
    best (lowest ASR under a backdoor, highest accuracy under the other attacks)."""
    names = list(results)
    final = {n: results[n]["rounds"][-1] for n in names}
    rows = [
        [
            n,
            plan[n].aggregator,
            plan[n].attack or "none",
            f"{final[n]['accuracy']:.4f}",
            f"{final[n]['asr']:.4f}",
        ]
        for n in names
    ]
    verdicts = []
    for attack in dict.fromkeys(plan[n].attack for n in names if n != BASELINE):
        group = [n for n in names if n != BASELINE and plan[n].attack == attack]
        if attack == "backdoor":
            best = min(group, key=lambda n: (final[n]["asr"], -final[n]["accuracy"]))
            verdicts.append(
                f"under {attack}, {plan[best].aggregator} ends with the lowest ASR ({final[best]['asr']:.3f}, accuracy {final[best]['accuracy']:.3f})"
            )
        else:
            best = max(group, key=lambda n: final[n]["accuracy"])
            verdicts.append(
                f"under {attack or 'no attack'}, {plan[best].aggregator} keeps the highest accuracy ({final[best]['accuracy']:.3f})"
            )
    base = (
        f" The no-attack FedAvg baseline reaches accuracy {final[BASELINE]['accuracy']:.3f}."
        if BASELINE in final
        else ""
    )
    return ProbeResult(
        probe="fl-comparison",
        title="Aggregators under attack",
        risk="poisoning",
        status="ok",
        seed=seed,
        figure={"name": "runs compared", "value": len(names)},
        grade=None,
        meaning="; ".join(verdicts).capitalize() + "." + base,
        recommendation="Deploy the aggregator that keeps both accuracy and ASR acceptable under the attacks you expect.",
        threat={
            "attacker": "controls a share of the clients",
            "attack": "see each run",
            "access": "updates",
            "rule": "informational",
        },
        details={"final": final},
        plots=[
            {
                "kind": "table",
                "title": "Final round",
                "columns": ["run", "aggregator", "attack", "accuracy", "backdoor ASR"],
                "rows": rows,
            },
            {
                "kind": "bar",
                "title": "Final accuracy",
                "labels": names,
                "values": [final[n]["accuracy"] for n in names],
                "y_label": "accuracy",
            },
            {
                "kind": "bar",
                "title": "Final backdoor ASR",
                "labels": names,
                "values": [final[n]["asr"] for n in names],
                "y_label": "attack success rate",
            },
        ],
    )


def run_federated(
    cfg: FLConfig,
    *,
    compare: list[str],
    runner: Callable[[FLConfig], dict[str, Any]],
    attacks: list[str] | None = None,
    command: str = "",
    mode: str = "simulation",
) -> dict[str, Any]:
    """Make every planned run with ``runner`` (reusing finished ones); write result.json and
    the reports into ``cfg.out``."""
    started = time.time()
    cfg.validate()
    out = Path(cfg.out)
    plan = plan_runs(cfg, compare, attacks)
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
    main = next((n for n in results if n != BASELINE), next(iter(results)))
    probes = [run_probe(n, plan[n], results[n]["rounds"], cfg.seed) for n in results]
    if len(results) > 1 and any(n != BASELINE for n in results):
        probes.append(comparison_probe(results, plan, cfg.seed))
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
        summary["dp"] = {
            "mode": cfg.dp,
            "sample_rate": cfg.fraction if cfg.dp == "central" else 1.0,
            "noise_multiplier": cfg.noise_multiplier,
            "clip": cfg.clip,
            "delta": cfg.delta,
            "rounds": cfg.rounds,
            "accountant": "prv (Gopi et al. 2021; Poisson-subsampled Gaussian, client level)",
            "epsilon": rounds[-1].get("epsilon"),
            "epsilon_rdp": rounds[-1].get("epsilon_rdp"),
        }
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
