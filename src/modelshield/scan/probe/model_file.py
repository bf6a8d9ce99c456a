"""Supply-chain probe: can loading the model file run code, and what would it import?"""

from __future__ import annotations

import time

from modelshield.core.results import ProbeResult
from modelshield.scan.context import ScanContext
from modelshield.scan.probes import Probe, register_probe
from modelshield.scan.rubric import grade_supply_chain

_FORMAT_NAMES = {
    "export": "a torch.export program",
    "torchscript": "a TorchScript archive",
    "state_dict": "a weights-only state_dict (the architecture comes from code you named)",
    "onnx": "an ONNX graph",
}


@register_probe
class ModelFileProbe(Probe):
    """Model file supply chain: format, hash, and the globals a pickle would import."""

    name = "model-file"
    title = "Model file supply chain"
    risk = "supply-chain"
    order = 0

    def applies(self, ctx: ScanContext) -> str | None:
        if ctx.model is None:
            return "no model file given (--model)"
        return None

    def run(self, ctx: ScanContext) -> ProbeResult:
        started = time.perf_counter()
        if ctx.model is None:
            return self.skipped("no model file given (--model)", ctx)
        report = ctx.model.file
        pk = report.pickle
        dangerous = list(pk.dangerous) if pk is not None else []
        unknown = list(pk.unknown) if pk is not None else []
        fmt = ctx.model.kind
        grade, rule = grade_supply_chain(report.trusted_pickle, dangerous, unknown)
        n_globals = len(pk.globals) if pk is not None else 0
        if grade == "A":
            meaning = (
                f"The file is {_FORMAT_NAMES.get(fmt, 'a ' + fmt + ' file')}: loading it reads "
                "tensors and a graph, and runs no Python code from the file."
            )
            advice = (
                "Keep distributing the model in this format, with its SHA-256 published beside it."
            )
        else:
            meaning = (
                f"The file is a full Python pickle: loading it imports {n_globals} global(s) and "
                "can run any code they reach. "
                + (f"Dangerous: {', '.join(dangerous)}. " if dangerous else "")
                + (f"Outside the allowlist: {', '.join(unknown[:8])}." if unknown else "")
            )
            advice = (
                "Re-save the model as weights only (torch.save(model.state_dict())) with its "
                "architecture in code, or export it (torch.export / ONNX); never load pickles "
                "from untrusted sources."
            )
        return ProbeResult(
            probe=self.name,
            title=self.title,
            risk=self.risk,
            status="ok",
            seed=ctx.seed,
            wall_time=time.perf_counter() - started,
            figure={"name": "dangerous globals", "value": float(len(dangerous))},
            grade=grade,
            meaning=meaning,
            recommendation=advice,
            threat={"attacker": "supplies or tampers with the model file", "rule": rule},
            details={"file": report.to_dict(), "rule": rule},
            flags=[f"dangerous global: {g}" for g in dangerous],
        )
