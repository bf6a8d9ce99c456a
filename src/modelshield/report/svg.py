"""Hand-written SVG charts for the report: line charts (linear or log axes, CI bands) and bars.

No plotting library and nothing fetched: each chart is one ``<svg>`` string with axes, ticks,
labels and a legend, sized by its ``viewBox`` so it scales with the page. Colours follow the
Okabe-Ito palette (colour-blind safe) and every series also gets its own dash pattern, so
charts still read when printed in grey.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

PALETTE: tuple[str, ...] = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
DASHES: tuple[str, ...] = ("", "7 4", "2 3", "9 3 2 3", "4 4", "1 2")
TEXT = "#1f2328"
MUTED = "#57606a"
GRID = "#e1e5ea"
AXIS = "#8c959f"
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Arial, sans-serif"
FONT_SIZE = 12.0

WIDTH = 460.0
HEIGHT = 290.0


def _num(v: Any) -> float | None:
    """A plottable finite float, or ``None`` (missing, NaN, infinite, non-numeric)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _f(v: float) -> str:
    """Coordinate text with at most one decimal."""
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


def _text_width(text: str, size: float = FONT_SIZE) -> float:
    """Rough rendered width of ``text`` (average glyph ≈ 0.6 em)."""
    return 0.6 * size * len(text)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ----------------------------------------------------------------------------- ticks


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10^k steps) covering ``[lo, hi]``; first/last bound it."""
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.5 if lo else 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    r = raw / mag
    step = mag * (1 if r < 1.5 else 2 if r < 3 else 5 if r < 7 else 10)
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    n = max(1, round((stop - start) / step))
    return [_tidy(start + i * step) for i in range(n + 1)]


def _tidy(v: float) -> float:
    v = float(f"{v:.12g}")
    return 0.0 if v == 0 else v


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decade ticks covering ``[lo, hi]`` (both > 0), with 2× and 5× when the span is short."""
    k0 = math.floor(math.log10(lo) + 1e-9)
    k1 = math.ceil(math.log10(hi) - 1e-9)
    if k1 <= k0:
        k1 = k0 + 1
    every = max(1, math.ceil((k1 - k0) / 8))
    ticks = [10.0**k for k in range(k0, k1 + 1, every)]
    if ticks[-1] < 10.0**k1:
        ticks.append(10.0 ** (k0 + every * len(ticks)))
    if k1 - k0 <= 2:
        extra = [m * 10.0**k for k in range(k0, k1) for m in (2, 5)]
        ticks = sorted(set(ticks) | set(extra))
    return [_tidy(t) for t in ticks]


def tick_label(v: float, step: float | None = None, log: bool = False) -> str:
    """Short label for a tick value."""
    if v == 0:
        return "0"
    if log:
        k = math.log10(v)
        if abs(k - round(k)) < 1e-9 and not -3 <= k <= 4:
            return f"1e{round(k)}"
        return f"{v:g}" if 1e-3 <= v < 1e5 else f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    if abs(v) >= 1e5 or (step is not None and step < 1e-4):
        return f"{v:.2e}".replace("e-0", "e-").replace("e+0", "e")
    decimals = 0 if step is None else max(0, -math.floor(math.log10(step) + 1e-9))
    text = f"{v:.{decimals}f}"
    return "0" if text.strip("-0.") == "" else text.replace("-", "−")


@dataclass
class Axis:
    """A data interval mapped onto a pixel interval, linear or log10."""

    lo: float
    hi: float
    log: bool
    ticks: list[float]
    labels: list[str]
    px0: float = 0.0
    px1: float = 1.0

    def __call__(self, v: float) -> float:
        if self.log:
            t = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            t = (v - self.lo) / (self.hi - self.lo)
        return self.px0 + t * (self.px1 - self.px0)


def make_axis(values: Sequence[float], log: bool = False, include_zero: bool = False) -> Axis:
    """Axis with round ticks covering ``values`` (non-positive values are dropped on log)."""
    vals = [v for v in values if not log or v > 0]
    if log:
        lo, hi = (min(vals), max(vals)) if vals else (1.0, 10.0)
        ticks = log_ticks(lo, hi)
        labels = [tick_label(t, log=True) for t in ticks]
        return Axis(ticks[0], ticks[-1], True, ticks, labels)
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if include_zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    ticks = nice_ticks(lo, hi)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else None
    labels = [tick_label(t, step) for t in ticks]
    return Axis(ticks[0], ticks[-1], False, ticks, labels)


