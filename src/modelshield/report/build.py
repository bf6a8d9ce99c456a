"""Assemble, validate and write the scan report (``report.json`` + HTML + Markdown).

The report is plain JSON following ``schema/report.schema.json`` (draft 2020-12). It is
built from :class:`~modelshield.core.results.ProbeResult` records and never imports the
capabilities that produced them.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from modelshield import __version__
from modelshield.core.errors import DataError
from modelshield.core.io import atomic_write_json, atomic_write_text
from modelshield.core.results import ProbeResult, encode

SCHEMA_VERSION = "1.0.0"
GRADES: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")
STATUSES: tuple[str, ...] = ("ok", "skipped", "error")
PLOT_KINDS: tuple[str, ...] = ("line", "bar", "images", "table")
RISK_LABELS: dict[str, str] = {
    "supply-chain": "Supply chain",
    "evasion": "Evasion",
    "extraction": "Extraction (model stealing)",
    "poisoning": "Poisoning",
    "privacy": "Privacy leakage",
    "watermark": "Watermark / ownership",
}

_TOP_KEYS = (
    "schema_version",
    "modelshield_version",
    "created",
    "run",
    "target",
    "rubric",
    "summary",
    "probes",
)
_PROBE_KEYS = (
    "probe",
    "title",
    "risk",
    "status",
    "reason",
    "figure",
    "grade",
    "meaning",
    "recommendation",
    "threat",
    "details",
    "plots",
    "flags",
)


# ----------------------------------------------------------------------------- schema


def environment_text(env: Any) -> str | None:
    """One line for the report header: Python, platform and package versions (or None)."""
    if not isinstance(env, Mapping) or not env:
        return None
    pkgs = env.get("packages") or {}
    return f"Python {env.get('python', '?')} · {env.get('platform', '?')} · " + ", ".join(
        f"{k} {v}" for k, v in pkgs.items()
    )


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    res = importlib.resources.files("modelshield.report").joinpath("schema/report.schema.json")
    return res.read_text(encoding="utf-8")


def load_schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), shipped as package data; a fresh copy."""
    schema: dict[str, Any] = json.loads(_schema_text())
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    import jsonschema

    cls = jsonschema.Draft202012Validator
    schema = load_schema()
    cls.check_schema(schema)
    return cls(schema)


def _json_path(parts: Iterable[Any]) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def validate_report(report: Mapping[str, Any]) -> None:
    """Check ``report`` against the schema; raise :class:`DataError` naming the first bad path.

    Uses ``jsonschema`` when installed, otherwise a structural check of the essentials.
    Then checks what a schema cannot say: equal-length plot arrays, image sizes, unique
    probe names, and a summary consistent with the probes.
    """
    if not isinstance(report, Mapping):
        raise DataError(f"report must be a JSON object, got {type(report).__name__}")
    try:
        validator = _validator()
    except ImportError:
        _basic_checks(report)
    else:
        import jsonschema.exceptions

        error = jsonschema.exceptions.best_match(validator.iter_errors(report))
        if error is not None:
            raise DataError(
                f"report is invalid at {_json_path(error.absolute_path)}: {error.message}"
            )
    _semantic_checks(report)


def _need(cond: bool, path: str, what: str) -> None:
    if not cond:
        raise DataError(f"report is invalid at {path}: {what}")


def _basic_checks(report: Mapping[str, Any]) -> None:
    """Fallback structural checks used when ``jsonschema`` is not installed."""
    for key in _TOP_KEYS:
        _need(key in report, "$", f"{key!r} is a required property")
    _need(
        report["schema_version"] == SCHEMA_VERSION,
        "$.schema_version",
        f"{report['schema_version']!r} is not {SCHEMA_VERSION!r}",
    )
    for key in ("run", "target", "rubric", "summary"):
        _need(isinstance(report[key], Mapping), f"$.{key}", "must be an object")
    for key in ("id", "command", "seed", "device", "started", "finished"):
        _need(key in report["run"], "$.run", f"{key!r} is a required property")
    for key in ("model", "data"):
        _need(isinstance(report["target"].get(key), Mapping), f"$.target.{key}", "an object")
    for key in ("version", "text", "grades"):
        _need(key in report["rubric"], "$.rubric", f"{key!r} is a required property")
    summary = report["summary"]
    for key in ("overall_grade", "counts", "risks"):
        _need(key in summary, "$.summary", f"{key!r} is a required property")
    _need(summary["overall_grade"] in (*GRADES, None), "$.summary.overall_grade", "a grade")
    probes = report["probes"]
    _need(isinstance(probes, list), "$.probes", "must be an array")
    for i, p in enumerate(probes):
        where = f"$.probes[{i}]"
        _need(isinstance(p, Mapping), where, "must be an object")
        for key in _PROBE_KEYS:
            _need(key in p, where, f"{key!r} is a required property")
        _need(
            p["status"] in STATUSES, f"{where}.status", f"{p['status']!r} is not one of {STATUSES}"
        )
        _need(p["grade"] in (*GRADES, None), f"{where}.grade", f"{p['grade']!r} is not a grade")
        for key in ("figure", "threat", "details"):
            _need(isinstance(p[key], Mapping), f"{where}.{key}", "must be an object")
        _need(isinstance(p["plots"], list), f"{where}.plots", "must be an array")
        _need(isinstance(p["flags"], list), f"{where}.flags", "must be an array")
        for j, plot in enumerate(p["plots"]):
            kind = plot.get("kind") if isinstance(plot, Mapping) else None
            _need(kind in PLOT_KINDS, f"{where}.plots[{j}].kind", f"one of {PLOT_KINDS}")


