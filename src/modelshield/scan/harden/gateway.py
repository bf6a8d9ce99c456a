"""``modelshield harden gateway``: anti-extraction defences in front of the model, with the
scan's extraction probe run against the undefended and the defended API.

The defences are those of ``modelshield serve`` (labels only, rounding, perturbation, query
budgets, rate limits, the PRADA detector of Juuti et al. 2019, the ``ood`` detector). The
probe's Knockoff attacker (Orekondy et al. 2019) queries an in-process
:class:`~modelshield.serve.app.Gateway` as one client: before, a gateway without defences;
after, the defended one. A rate limit is waited out on a simulated clock (the report
gives the attacker's time). A refused request is split until the rows a budget still
allows are answered; a refusal of a single row ends the attack, unless the attacker
holds more client identities (``--identities``, a Sybil attacker): it then goes on as
the next one. The copy is trained on the answers received until the end. The output is ``gateway.json``, which
``modelshield serve --config`` loads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from modelshield import __version__
from modelshield.core.classifier import Classifier
from modelshield.core.data import load_dataset
from modelshield.core.errors import InvalidConfigError, OracleError, UnsupportedModelError
from modelshield.core.io import atomic_write_json
from modelshield.core.loading import check_fits, load_given_model
from modelshield.core.oracle import Oracle
from modelshield.core.results import ProbeResult
from modelshield.core.threat import QueryAccess
from modelshield.scan.harden.common import (
    Comparison,
    HardenOutcome,
    finish,
    hardening_result,
    open_run,
    start,
)
from modelshield.scan.probe.extraction import MIN_DATA, PROFILE_BUDGETS, ExtractionProbe
from modelshield.scan.rubric import grade_extraction, harden_command

logger = logging.getLogger(__name__)

DEFAULT_DEFENSES = ("label-only", "rate=10/s", "prada=0.9,action=block")
"""Labels only, a per-client rate limit and the PRADA detector blocking flagged clients."""
CONFIG_FORMAT = "modelshield-gateway"
CONFIG_VERSION = 1
ATTACKER = "attacker"
MAX_WAITS = 1_000_000
MAX_LOGGED = 20
"""Refusals kept word for word in the report (all are counted)."""


class GatewayOracle(Oracle):
    """One client of an in-process gateway, seen as an :class:`Oracle`.

    Rate-limit refusals (429) are waited out on a simulated clock the gateway reads. A
    refused request is split in halves and retried (a budget may still cover part of it);
    a refused single row moves to the next of ``identities`` client names (a Sybil
    attacker with several API keys), and :class:`OracleError` is raised once none is left. Every answered
    row is recorded, so an attack cut short can be replayed on what it received
    (:class:`ReplayOracle`).
    """

    def __init__(self, gateway: Any, client: str = ATTACKER, identities: int = 1) -> None:
        self.raw_output = "label" if gateway.labels_only else "probs"
        backend = gateway.backend
        super().__init__(
            QueryAccess(output=self.raw_output),  # type: ignore[arg-type]
            input_shape=backend.input_shape,
            num_classes=backend.num_classes,
            name="gateway",
        )
        self.gateway = gateway
        self.client = client
        self.identities = int(identities)
        self.clients = [client]
        self.refusals: list[str] = []
        self.refused_requests = 0
        self.now = 0.0
        self.waited = 0.0
        gateway.clock = lambda: self.now
        self.xs: list[torch.Tensor] = []
        self.answers: list[torch.Tensor] = []
        self.refused: str | None = None

    @property
    def answered(self) -> int:
        return sum(len(x) for x in self.xs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Answers for ``x``; a refused request is split in halves (a budget may still
        cover part of it), and a refused single row moves to the next identity."""
        from modelshield.serve.defenses import Rejection

        try:
            return self._ask(x)
        except Rejection as r:
            self.refused_requests += 1
            if len(self.refusals) < MAX_LOGGED:
                self.refusals.append(f"{self.client}: HTTP {r.status} {r.code}: {r}")
            if len(x) > 1:
                half = len(x) // 2
                return torch.cat([self._forward(x[:half]), self._forward(x[half:])])
            if len(self.clients) < self.identities:  # a fresh identity, the same query
                self.client = f"{self.clients[0]}-{len(self.clients) + 1}"
                self.clients.append(self.client)
                return self._forward(x)
            self.refused = f"HTTP {r.status} {r.code}: {r}"
            raise OracleError(f"the gateway refused the attacker: {r}") from None

    def _ask(self, x: torch.Tensor) -> torch.Tensor:
        """One request as the current client; rate limits (429) are waited out."""
        from modelshield.serve.defenses import Rejection

        for _ in range(MAX_WAITS):
            try:
                answer = self.gateway.predict(self.client, x.detach().cpu())
            except Rejection as r:
                if r.status == 429 and r.retry_after:
                    self.now += float(r.retry_after)
                    self.waited += float(r.retry_after)
                    continue
                raise
            self.now += 1e-3  # time moves on between requests
            out = answer.outputs.long() if answer.labels else answer.outputs.float()
            self.xs.append(x.detach().cpu())
            self.answers.append(out)
            return out
        raise OracleError("the gateway's rate limit never admitted the request")