# ----------------------------------------------------------------------------- frame


def _open_svg(title: str, width: float, height: float) -> list[str]:
    label = escape(title or "chart")
    return [
        f'<svg class="chart" viewBox="0 0 {_f(width)} {_f(height)}" width="{_f(width)}" '
        f'height="{_f(height)}" role="img" aria-label="{label}" font-family="{FONT}" '
        f'font-size="{_f(FONT_SIZE)}" fill="{TEXT}">',
        f"<title>{label}</title>",
        f'<rect x="0" y="0" width="{_f(width)}" height="{_f(height)}" fill="#ffffff"/>',
    ]


def _axes(
    out: list[str], x: Axis, y: Axis, x_label: str, y_label: str, *, x_ticks: bool = True
) -> None:
    """Grid, axis lines, ticks with labels and axis titles."""
    top, bottom = y.px1, y.px0
    left, right = x.px0, x.px1
    for t, lab in zip(y.ticks, y.labels, strict=True):
        py = y(t)
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(py)}" x2="{_f(right)}" y2="{_f(py)}" stroke="{GRID}"/>'
        )
        out.append(
            f'<line x1="{_f(left - 5)}" y1="{_f(py)}" x2="{_f(left)}" y2="{_f(py)}" '
            f'stroke="{AXIS}"/>'
        )
        out.append(
            f'<text x="{_f(left - 8)}" y="{_f(py)}" text-anchor="end" '
            f'dominant-baseline="middle" fill="{MUTED}">{escape(lab)}</text>'
        )
    if x_ticks:
        for t, lab in zip(x.ticks, x.labels, strict=True):
            px = x(t)
            out.append(
                f'<line x1="{_f(px)}" y1="{_f(top)}" x2="{_f(px)}" y2="{_f(bottom)}" '
                f'stroke="{GRID}"/>'
            )
            out.append(
                f'<line x1="{_f(px)}" y1="{_f(bottom)}" x2="{_f(px)}" y2="{_f(bottom + 5)}" '
                f'stroke="{AXIS}"/>'
            )
            out.append(
                f'<text x="{_f(px)}" y="{_f(bottom + 18)}" text-anchor="middle" '
                f'fill="{MUTED}">{escape(lab)}</text>'
            )
    out.append(
        f'<path d="M{_f(left)} {_f(top)}V{_f(bottom)}H{_f(right)}" fill="none" '
        f'stroke="{AXIS}" stroke-width="1.2"/>'
    )
    if x_label:
        out.append(
            f'<text x="{_f((left + right) / 2)}" y="{_f(bottom + 38)}" text-anchor="middle">'
            f"{escape(_clip(x_label, 80))}</text>"
        )
    if y_label:
        cx, cy = 14.0, (top + bottom) / 2
        out.append(
            f'<text x="{_f(cx)}" y="{_f(cy)}" text-anchor="middle" dominant-baseline="middle" '
            f'transform="rotate(-90 {_f(cx)} {_f(cy)})">{escape(_clip(y_label, 50))}</text>'
        )


def _no_data(out: list[str], width: float, height: float) -> None:
    out.append(
        f'<text x="{_f(width / 2)}" y="{_f(height / 2)}" text-anchor="middle" '
        f'fill="{MUTED}">no data to plot</text>'
    )


# ----------------------------------------------------------------------------- line chart