def _semantic_checks(report: Mapping[str, Any]) -> None:
    seen: set[str] = set()
    for i, p in enumerate(report["probes"]):
        where = f"$.probes[{i}]"
        _need(p["probe"] not in seen, f"{where}.probe", f"duplicate probe name {p['probe']!r}")
        seen.add(p["probe"])
        for j, plot in enumerate(p["plots"]):
            try:
                _check_plot(plot, f"{where}.plots[{j}]")
            except (KeyError, TypeError, IndexError) as exc:  # only without jsonschema
                raise DataError(
                    f"report is invalid at {where}.plots[{j}]: malformed plot ({exc!r})"
                ) from None
    counts = {s: sum(p["status"] == s for p in report["probes"]) for s in STATUSES}
    _need(
        dict(report["summary"]["counts"]) == counts,
        "$.summary.counts",
        f"{dict(report['summary']['counts'])} does not match the probes {counts}",
    )


def _check_plot(plot: Mapping[str, Any], where: str) -> None:
    kind = plot["kind"]
    if kind == "line":
        for k, s in enumerate(plot["series"]):
            n = len(s["x"])
            for key in ("y", "lo", "hi"):
                if key in s:
                    _need(
                        len(s[key]) == n,
                        f"{where}.series[{k}].{key}",
                        f"has {len(s[key])} values but x has {n}",
                    )
    elif kind == "bar":
        _need(
            len(plot["labels"]) == len(plot["values"]),
            f"{where}.values",
            f"has {len(plot['values'])} values for {len(plot['labels'])} labels",
        )
    elif kind == "images":
        for k, im in enumerate(plot["images"]):
            shape = list(im["shape"])
            _need(
                len(shape) == 2 or shape[0] in (1, 3),
                f"{where}.images[{k}].shape",
                f"{shape} must be [H, W] or [C, H, W] with C 1 or 3",
            )
            _need(
                len(im["data"]) == math.prod(shape),
                f"{where}.images[{k}].data",
                f"has {len(im['data'])} values for shape {shape}",
            )
    elif kind == "table":
        width = len(plot["columns"])
        for k, row in enumerate(plot["rows"]):
            _need(
                len(row) == width,
                f"{where}.rows[{k}]",
                f"has {len(row)} cells for {width} columns",
            )


# ----------------------------------------------------------------------------- building


def grade_rank(grade: str | None) -> int:
    """0 for A ... 5 for F; -1 for no grade."""
    return GRADES.index(grade) if grade in GRADES else -1


def worst_grade(grades: Iterable[str | None]) -> str | None:
    """The worst letter among ``grades`` (``None`` entries ignored); ``None`` if none."""
    real = [g for g in grades if g in GRADES]
    return max(real, key=grade_rank) if real else None


