"""Render the report as concise Markdown (for pull requests, tickets and terminals).

Same content as the HTML report, shorter: identity, summary table, then one section per
probe with the figure, grade and rubric line, advice, flags, small tables and details.
Charts become a one-line description (the HTML report has them drawn).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from modelshield.report.build import (
    GRADES,
    SCHEMA_VERSION,
    environment_text,
    format_figure,
    format_number,
    is_tensor_record,
    ordered_probes,
    risk_label,
    risk_order,
    rubric_line,
    short_hash,
    tensor_summary,
)

MAX_ROWS = 30
MAX_ITEMS = 8
MAX_TEXT = 200


def _text(value: Any) -> str:
    """Inline text: HTML-escaped (so ``<script>`` stays text), newlines folded."""
    return escape(" ".join(str(value).split()), quote=False)


def _cell(value: Any) -> str:
    """Table-cell text: also escapes ``|``."""
    return _text(value).replace("|", "\\|")


def _code(value: Any) -> str:
    """Inline code span that survives backticks in ``value``."""
    text = " ".join(str(value).split())
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _truncate(text: str, n: int = MAX_TEXT) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _grade(g: Any) -> str:
    return f"**{g}**" if g in GRADES else "—"


def _value(value: Any, depth: int = 0) -> str:
    """One-line rendering of a JSON value, truncated."""
    if is_tensor_record(value):
        return tensor_summary(value)
    if isinstance(value, str):
        return _truncate(value)
    if value is None or isinstance(value, (bool, int, float)):
        return format_number(value)
    if isinstance(value, Mapping):
        if depth >= 2:
            return f"{{{len(value)} {'key' if len(value) == 1 else 'keys'}}}"
        items = list(value.items())
        body = ", ".join(f"{k}: {_value(v, depth + 1)}" for k, v in items[:MAX_ITEMS])
        more = f", … ({len(items)} keys)" if len(items) > MAX_ITEMS else ""
        return _truncate("{" + body + more + "}")
    if isinstance(value, (list, tuple)):
        if depth >= 2:
            return f"[{len(value)} items]"
        body = ", ".join(_value(v, depth + 1) for v in value[:MAX_ITEMS])
        more = f", … ({len(value)} items)" if len(value) > MAX_ITEMS else ""
        return _truncate("[" + body + more + "]")
    return _truncate(repr(value))


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_cell(c) for c in columns) + " |"]
    out.append("|" + "|".join(" --- " for _ in columns) + "|")
    for r in rows:
        out.append("| " + " | ".join(_cell(_value(v)) for v in r) + " |")
    return out


def _artifact(a: Any) -> str:
    if not isinstance(a, Mapping):
        return "none"
    label = a.get("path") or a.get("name") or a.get("url") or "unnamed"
    parts = [_code(label)]
    if a.get("sha256"):
        parts.append(f"sha256 {_code(short_hash(a['sha256']))}")
    if a.get("format"):
        parts.append(_text(a["format"]))
    if a.get("n") is not None:
        parts.append(f"{format_number(a['n'])} samples")
    return " · ".join(parts)


def _plot(spec: Mapping[str, Any]) -> list[str]:
    kind = spec.get("kind")
    title = _text(spec.get("title") or kind or "plot")
    if kind == "table":
        rows = list(spec.get("rows") or [])
        out = [
            f"*{title}*",
            "",
            *_table([str(c) for c in spec.get("columns") or []], rows[:MAX_ROWS]),
        ]
        if len(rows) > MAX_ROWS:
            out.append(f"\n*First {MAX_ROWS} of {len(rows)} rows; all are in report.json.*")
        return out
    if kind == "bar":
        pairs = list(zip(spec.get("labels") or [], spec.get("values") or [], strict=False))
        head = str(spec.get("y_label") or "value")
        return [f"*{title}*", "", *_table(["", head], pairs[:MAX_ROWS])]
    if kind == "line":
        series = spec.get("series") or []
        names = ", ".join(
            f"{_text(s.get('name') or 'series')} ({len(s.get('x') or [])} points"
            + (", with CI band)" if s.get("lo") else ")")
            for s in series
        )
        axes = f"{_text(spec.get('y_label', 'y'))} vs {_text(spec.get('x_label', 'x'))}"
        return [f"- *{title}*: line chart of {axes}: {names} (drawn in report.html)"]
    if kind == "images":
        images = spec.get("images") or []
        caps = "; ".join(_text(im.get("caption", "")) for im in images[:MAX_ITEMS])
        return [f"- *{title}*: {len(images)} images ({caps}) (shown in report.html)"]
    return [f"- *{title}*: plot kind {_code(kind)} not rendered"]


def _probe(p: Mapping[str, Any], rubric: Mapping[str, Any]) -> list[str]:
    status = str(p.get("status", ""))
    grade = p.get("grade") if status == "ok" else None
    out = [f"## {_text(p.get('title') or p.get('probe'))}", ""]
    head = [_code(p.get("probe", "")), f"risk: {_text(risk_label(str(p.get('risk', ''))))}"]
    if status == "ok":
        line = rubric_line(rubric, p)
        if grade in GRADES:
            head.append(f"grade {_grade(grade)}" + (f" ({_text(line)})" if line else ""))
        else:
            head.append("not graded")
    else:
        head.append(f"**{status}**")
    out += [" · ".join(head), ""]
    if status != "ok":
        label = "Skipped because" if status == "skipped" else "Failed with"
        out += [f"{label}: {_text(p.get('reason', ''))}", ""]
    figure = p.get("figure") or {}
    if status == "ok" and figure:
        value, ci = format_figure(figure)
        out += [
            f"**{_text(figure.get('name', 'measured'))}: {_text(value)}**"
            + (f" ({_text(ci)})" if ci else ""),
            "",
        ]
    threat = p.get("threat") or {}
    if threat:
        items = ", ".join(f"{k}={_value(v, 1)}" for k, v in threat.items())
        out += [f"Threat model: {_text(items)}", ""]
    for flag in p.get("flags") or []:
        out.append(f"> **Warning:** {_text(flag)}")
    if p.get("flags"):
        out.append("")
    if p.get("meaning"):
        out += [f"**What it means.** {_text(p['meaning'])}", ""]
    if p.get("recommendation"):
        out += [f"**What to do.** {_text(p['recommendation'])}", ""]
    for spec in p.get("plots") or []:
        if isinstance(spec, Mapping):
            out += [*_plot(spec), ""]
    details = p.get("details") or {}
    if details:
        out += ["<details><summary>Details</summary>", ""]
        out += [f"- {_text(k)}: {_text(_value(v))}" for k, v in details.items()]
        out += ["", "</details>", ""]
    return out


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: identity, summary table, one section per probe, rubric."""
    target = report.get("target") or {}
    run = report.get("run") or {}
    summary = report.get("summary") or {}
    rubric = report.get("rubric") or {}
    counts = summary.get("counts") or {}
    probes = ordered_probes(report)
    out = ["# modelshield scan report", ""]
    out.append(
        f"**Overall grade: {summary.get('overall_grade') or '—'}** (worst of the probes that ran)"
        f" · {counts.get('ok', 0)} ran, {counts.get('skipped', 0)} skipped,"
        f" {counts.get('error', 0)} failed"
    )
    out.append("")
    ident = [
        ("Model", _artifact(target.get("model"))),
        ("Test data", _artifact(target.get("data"))),
    ]
    if target.get("train_data"):
        ident.append(("Training data", _artifact(target.get("train_data"))))
    for key, val in target.items():
        if key in ("model", "data", "train_data") or val in (None, {}, ""):
            continue
        is_artifact = isinstance(val, Mapping) and any(k in val for k in ("path", "url", "name"))
        label = _text(key.replace("_", " ").capitalize())
        ident.append((label, _artifact(val) if is_artifact else _text(_value(val))))
    cmd = run.get("command")
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(str(c) for c in cmd)
    ident.append(("Command", _code(cmd or "")))
    ident.append(
        (
            "Run",
            f"{_code(run.get('id', ''))} · seed {format_number(run.get('seed'))} · device "
            f"{_text(run.get('device') or '—')} · created {_text(report.get('created', ''))}",
        )
    )
    env = environment_text(run.get("environment"))
    if env:
        ident.append(("Environment", _text(env)))
    out += ["| | |", "| --- | --- |"]
    out += [f"| {k} | {v.replace('|', chr(92) + '|')} |" for k, v in ident]
    out.append("")
    risks = sorted((summary.get("risks") or {}).items(), key=lambda kv: risk_order(kv[0]))
    if risks:
        out.append("Risks: " + " · ".join(f"{_text(risk_label(r))} {_grade(g)}" for r, g in risks))
        out.append("")
    out += [
        "## Summary",
        "",
        "| Risk | Probe | Measured | Grade | Status |",
        "|---|---|---|---|---|",
    ]
    for p in probes:
        if p.get("status") == "ok":
            value, ci = format_figure(p.get("figure") or {})
            name = (p.get("figure") or {}).get("name", "")
            fig = f"{name}: {value}" if name else value
            fig += f" ({ci})" if ci else ""
        else:
            fig = _truncate(str(p.get("reason", "")), 80)
        grade = _grade(p.get("grade")) if p.get("status") == "ok" else ""
        risk = risk_label(str(p.get("risk", "")))
        title = p.get("title") or p.get("probe")
        out.append(
            f"| {_cell(risk)} | {_cell(title)} | {_cell(fig)} | {grade}"
            f" | {_cell(p.get('status', ''))} |"
        )
    out.append("")
    for p in probes:
        out += _probe(p, rubric)
    out += ["---", ""]
    out.append(f"Rubric {_text(rubric.get('version', ''))}: {_text(rubric.get('text', ''))}")
    out.append("")
    grades = rubric.get("grades") or {}
    out += [f"- **{g}**: {_text(grades[g])}" for g in GRADES if g in grades]
    out.append("")
    out.append(
        f"Report schema {_text(report.get('schema_version', SCHEMA_VERSION))} · modelshield "
        f"{_text(report.get('modelshield_version', ''))} · run {_code(run.get('id', ''))}"
    )
    return "\n".join(out).rstrip() + "\n"