class ReplayOracle(Oracle):
    """The answers a :class:`GatewayOracle` received, served again in the same order."""

    def __init__(self, source: GatewayOracle) -> None:
        self.raw_output = source.raw_output
        super().__init__(
            QueryAccess(output=self.raw_output),  # type: ignore[arg-type]
            input_shape=source.input_shape,
            num_classes=source.num_classes,
            name="replay",
        )
        self.x = torch.cat(source.xs)
        self.y = torch.cat(source.answers)
        self.pos = 0

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.pos + n > len(self.x) or not torch.equal(self.x[self.pos : self.pos + n], x.cpu()):
            raise OracleError("replay asked for inputs the gateway did not answer")
        out = self.y[self.pos : self.pos + n]
        self.pos += n
        return out


def _defenses(opts: dict[str, Any], shape: tuple[int, ...]) -> tuple[list[Any], list[str]]:
    from modelshield.serve.defenses import OodDefense, parse_defenses

    specs = list(opts.get("defenses") or ()) or list(DEFAULT_DEFENSES)
    defenses = parse_defenses(specs)
    ood = [d for d in defenses if isinstance(d, OodDefense)]
    if ood and not opts.get("reference_data"):
        raise InvalidConfigError("--defense ood needs --reference-data PATH (benign inputs)")
    if opts.get("reference_data") and not ood:
        raise InvalidConfigError("--reference-data is only used by --defense ood=ALPHA")
    if ood:
        ood[0].reference = load_dataset(opts["reference_data"], input_shape=shape).x
    return defenses, specs


def write_gateway_config(path: Path, *, model: Any, specs: list[str], opts: dict[str, Any]) -> Path:
    """``gateway.json``: the model (path and SHA-256), the defences and how to load it."""
    ref = opts.get("reference_data")
    atomic_write_json(
        path,
        {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "model": {"path": str(Path(model.path).resolve()), "sha256": model.sha256},
            "defenses": specs,
            "reference_data": str(Path(ref).resolve()) if ref and Path(ref).exists() else ref,
            "max_batch": opts["max_batch"],
            "bounds": list(opts["bounds"]),
            "mean": opts.get("mean"),
            "std": opts.get("std"),
            "arch": opts.get("arch"),
            "written_by": opts.get("command", "modelshield harden gateway"),
            "modelshield_version": __version__,
        },
    )
    return path


def harden_gateway(**opts: Any) -> HardenOutcome:
    """Extraction probe against the undefended and the defended gateway; write gateway.json."""
    from modelshield.serve.app import Backend, Gateway

    started, device = start(opts)
    data = load_dataset(opts["data"], bounds=opts["bounds"])
    if len(data) < MIN_DATA:
        raise InvalidConfigError(f"--data has {len(data)} samples; at least {MIN_DATA} needed")
    loaded = load_given_model(opts, data.input_shape, device)
    if loaded.classifier is None:
        raise UnsupportedModelError(
            f"harden gateway measures fidelity against the model's own predictions: it needs a "
            f"torch model, got a {loaded.kind} model"
        )
    check_fits(loaded, data.y, "--data")
    defenses, specs = _defenses(opts, data.input_shape)
    Gateway(Backend(loaded.classifier), defenses, max_batch=opts["max_batch"])  # checks the set
    budget = opts.get("queries") or PROFILE_BUDGETS[opts["profile"]]
    cmp = open_run(
        opts,
        device,
        {
            "command": "harden gateway",
            "model_sha256": loaded.file.sha256,
            "data_sha256": data.describe().get("sha256"),
            "defenses": specs,
            "queries": budget,
            "identities": int(opts.get("identities") or 1),
            "profile": opts["profile"],
            "seed": opts["seed"],
        },
    )
    out = cmp.run_dir.root
    clf = loaded.classifier

    def side(name: str, defended: list[Any]) -> ProbeResult:
        done = cmp.finished("extraction", name)
        if done is not None:
            return done
        gateway = Gateway(Backend(clf), defended, max_batch=opts["max_batch"])
        oracle = GatewayOracle(gateway, identities=int(opts.get("identities") or 1))
        options = {"extraction_queries": budget}
        try:
            result = cmp.measure(
                ExtractionProbe(), name, oracle=oracle, white_box=clf, data=data, options=options
            )
        except OracleError:
            result = _cut_short(cmp, name, oracle, clf, data, budget)
        result.details["gateway"] = {
            "defenses": [d.name for d in gateway.defenses],
            "answered": oracle.answered,
            "refused": oracle.refused,
            "simulated_wait_s": oracle.waited,
            "identities": oracle.identities,
            "identities_used": len(oracle.clients),
            "refusals": oracle.refusals,
            "refused_requests": oracle.refused_requests,
            "stats": {c: gateway.stats()["clients"].get(c) for c in oracle.clients},
        }
        return cmp.keep(_strip_side(result, name), name)

    before = side("before", [])
    after = side("after", defenses)
    config_path = write_gateway_config(
        out / "gateway.json", model=loaded.file, specs=specs, opts=opts
    )
    summary = _summary(opts, specs, budget, before, after)
    results = [summary, before, after]
    reports = cmp.report(
        results,
        command=opts["command"],
        started=started,
        model=loaded.file.to_dict(),
        data=data,
        train_data=None,
    )
    return finish(
        out,
        summary,
        results,
        reports,
        model_path=config_path,
        paths={"config": str(config_path)},
        defenses=specs,
        queries=budget,
    )