def _probe_dict(p: ProbeResult | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(p, ProbeResult):
        return p.to_dict()
    if isinstance(p, Mapping):
        return dict(encode(dict(p)))
    raise DataError(f"probes must be ProbeResult records, got {type(p).__name__}")


def utc_now() -> str:
    """The current time as ISO-8601 UTC, e.g. ``2025-01-31T12:00:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_report(
    *,
    probes: Sequence[ProbeResult | Mapping[str, Any]],
    run: Mapping[str, Any],
    target: Mapping[str, Any],
    rubric: Mapping[str, Any],
    created: str | None = None,
    validate: bool = True,
) -> dict[str, Any]:
    """Assemble the report dict from probe results and run / target / rubric metadata.

    ``summary.overall_grade`` is the worst grade among probes that ran; ``summary.risks``
    maps each risk to the worst grade among its probes that ran (``None``: none graded).
    Validated against the schema unless ``validate=False``.
    """
    records = [_probe_dict(p) for p in probes]
    risks: dict[str, str | None] = {}
    for rec in records:
        risk = str(rec.get("risk", ""))
        graded = rec.get("grade") if rec.get("status") == "ok" else None
        risks[risk] = worst_grade([risks.get(risk), graded])
    target_d = dict(encode(dict(target)))
    target_d.setdefault("train_data", None)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "modelshield_version": __version__,
        "created": created or utc_now(),
        "run": encode(dict(run)),
        "target": target_d,
        "rubric": encode(dict(rubric)),
        "summary": {
            "overall_grade": worst_grade(
                r.get("grade") for r in records if r.get("status") == "ok"
            ),
            "counts": {s: sum(r.get("status") == s for r in records) for s in STATUSES},
            "risks": risks,
        },
        "probes": records,
    }
    if validate:
        validate_report(report)
    return report


def write_reports(report: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Validate ``report`` and write ``report.json``, ``report.html`` and ``report.md``.

    Everything is rendered before anything is written, and each file is written atomically,
    so a failure never leaves a half-written report. Returns ``{"json", "html", "md"}`` paths.
    """
    from modelshield.report.html import render_html
    from modelshield.report.markdown import render_markdown

    validate_report(report)
    html_text = render_html(report)
    md_text = render_markdown(report)
    out = Path(out_dir)
    paths = {"json": out / "report.json", "html": out / "report.html", "md": out / "report.md"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["html"], html_text)
    atomic_write_text(paths["md"], md_text)
    return paths


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a ``report.json``."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read report {os.fspath(path)!r}: {exc}") from None
    validate_report(report)
    return dict(report)


# ----------------------------------------------------------------------------- formatting
# Shared by the HTML and Markdown renderers.


def to_float(value: Any) -> float | None:
    """A JSON number (or ``"inf"``/``"-inf"``) as a float; ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value == "inf":
        return math.inf
    if value == "-inf":
        return -math.inf
    return None


def format_number(value: Any) -> str:
    """Compact human formatting: 4 significant digits, ``∞`` for infinities, ``—`` for none."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    f = to_float(value)
    if f is None:
        return str(value)
    if math.isnan(f):
        return "—"
    if math.isinf(f):
        return "∞" if f > 0 else "−∞"
    if f == 0:
        return "0"
    if 1e-3 <= abs(f) < 1e5:
        return f"{f:.4g}"
    return f"{f:.3e}"


def format_figure(figure: Mapping[str, Any]) -> tuple[str, str]:
    """``(value with unit, confidence-interval text)`` for a probe's headline figure."""
    if not figure or "value" not in figure:
        return "—", ""
    unit = str(figure.get("unit") or "")
    value = format_number(figure.get("value"))
    if unit and value != "—":
        value = f"{value}{unit}" if unit == "%" else f"{value} {unit}"
    ci = figure.get("ci")
    ci_text = ""
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        conf = to_float(figure.get("confidence"))
        label = f"{conf * 100:g}% CI" if conf is not None else "CI"
        ci_text = f"{label} [{format_number(ci[0])}, {format_number(ci[1])}]"
    return value, ci_text


def risk_label(risk: str) -> str:
    """Human label for a risk key (``"extraction"`` → ``"Extraction (model stealing)"``)."""
    if risk in RISK_LABELS:
        return RISK_LABELS[risk]
    text = risk.replace("-", " ").replace("_", " ").strip()
    return text[:1].upper() + text[1:] if text else "Other"


def risk_order(risk: str) -> tuple[int, str]:
    """Sort key: known risks first in a fixed order, then the others alphabetically."""
    order = list(RISK_LABELS)
    return (order.index(risk), "") if risk in order else (len(order), risk)


def ordered_probes(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Probes grouped by risk (see :func:`risk_order`), stable within a risk."""
    probes = (dict(p) for p in report.get("probes", []))
    return sorted(probes, key=lambda p: risk_order(str(p.get("risk", ""))))


def rubric_line(rubric: Mapping[str, Any], probe: Mapping[str, Any]) -> str:
    """The rubric text behind a probe's grade: per-probe rule if given, else the letter's."""
    grade = probe.get("grade")
    if grade not in GRADES:
        return ""
    per_probe = (rubric.get("probes") or {}).get(probe.get("probe"), {})
    line = per_probe.get(grade) if isinstance(per_probe, Mapping) else None
    return str(line or (rubric.get("grades") or {}).get(grade, ""))


def short_hash(sha: Any, n: int = 12) -> str:
    """First ``n`` hex digits of a SHA-256, or ``""``."""
    return f"{sha[:n]}…" if isinstance(sha, str) and sha else ""


def is_tensor_record(value: Any) -> bool:
    """Whether ``value`` is an encoded tensor (``{"__tensor__": True, ...}``)."""
    return isinstance(value, Mapping) and value.get("__tensor__") is True


def tensor_summary(value: Mapping[str, Any]) -> str:
    """``tensor float32 [3, 32, 32]`` for an encoded tensor."""
    shape = "×".join(str(s) for s in value.get("shape", [])) or "scalar"
    return f"tensor {value.get('dtype', '?')} [{shape}]"
