"""Render the report as ONE self-contained HTML file.

Inline CSS, inline SVG charts, images as ``data:`` PNGs, no scripts and no external URL; a
Content-Security-Policy meta tag makes the browser refuse anything else, so the file can be
opened offline or attached to a ticket. Every string that came from a probe, a path or the
command line goes through :func:`html.escape`.
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
from modelshield.report.png import data_uri, image_to_png
from modelshield.report.svg import bar_chart, line_chart

# Background / text colour per grade: green (A) to red (F); contrast >= 4.5:1 for each pair.
GRADE_COLOURS: dict[str, tuple[str, str]] = {
    "A": ("#1a7f37", "#ffffff"),
    "B": ("#8ccf7e", "#1f2328"),
    "C": ("#f2c744", "#1f2328"),
    "D": ("#f0883e", "#1f2328"),
    "E": ("#bc4c00", "#ffffff"),
    "F": ("#cf222e", "#ffffff"),
}
NO_GRADE = ("#6e7781", "#ffffff")

MAX_TABLE_ROWS = 200
MAX_ITEMS = 12
MAX_TEXT = 400
MAX_DEPTH = 3
MAX_IMAGES = 64

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _css() -> str:
    grade_rules = "\n".join(
        f".grade-{g}{{background:{bg};color:{fg}}}"
        f" section.probe.grade-border-{g}{{border-left-color:{bg}}}"
        for g, (bg, fg) in GRADE_COLOURS.items()
    )
    return (
        """