def _runs(points: list[tuple[float, ...] | None]) -> list[list[tuple[float, ...]]]:
    """Split a point list at ``None`` gaps into contiguous runs."""
    runs: list[list[tuple[float, ...]]] = [[]]
    for p in points:
        if p is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if r]


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop points within half a pixel of the previous kept one (long curves stay small)."""
    kept: list[tuple[float, float]] = []
    for p in points:
        if kept and abs(p[0] - kept[-1][0]) < 0.5 and abs(p[1] - kept[-1][1]) < 0.5:
            continue
        kept.append(p)
    if points and kept[-1] != points[-1]:
        kept.append(points[-1])
    return kept


def _coords(points: list[tuple[float, float]]) -> str:
    return " ".join(f"{_f(a)},{_f(b)}" for a, b in _thin(points))


def _legend_rows(names: list[str], avail: float) -> list[list[int]]:
    rows: list[list[int]] = [[]]
    used = 0.0
    for i, name in enumerate(names):
        w = 30 + _text_width(name) + 18
        if rows[-1] and used + w > avail:
            rows.append([])
            used = 0.0
        rows[-1].append(i)
        used += w
    return rows


def line_chart(spec: Mapping[str, Any], width: float = WIDTH, height: float = HEIGHT) -> str:
    """SVG line chart from a ``{"kind": "line", ...}`` plot spec.

    ``series[i]`` has ``x``, ``y`` and optionally ``lo``/``hi`` (drawn as a shaded band).
    ``x_scale``/``y_scale`` may be ``"log"``; points that cannot be placed (missing,
    infinite, or non-positive on a log axis) break the line instead of being invented.
    """
    x_log = spec.get("x_scale") == "log"
    y_log = spec.get("y_scale") == "log"
    series = [s for s in spec.get("series") or [] if isinstance(s, Mapping)]

    def place(v: float | None, log: bool) -> float | None:
        return v if v is not None and (not log or v > 0) else None

    prepared: list[dict[str, Any]] = []
    xs_all: list[float] = []
    ys_all: list[float] = []
    for s in series:
        xs = [place(_num(v), x_log) for v in s.get("x") or []]
        ys = [place(_num(v), y_log) for v in s.get("y") or []]
        los = [place(_num(v), y_log) for v in s.get("lo") or []]
        his = [place(_num(v), y_log) for v in s.get("hi") or []]
        pts: list[tuple[float, ...] | None] = []
        band: list[tuple[float, ...] | None] = []
        for i in range(min(len(xs), len(ys))):
            xv, yv = xs[i], ys[i]
            if xv is not None and yv is not None:
                pts.append((xv, yv))
                xs_all.append(xv)
                ys_all.append(yv)
            else:
                pts.append(None)
            if los and his:
                lv = los[i] if i < len(los) else None
                hv = his[i] if i < len(his) else None
                if xv is not None and lv is not None and hv is not None:
                    band.append((xv, lv, hv))
                    ys_all.extend((lv, hv))
                else:
                    band.append(None)
        prepared.append({"name": str(s.get("name", "")), "pts": pts, "band": band})

    title = str(spec.get("title", ""))
    out = _open_svg(title, width, height)
    show_legend = len(prepared) > 1 or any(p["name"] for p in prepared)
    names = [p["name"] or f"series {i + 1}" for i, p in enumerate(prepared)]
    x = make_axis(xs_all, x_log)
    y = make_axis(ys_all, y_log)
    left = 30 + max((_text_width(lab) for lab in y.labels), default=10) + 10
    right = 18.0
    rows = _legend_rows(names, width - left - right) if show_legend else []
    top = 14 + 18 * len(rows)
    bottom = 50.0
    x.px0, x.px1 = left, width - right
    y.px0, y.px1 = height - bottom, top
    _axes(out, x, y, str(spec.get("x_label", "")), str(spec.get("y_label", "")))
    if not xs_all:
        _no_data(out, width, height)

    for i, p in enumerate(prepared):
        colour = PALETTE[i % len(PALETTE)]
        for run in _runs(p["band"]):
            upper = _coords([(x(a), y(h)) for a, _, h in run])
            lower = _coords([(x(a), y(lo)) for a, lo, _ in reversed(run)])
            out.append(
                f'<polygon points="{upper} {lower}" fill="{colour}" '
                f'fill-opacity="0.16" stroke="none"/>'
            )
    for i, p in enumerate(prepared):
        colour = PALETTE[i % len(PALETTE)]
        dash = DASHES[i % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        runs = _runs(p["pts"])
        npts = sum(len(r) for r in runs)
        for run in runs:
            coords = _coords([(x(a), y(b)) for a, b in run])
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2" '
                f'stroke-linejoin="round" stroke-linecap="round"{dash_attr}/>'
            )
            if npts <= 40:
                out.extend(
                    f'<circle cx="{_f(x(a))}" cy="{_f(y(b))}" r="2.8" fill="{colour}"/>'
                    for a, b in run
                )

    for r, row in enumerate(rows):
        lx = left
        ly = 10 + 18 * r
        for i in row:
            p = prepared[i]
            colour = PALETTE[i % len(PALETTE)]
            dash = DASHES[i % len(DASHES)]
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            if any(b is not None for b in p["band"]):
                out.append(
                    f'<rect x="{_f(lx)}" y="{_f(ly - 5)}" width="24" height="10" '
                    f'fill="{colour}" fill-opacity="0.16"/>'
                )
            out.append(
                f'<line x1="{_f(lx)}" y1="{_f(ly)}" x2="{_f(lx + 24)}" y2="{_f(ly)}" '
                f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
            )
            name = names[i]
            out.append(
                f'<text x="{_f(lx + 30)}" y="{_f(ly)}" dominant-baseline="middle">'
                f"{escape(name)}</text>"
            )
            lx += 30 + _text_width(name) + 18
    out.append("</svg>")
    return "".join(out)


# ----------------------------------------------------------------------------- bar chart


def bar_chart(spec: Mapping[str, Any], width: float = WIDTH, height: float = HEIGHT) -> str:
    """SVG bar chart from a ``{"kind": "bar", "labels", "values", "y_label"}`` plot spec."""
    labels = [str(v) for v in spec.get("labels") or []]
    values = [_num(v) for v in spec.get("values") or []]
    n = min(len(labels), len(values))
    labels, values = labels[:n], values[:n]
    finite = [v for v in values if v is not None]
    title = str(spec.get("title", ""))
    out = _open_svg(title, width, height)
    y = make_axis(finite, include_zero=True)
    shown = [_clip(lab, 22) for lab in labels]
    left = 30 + max((_text_width(lab) for lab in y.labels), default=10) + 10
    right = 14.0
    band = (width - left - right) / max(n, 1)
    longest = max((_text_width(s) for s in shown), default=0.0)
    rotate = longest > band - 6
    bottom = 30 + (longest * 0.62 + 14 if rotate else 16)
    top = 22.0
    y.px0, y.px1 = height - bottom, top
    x = Axis(0.0, float(max(n, 1)), False, [], [], left, width - right)
    _axes(out, x, y, "", str(spec.get("y_label", "")), x_ticks=False)
    if not n:
        _no_data(out, width, height)
    zero = y(0.0)
    bw = band * 0.68
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        cx = left + band * (i + 0.5)
        if v is not None:
            py = y(v)
            top_y, h = min(py, zero), abs(zero - py)
            out.append(
                f'<rect x="{_f(cx - bw / 2)}" y="{_f(top_y)}" width="{_f(bw)}" '
                f'height="{_f(max(h, 0.5))}" fill="{PALETTE[0]}"><title>'
                f"{escape(lab)}: {escape(_value_text(v))}</title></rect>"
            )
            if band >= 30:
                ty = top_y - 5 if v >= 0 else top_y + h + 13
                out.append(
                    f'<text x="{_f(cx)}" y="{_f(ty)}" text-anchor="middle" font-size="11">'
                    f"{escape(_value_text(v))}</text>"
                )
        else:
            out.append(
                f'<text x="{_f(cx)}" y="{_f(zero - 5)}" text-anchor="middle" font-size="11" '
                f'fill="{MUTED}">n/a</text>'
            )
        label_y = height - bottom + 16
        short = escape(shown[i])
        if rotate:
            out.append(
                f'<text x="{_f(cx)}" y="{_f(label_y)}" text-anchor="end" '
                f'transform="rotate(-35 {_f(cx)} {_f(label_y)})">{short}</text>'
            )
        else:
            out.append(f'<text x="{_f(cx)}" y="{_f(label_y)}" text-anchor="middle">{short}</text>')
    if y.lo < 0:
        out.append(
            f'<line x1="{_f(left)}" y1="{_f(zero)}" x2="{_f(width - right)}" y2="{_f(zero)}" '
            f'stroke="{AXIS}"/>'
        )
    out.append("</svg>")
    return "".join(out)


def _value_text(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.2e}"


def render_plot_svg(spec: Mapping[str, Any]) -> str:
    """SVG for a ``line`` or ``bar`` plot spec; ``ValueError`` for other kinds."""
    kind = spec.get("kind")
    if kind == "line":
        return line_chart(spec)
    if kind == "bar":
        return bar_chart(spec)
    raise ValueError(f"plot kind {kind!r} is not drawn as SVG (line and bar are)")