def _strip_side(result: ProbeResult, side: str) -> ProbeResult:
    """Undo the ``-SIDE`` suffix so :meth:`Comparison.keep` can add it once."""
    result.probe = result.probe.removesuffix(f"-{side}")
    result.title = result.title.removesuffix(f" ({side} hardening)")
    return result


def _cut_short(
    cmp: Comparison, side: str, oracle: GatewayOracle, clf: Classifier, data: Any, budget: int
) -> ProbeResult:
    """The gateway refused part-way: the copy is trained on the answers received."""
    n = oracle.answered
    note = f"The gateway refused the attacker after {n} of {budget} queries ({oracle.refused})."
    if n == 0:
        grade, rule = "A", "the gateway refused every query: no copy could be trained"
        return ProbeResult(
            probe="extraction",
            title=ExtractionProbe.title,
            risk="extraction",
            seed=cmp.seed,
            figure={"name": "fidelity at 0 queries", "value": None},
            grade=grade,
            meaning=note + " No copy could be trained.",
            recommendation="Keep the refusing defence; check that honest clients stay served.",
            threat={"rule": rule},
            details={"fidelity": None, "queries_used": 0, "rule": rule},
        )
    cmp.run_dir.probe_path(f"extraction-{side}").unlink(missing_ok=True)
    result = cmp.measure(
        ExtractionProbe(),
        side,
        oracle=ReplayOracle(oracle),
        white_box=clf,
        data=data,
        options={"extraction_queries": n},
    )
    result.meaning += f" {note}"
    result.flags.append("refused")
    return result


def _summary(
    opts: dict[str, Any], specs: list[str], budget: int, before: ProbeResult, after: ProbeResult
) -> ProbeResult:
    fb, fa = before.details.get("fidelity"), after.details.get("fidelity")
    gb, ga = before.details["gateway"], after.details["gateway"]
    qa = ga["answered"]
    if fa is None:
        grade, rule = "A", "the gateway refused every query: no copy could be trained"
    else:
        grade, rule = grade_extraction(fa)
    wait = ga["simulated_wait_s"]
    meaning = (
        f"Knockoff Nets (Orekondy et al. 2019) with a budget of {budget} queries: undefended, "
        f"the copy agrees with the model on {fb:.1%} of held-out inputs"
        + (
            f"; behind the gateway ({', '.join(specs)}) "
            + (f"on {fa:.1%}" if fa is not None else "no copy could be trained")
            + f", with {qa} queries answered"
            + (
                f" to {ga['identities_used']} client identities"
                if ga.get("identities_used", 1) > 1
                else ""
            )
            + (f" (refused: {ga['refused']})" if ga["refused"] else "")
            + (f" and {wait:,.0f} s spent waiting out the rate limit" if wait else "")
            + "."
        )
    )
    lower = fa is None or (fb is not None and fa < fb) or qa < gb["answered"]
    advice = (
        "Serve the model with this configuration: `modelshield serve --config gateway.json`. "
        "Per-client defences assume clients cannot rotate identities: put the gateway behind "
        "authentication. Watermark the model (`modelshield harden watermark`) to prove "
        "ownership of copies that still get made."
        if lower
        else "These defences did not slow this attacker: add a query budget (budget=N), "
        "labels only (label-only) or blocking detection (prada=DELTA,action=block)."
    )
    return hardening_result(
        title="Extraction gateway (PRADA, Juuti et al. 2019; output and query defences)",
        risk="extraction",
        defence=harden_command("extraction"),
        rows=[
            ("fidelity", fb, fa),
            ("copy accuracy", before.details.get("accuracy"), after.details.get("accuracy")),
            ("queries answered", gb["answered"], qa),
            ("attacker wait s", gb["simulated_wait_s"], wait),
            ("identities used", gb.get("identities_used", 1), ga.get("identities_used", 1)),
        ],
        figure={"name": f"copy fidelity after, at {budget} queries", "value": fa},
        grade=grade,
        rule=rule,
        meaning=meaning,
        recommendation=advice,
        seed=opts["seed"],
        config={
            "defenses": specs,
            "queries": budget,
            "identities": int(opts.get("identities") or 1),
        },
        details={"refused": ga["refused"], "identities_used": ga.get("identities_used", 1)},
    )