:root{color-scheme:light;--fg:#1f2328;--muted:#57606a;--line:#d0d7de;--soft:#f6f8fa;
--warn-bg:#fff8c5;--warn-line:#d4a72c;--warn-fg:#6b4a00;--err-bg:#ffebe9;--err-line:#cf222e;
--err-fg:#a40e26;--link:#0550ae}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;background:#fff;color:var(--fg);
font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
.wrap{max-width:1000px;margin:0 auto;padding:0 24px}
a{color:var(--link)}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"Liberation Mono",monospace;
font-size:.88em}
h1{font-size:26px;line-height:1.2;margin:0 0 4px}
h2{font-size:20px;line-height:1.25;margin:0}
h3{font-size:13px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted);
margin:18px 0 6px}
p{margin:0 0 8px}
.muted{color:var(--muted)}
header.page{border-bottom:1px solid var(--line);padding:28px 0 20px;background:var(--soft)}
.head{display:flex;gap:28px;align-items:flex-start;justify-content:space-between;flex-wrap:wrap}
.head .ident{flex:1 1 480px;min-width:0}
.subtitle{color:var(--muted);margin:0 0 14px}
.overall{text-align:center;flex:0 0 auto}
.overall .grade{font-size:44px;min-width:84px;height:84px;line-height:84px;border-radius:14px;
padding:0 14px}
.overall .label{font-size:12px;text-transform:uppercase;letter-spacing:.06em;color:var(--muted);
margin-top:6px}
.grade{display:inline-block;min-width:2em;padding:0 .45em;border-radius:6px;font-weight:700;
text-align:center;background:#6e7781;color:#fff;line-height:1.6}
.grade.none{font-weight:600}
table{border-collapse:collapse}
table.kv th{text-align:left;font-weight:600;color:var(--muted);padding:2px 18px 2px 0;
vertical-align:top;white-space:nowrap}
table.kv td{padding:2px 0;vertical-align:top;overflow-wrap:anywhere}
table.kv table.kv{font-size:.95em}
.risks{display:flex;flex-wrap:wrap;gap:8px;margin-top:16px;padding:0;list-style:none}
.risks li{display:flex;align-items:center;gap:8px;background:#fff;border:1px solid var(--line);
border-radius:8px;padding:4px 10px 4px 4px;font-size:14px}
.counts{margin-top:10px;color:var(--muted);font-size:14px}
main{padding-bottom:24px}
#summary{margin-top:28px}
table.grid{width:100%;font-size:14px;margin:8px 0}
.plot table.grid{width:auto;min-width:50%}
table.grid th,table.grid td{border-bottom:1px solid var(--line);padding:6px 10px;text-align:left;
vertical-align:top}
table.grid thead th{background:var(--soft);font-weight:600;border-bottom:2px solid var(--line)}
table.grid td.num,table.grid th.num{text-align:right;font-variant-numeric:tabular-nums}
table.grid tbody tr:nth-child(even) td{background:#fbfcfd}
.summary td.grade-cell{text-align:center;width:4.5em}
.status{display:inline-block;font-size:12px;font-weight:600;border-radius:999px;padding:1px 9px;
border:1px solid var(--line);color:var(--muted);background:#fff;white-space:nowrap}
.status.ok{color:#1a7f37;border-color:#8ccf7e}
.status.skipped{color:var(--muted)}
.status.error{color:var(--err-fg);border-color:var(--err-line);background:var(--err-bg)}
.ci{color:var(--muted);font-size:.9em;white-space:nowrap}
section.probe{border:1px solid var(--line);border-left:6px solid #8c959f;border-radius:8px;
padding:18px 22px;margin:22px 0}
section.probe.status-skipped{background:var(--soft)}
section.probe.status-error{border-left-color:var(--err-line)}
.probe-head{display:flex;align-items:flex-start;justify-content:space-between;gap:16px}
.probe-head .grade{font-size:24px;min-width:48px;line-height:48px;border-radius:10px}
.probe-head .meta{color:var(--muted);font-size:13px;margin-top:2px}
.facts{display:flex;flex-wrap:wrap;gap:14px;margin-top:14px}
.fact{flex:1 1 280px;border:1px solid var(--line);border-radius:8px;padding:10px 14px;
background:#fff;min-width:0}
.fact .k{font-size:12px;text-transform:uppercase;letter-spacing:.05em;color:var(--muted)}
.fig-value{font-size:30px;font-weight:700;font-variant-numeric:tabular-nums;line-height:1.2}
.rubric{margin-top:6px;font-size:14px}
.flags{list-style:none;padding:0;margin:14px 0 0}
.flags li{background:var(--warn-bg);border:1px solid var(--warn-line);color:var(--fg);
border-radius:6px;padding:6px 12px;margin:6px 0;font-size:14px}
.flags li strong{color:var(--warn-fg)}
.reason{border:1px solid var(--line);background:#fff;border-radius:6px;padding:8px 12px;
margin-top:14px}
.status-error .reason{background:var(--err-bg);border-color:var(--err-line)}
.reason pre{margin:4px 0 0;white-space:pre-wrap;overflow-wrap:anywhere}
.advice{display:grid;grid-template-columns:1fr 1fr;gap:0 28px}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(400px,1fr));gap:22px 28px;
margin-top:6px}
figure.plot{margin:0;min-width:0}
figure.plot svg{display:block;width:100%;max-width:460px;height:auto}
figure.plot>figcaption{font-weight:600;font-size:14px;margin-bottom:4px}
figure.wide{grid-column:1/-1}
.images{display:flex;flex-wrap:wrap;gap:12px}
.images figure{margin:0;text-align:center;font-size:12px;color:var(--muted);max-width:140px}
.images figcaption{font-weight:400}
.images img{display:block;margin:0 auto 3px;image-rendering:pixelated;border:1px solid var(--line)}
.table-wrap{overflow-x:auto}
.note{color:var(--muted);font-size:13px}
footer.page{border-top:1px solid var(--line);background:var(--soft);padding:18px 0 28px;
font-size:13px;color:var(--muted)}
footer.page dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:8px 0}
footer.page dt{font-weight:700}
footer.page dd{margin:0}
@media (max-width:720px){.wrap{padding:0 14px}.advice{grid-template-columns:1fr}
.plots{grid-template-columns:1fr}section.probe{padding:14px}
.overall{order:-1;display:flex;align-items:center;gap:12px;text-align:left}
.overall .grade{font-size:30px;min-width:56px;height:56px;line-height:56px}
.overall .label{margin:0}}
@media print{
body{font-size:10.5pt}
.wrap{max-width:none;padding:0}
header.page,footer.page{background:none}
a{color:inherit;text-decoration:none}
.grade,.status,section.probe,.flags li,.reason{-webkit-print-color-adjust:exact;
print-color-adjust:exact}
section.probe{break-inside:auto}
.probe-head,figure,.fact,.flags li,tr{break-inside:avoid}
h2,h3{break-after:avoid}
.plots{grid-template-columns:1fr 1fr}
}
"""
        + grade_rules
        + "\n"
    )


# ----------------------------------------------------------------------------- small pieces


def grade_badge(grade: Any, *, title: str = "") -> str:
    """``<span class="grade grade-C">C</span>``; a grey dash for no grade."""
    tip = f' title="{_e(title)}"' if title else ""
    if grade in GRADES:
        return f'<span class="grade grade-{grade}"{tip}>{grade}</span>'
    return f'<span class="grade none"{tip} aria-label="not graded">—</span>'


def _status(status: str) -> str:
    word = {"ok": "ran", "skipped": "skipped", "error": "error"}.get(status, status)
    return f'<span class="status {_e(status)}">{_e(word)}</span>'


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in str(text).split("\n\n") if p.strip()]
    return "".join(f"<p>{_e(p)}</p>".replace("\n", "<br>") for p in parts)


def _truncate(text: str, n: int = MAX_TEXT) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _scalar(v: Any) -> str:
    if isinstance(v, str):
        return _e(_truncate(v))
    return _e(format_number(v))


def value_html(value: Any, depth: int = 0) -> str:
    """Compact HTML for a JSON value: nested tables for objects, truncated lists."""
    if is_tensor_record(value):
        return f'<span class="mono">{_e(tensor_summary(value))}</span>'
    if _is_scalar(value):
        return _scalar(value)
    if isinstance(value, Mapping):
        if not value:
            return '<span class="muted">{}</span>'
        if depth >= MAX_DEPTH:
            return f'<span class="muted">{{{len(value)} keys}}</span>'
        return kv_table(value, depth + 1)
    if isinstance(value, (list, tuple)):
        n = len(value)
        if not n:
            return '<span class="muted">[]</span>'
        shown = list(value[:MAX_ITEMS])
        more = f' <span class="muted">… ({n} items)</span>' if n > MAX_ITEMS else ""
        if all(_is_scalar(v) for v in shown):
            return ", ".join(_scalar(v) for v in shown) + more
        if depth >= MAX_DEPTH:
            return f'<span class="muted">[{n} items]</span>'
        items = "".join(f"<li>{value_html(v, depth + 1)}</li>" for v in shown[:5])
        more = f'<li class="muted">… ({n} items)</li>' if n > 5 else ""
        return f'<ol start="0" class="items">{items}{more}</ol>'
    return _e(_truncate(repr(value)))


def kv_table(d: Mapping[str, Any], depth: int = 0, limit: int = 40) -> str:
    """Key/value table for a dict (details, threat model, identity)."""
    rows = []
    items = list(d.items())
    for k, v in items[:limit]:
        rows.append(f"<tr><th>{_e(k)}</th><td>{value_html(v, depth)}</td></tr>")
    if len(items) > limit:
        rows.append(f'<tr><th></th><td class="muted">… {len(items) - limit} more</td></tr>')
    return f'<table class="kv">{"".join(rows)}</table>'


# ----------------------------------------------------------------------------- plots


def _images_html(spec: Mapping[str, Any]) -> str:
    cells = []
    images = list(spec.get("images") or [])
    for im in images[:MAX_IMAGES]:
        caption = str(im.get("caption", ""))
        try:
            png, w, h = image_to_png(im.get("shape", []), im.get("data", []))
        except (ValueError, TypeError) as exc:
            cells.append(f'<figure><span class="note">cannot draw: {_e(exc)}</span></figure>')
            continue
        cells.append(
            f'<figure><img src="{data_uri(png)}" width="{w}" height="{h}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>"
        )
    note = ""
    if len(images) > MAX_IMAGES:
        note = f'<p class="note">First {MAX_IMAGES} of {len(images)} images.</p>'
    return f'<div class="images">{"".join(cells)}</div>{note}'


def _table_html(spec: Mapping[str, Any]) -> str:
    columns = [str(c) for c in spec.get("columns") or []]
    rows = list(spec.get("rows") or [])
    numeric = [
        all(isinstance(r[i], (int, float)) or r[i] is None for r in rows if i < len(r))
        for i in range(len(columns))
    ]
    num = ' class="num"'
    head = "".join(f"<th{num if numeric[i] else ''}>{_e(c)}</th>" for i, c in enumerate(columns))
    body = []
    for r in rows[:MAX_TABLE_ROWS]:
        cells = "".join(
            f"<td{num if i < len(numeric) and numeric[i] else ''}>{_scalar(v)}</td>"
            for i, v in enumerate(r)
        )
        body.append(f"<tr>{cells}</tr>")
    note = ""
    if len(rows) > MAX_TABLE_ROWS:
        note = (
            f'<p class="note">First {MAX_TABLE_ROWS} of {len(rows)} rows;'
            " all are in report.json.</p>"
        )
    return (
        f'<div class="table-wrap"><table class="grid"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{note}"
    )


def plot_html(spec: Mapping[str, Any]) -> str:
    """One ``<figure class="plot">`` for a line, bar, images or table plot spec."""
    kind = spec.get("kind")
    title = str(spec.get("title", ""))
    if kind == "line":
        body, wide = line_chart(spec), False
    elif kind == "bar":
        body, wide = bar_chart(spec), False
    elif kind == "images":
        body, wide = _images_html(spec), True
    elif kind == "table":
        body, wide = _table_html(spec), True
    else:
        body, wide = f'<p class="note">Plot kind {_e(kind)} is not supported.</p>', True
    cls = f"plot plot-{_e(kind)}" + (" wide" if wide else "")
    cap = f"<figcaption>{_e(title)}</figcaption>" if title else ""
    return f'<figure class="{cls}">{cap}{body}</figure>'


# ----------------------------------------------------------------------------- sections


def _artifact(a: Any) -> str:
    if not isinstance(a, Mapping):
        return '<span class="muted">none</span>'
    parts = []
    label = a.get("path") or a.get("name") or a.get("url")
    parts.append(f"<code>{_e(label)}</code>" if label else '<span class="muted">unnamed</span>')
    sha = a.get("sha256")
    if sha:
        parts.append(
            f'<span class="mono muted" title="sha256 {_e(sha)}">sha256 {_e(short_hash(sha))}</span>'
        )
    extra = [str(a[k]) for k in ("format",) if a.get(k)]
    if a.get("n") is not None:
        extra.append(f"{format_number(a['n'])} samples")
    if extra:
        parts.append(f'<span class="muted">{_e(", ".join(extra))}</span>')
    return " · ".join(parts)


def _command(cmd: Any) -> str:
    if isinstance(cmd, (list, tuple)):
        cmd = " ".join(str(c) for c in cmd)
    return f"<code>{_e(cmd)}</code>" if cmd else '<span class="muted">—</span>'


def _header(report: Mapping[str, Any]) -> str:
    target = report.get("target") or {}
    run = report.get("run") or {}
    summary = report.get("summary") or {}
    counts = summary.get("counts") or {}
    rows = [("Model", _artifact(target.get("model"))), ("Test data", _artifact(target.get("data")))]
    if target.get("train_data"):
        rows.append(("Training data", _artifact(target.get("train_data"))))
    for key, val in target.items():
        if key in ("model", "data", "train_data") or val in (None, {}, ""):
            continue
        is_artifact = isinstance(val, Mapping) and any(k in val for k in ("path", "url", "name"))
        shown = _artifact(val) if is_artifact else value_html(val, 1)
        rows.append((_e(key.replace("_", " ").capitalize()), shown))
    rows.append(("Command", _command(run.get("command"))))
    when = run.get("started") or report.get("created")
    rows.append(
        (
            "Run",
            f"<code>{_e(run.get('id', ''))}</code> · seed {_e(format_number(run.get('seed')))}"
            f" · device {_e(run.get('device') or '—')} · {_e(when)}",
        )
    )
    env = environment_text(run.get("environment"))
    if env:
        rows.append(("Environment", _e(env)))
    est = run.get("estimate")
    if isinstance(est, Mapping) and est.get("total_seconds") is not None:
        bound = "at most " if est.get("bound") == "upper" else ""
        took = est.get("actual_seconds")
        rows.append(
            (
                "Time",
                f"estimated {bound}{_e(format_number(est.get('total_seconds')))} s before starting"
                + (f" · probes took {_e(format_number(took))} s" if took is not None else "")
                + " (per probe: <code>run.estimate</code> in report.json)",
            )
        )
    ident = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    risk_grades = sorted((summary.get("risks") or {}).items(), key=lambda kv: risk_order(kv[0]))
    risks = "".join(f"<li>{grade_badge(g)} {_e(risk_label(r))}</li>" for r, g in risk_grades)
    n = sum(int(counts.get(k, 0)) for k in ("ok", "skipped", "error"))
    count_text = (
        f"{n} probes: {counts.get('ok', 0)} ran, {counts.get('skipped', 0)} skipped, "
        f"{counts.get('error', 0)} failed"
    )
    overall = summary.get("overall_grade")
    rubric = report.get("rubric") or {}
    overall_tip = str((rubric.get("grades") or {}).get(overall, "")) if overall else ""
    return (
        '<header class="page"><div class="wrap head"><div class="ident">'
        "<h1>modelshield scan report</h1>"
        f'<p class="subtitle">Created {_e(report.get("created", ""))} · rubric '
        f"{_e(rubric.get('version', '?'))}</p>"
        f'<table class="kv ident-table">{ident}</table>'
        f'<ul class="risks" aria-label="grade per risk">{risks}</ul>'
        f'<p class="counts">{_e(count_text)}</p>'
        '</div><div class="overall">'
        f"{grade_badge(overall, title=overall_tip)}"
        '<div><div class="label">overall grade</div>'
        '<div class="note">worst of the probes that ran</div></div></div></div></header>'
    )


def _summary_table(probes: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for p in probes:
        value, ci = format_figure(p.get("figure") or {}) if p.get("status") == "ok" else ("", "")
        name = (p.get("figure") or {}).get("name", "")
        if p.get("status") == "ok":
            fig = f"{_e(name)}: <strong>{_e(value)}</strong>" if name else _e(value)
            if ci:
                fig += f' <span class="ci">{_e(ci)}</span>'
        else:
            fig = f'<span class="muted">{_e(_truncate(str(p.get("reason", "")), 120))}</span>'
        grade = grade_badge(p.get("grade")) if p.get("status") == "ok" else ""
        rows.append(
            f"<tr><td>{_e(risk_label(str(p.get('risk', ''))))}</td>"
            f'<td><a href="#{_e(_section_id(p))}">{_e(p.get("title") or p.get("probe"))}</a></td>'
            f'<td>{fig}</td><td class="grade-cell">{grade}</td>'
            f"<td>{_status(str(p.get('status', '')))}</td></tr>"
        )
    return (
        '<section class="overview" id="summary"><h2>Summary</h2>'
        '<div class="table-wrap"><table class="grid summary"><thead><tr><th>Risk</th>'
        "<th>Probe</th><th>Measured</th><th>Grade</th><th>Status</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _section_id(p: Mapping[str, Any]) -> str:
    return "probe-" + "".join(c if not c.isspace() else "-" for c in str(p.get("probe", "")))


def probe_section(p: Mapping[str, Any], rubric: Mapping[str, Any]) -> str:
    """The ``<section id="probe-NAME" class="probe">`` for one probe."""
    status = str(p.get("status", ""))
    grade = p.get("grade") if status == "ok" else None
    classes = f"probe status-{_e(status)}"
    if grade in GRADES:
        classes += f" grade-border-{grade}"
    meta = [f"<code>{_e(p.get('probe', ''))}</code>", _e(risk_label(str(p.get("risk", ""))))]
    if p.get("wall_time"):
        meta.append(f"{_e(format_number(p.get('wall_time')))} s")
    if p.get("seed") is not None:
        meta.append(f"seed {_e(p.get('seed'))}")
    right = grade_badge(grade) if status == "ok" else _status(status)
    out = [
        f'<section id="{_e(_section_id(p))}" class="{classes}">',
        f'<div class="probe-head"><div><h2>{_e(p.get("title") or p.get("probe"))}</h2>'
        f'<div class="meta">{" · ".join(meta)}</div></div>{right}</div>',
    ]
    if status != "ok":
        label = "Skipped because" if status == "skipped" else "Failed with"
        reason = _e(p.get("reason", ""))
        out.append(f'<div class="reason"><strong>{label}:</strong><pre>{reason}</pre></div>')
    facts = []
    figure = p.get("figure") or {}
    if status == "ok" and figure:
        value, ci = format_figure(figure)
        line = rubric_line(rubric, p)
        rub = (
            f'<div class="rubric">Grade <strong>{_e(grade)}</strong>: {_e(line)}</div>'
            if grade in GRADES
            else '<div class="rubric muted">Not graded: reported for information.</div>'
        )
        facts.append(
            f'<div class="fact figure"><div class="k">{_e(figure.get("name", "measured"))}</div>'
            f'<div class="fig-value">{_e(value)}</div>'
            + (f'<div class="ci">{_e(ci)}</div>' if ci else "")
            + f"{rub}</div>"
        )
    threat = p.get("threat") or {}
    if threat:
        facts.append(
            f'<div class="fact threat"><div class="k">Threat model</div>{kv_table(threat, 1)}</div>'
        )
    if facts:
        out.append(f'<div class="facts">{"".join(facts)}</div>')
    flags = [str(f) for f in p.get("flags") or []]
    if flags:
        items = "".join(f"<li><strong>Warning:</strong> {_e(f)}</li>" for f in flags)
        out.append(f'<ul class="flags" aria-label="warnings">{items}</ul>')
    advice = []
    if p.get("meaning"):
        advice.append(f"<div><h3>What it means</h3>{_paragraphs(p['meaning'])}</div>")
    if p.get("recommendation"):
        advice.append(f"<div><h3>What to do</h3>{_paragraphs(p['recommendation'])}</div>")
    if advice:
        out.append(f'<div class="advice">{"".join(advice)}</div>')
    plots = [q for q in p.get("plots") or [] if isinstance(q, Mapping)]
    if plots:
        out.append(f'<h3>Plots</h3><div class="plots">{"".join(plot_html(q) for q in plots)}</div>')
    details = p.get("details") or {}
    if details:
        out.append(f"<h3>Details</h3>{kv_table(details)}")
    config = p.get("config") or {}
    if config:
        out.append(f"<h3>Settings</h3>{kv_table(config)}")
    out.append("</section>")
    return "".join(out)


def _footer(report: Mapping[str, Any]) -> str:
    rubric = report.get("rubric") or {}
    grades = rubric.get("grades") or {}
    dl = "".join(
        f"<dt>{grade_badge(g)}</dt><dd>{_e(grades[g])}</dd>" for g in GRADES if g in grades
    )
    run = report.get("run") or {}
    return (
        '<footer class="page"><div class="wrap">'
        f"<p><strong>Rubric {_e(rubric.get('version', ''))}.</strong> "
        f"{_e(rubric.get('text', ''))}</p>"
        f"<dl>{dl}</dl>"
        f"<p>Report schema {_e(report.get('schema_version', SCHEMA_VERSION))} · modelshield "
        f"{_e(report.get('modelshield_version', ''))} · run <code>{_e(run.get('id', ''))}</code>"
        f" · started {_e(run.get('started') or '—')} · finished {_e(run.get('finished') or '—')}"
        " · the full record is in report.json.</p>"
        "</div></footer>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The whole report as one self-contained HTML document (no network, no scripts)."""
    probes = ordered_probes(report)
    rubric = report.get("rubric") or {}
    model = ((report.get("target") or {}).get("model") or {}).get("path") or "model"
    grade = (report.get("summary") or {}).get("overall_grade") or "—"
    sections = "".join(probe_section(p, rubric) for p in probes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="generator" content="modelshield">'
        f"<title>modelshield report: {_e(model)} (grade {_e(grade)})</title>"
        f"<style>{_css()}</style></head><body>"
        f"{_header(report)}"
        f'<main class="wrap">{_summary_table(probes)}{sections}</main>'
        f"{_footer(report)}</body></html>\n"
    )
