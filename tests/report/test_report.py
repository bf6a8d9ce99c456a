"""Report: schema validation, summary, JSON round trip, HTML / Markdown / SVG / PNG output."""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import modelshield.report.build as build_mod
from modelshield.core.errors import DataError
from modelshield.core.results import ProbeResult
from modelshield.report import (
    SCHEMA_VERSION,
    build_report,
    load_report,
    load_schema,
    render_html,
    render_markdown,
    validate_report,
    write_reports,
)
from modelshield.report.png import encode_png, image_to_png, upscale_factor
from modelshield.report.svg import bar_chart, line_chart, log_ticks, nice_ticks

SHA = "3f" * 32
XSS = "<script>alert('x')</script>"

RUBRIC: dict[str, Any] = {
    "version": "2025.1",
    "text": "Each risk is graded A (no measurable risk) to F (broken) from the measured figure.",
    "grades": {
        "A": "no measurable risk under the threat model",
        "B": "small risk; acceptable for most uses",
        "C": "moderate risk; mitigate before exposing the model",
        "D": "high risk; do not ship without a defence",
        "E": "very high risk",
        "F": "broken: the attack succeeds almost always",
    },
    "probes": {"pgd_linf": {"D": "robust accuracy between 0.2 and 0.4 at eps = 8/255"}},
}


def _image(c: int, h: int, w: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(c * h * w, generator=g).tolist()
    return {"caption": f"sample {seed}", "shape": [c, h, w], "data": data}


def sample_probes() -> list[ProbeResult]:
    """Several probes covering every status and plot kind."""
    eps = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]
    acc = [0.91, 0.82, 0.71, 0.52, 0.312, 0.08]
    fpr = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    return [
        ProbeResult(
            probe="model_file",
            title="Model file safety",
            risk="supply-chain",
            figure={"name": "dangerous pickle globals", "value": 0},
            grade="A",
            meaning="The model file loads without executing code.",
            recommendation="Keep shipping weights as torch.export or safetensors.",
            details={"format": "pt2", "globals": [], "size_bytes": 18234},
        ),
        ProbeResult(
            probe="pgd_linf",
            title="Evasion: PGD (L∞)",
            risk="evasion",
            figure={
                "name": "robust accuracy",
                "value": 0.312,
                "ci": [0.281, 0.345],
                "confidence": 0.95,
            },
            grade="D",
            meaning="About 69% of test inputs can be flipped by an invisible perturbation.",
            recommendation="Adversarially train (PGD-AT or TRADES), then re-scan.\n\n"
            "Check the gradient-masking flag first.",
            threat={"norm": "linf", "eps": 8 / 255, "bounds": [0.0, 1.0], "targeted": False},
            details={
                "n": 1000,
                "steps": 50,
                "restarts": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
                "per_class": {"0": 0.3, "1": 0.25, "nested": {"deep": {"deeper": [1, 2]}}},
                "x_adv": torch.zeros(2, 3),
            },
            flags=["gradient masking suspected: black-box attack beat white-box on 3% of inputs"],
            plots=[
                {
                    "kind": "line",
                    "title": "Robust accuracy vs eps",
                    "x_label": "eps (L∞)",
                    "y_label": "robust accuracy",
                    "series": [
                        {
                            "name": "PGD-50",
                            "x": eps,
                            "y": acc,
                            "lo": [a - 0.03 for a in acc],
                            "hi": [a + 0.03 for a in acc],
                        },
                        {"name": "FGSM", "x": eps, "y": [0.91, 0.86, 0.8, 0.66, 0.5, 0.3]},
                    ],
                },
                {
                    "kind": "images",
                    "title": "Clean and adversarial examples",
                    "images": [_image(3, 8, 8, 1), _image(1, 8, 8, 2), _image(3, 28, 28, 3)],
                },
            ],
            seed=0,
            wall_time=3.25,
        ),
        ProbeResult(
            probe="knockoff",
            title="Model stealing: knockoff nets",
            risk="extraction",
            status="error",
            reason=f"OracleError: {XSS} endpoint refused the connection",
        ),
        ProbeResult(
            probe="spectral_signature",
            title="Poisoning: spectral signature",
            risk="poisoning",
            status="skipped",
            reason="needs --train-data",
        ),
        ProbeResult(
            probe="lira",
            title="Membership inference: LiRA",
            risk="privacy",
            figure={
                "name": "TPR at 0.1% FPR",
                "value": 2.1,
                "unit": "%",
                "ci": [1.5, 2.9],
                "confidence": 0.95,
            },
            grade="C",
            meaning="An attacker identifies 2.1% of training members with 0.1% false positives.",
            recommendation="Train with DP-SGD (modelshield train --dp) or regularise.",
            threat={"access": "logits", "shadow_models": 16},
            plots=[
                {
                    "kind": "line",
                    "title": "ROC (log-log)",
                    "x_label": "false positive rate",
                    "y_label": "true positive rate",
                    "x_scale": "log",
                    "y_scale": "log",
                    "series": [
                        {"name": "LiRA", "x": fpr, "y": [2e-3, 2.1e-2, 6e-2, 0.25, 1.0]},
                        {"name": "chance", "x": fpr, "y": fpr},
                    ],
                },
                {
                    "kind": "bar",
                    "title": "AUC per attack",
                    "labels": ["loss", "shadow", "LiRA", "RMIA"],
                    "values": [0.56, 0.58, 0.63, None],
                    "y_label": "AUC",
                },
                {
                    "kind": "table",
                    "title": "TPR at fixed FPR",
                    "columns": ["FPR", "TPR", "note"],
                    "rows": [[0.001, 0.021, "a | b"], [0.01, 0.06, None], [0.1, 0.25, XSS]],
                },
            ],
        ),
        ProbeResult(
            probe="dp_audit",
            title="DP audit",
            risk="privacy",
            figure={"name": "empirical epsilon lower bound", "value": float("inf")},
            grade=None,
            meaning="Reported for information.",
        ),
    ]


RUN: dict[str, Any] = {
    "id": "20250131-120000-ab12",
    "command": ["modelshield", "scan", "--model", "model.pt2", "--data", "test.npz"],
    "seed": 0,
    "device": "cpu",
    "started": "2025-01-31T12:00:00Z",
    "finished": "2025-01-31T12:03:10Z",
}
TARGET: dict[str, Any] = {
    "model": {"path": "models/model.pt2", "sha256": SHA, "format": "torch.export"},
    "data": {"path": "data/test.npz", "sha256": "ab" * 32, "n": 1000},
    "oracle": {"url": "https://api.example.com/predict"},
}


def make_sample_report() -> dict[str, Any]:
    """A report with ok / skipped / error probes and line, bar, images and table plots."""
    return build_report(
        probes=sample_probes(), run=RUN, target=TARGET, rubric=RUBRIC, created=RUN["finished"]
    )


@pytest.fixture
def report() -> dict[str, Any]:
    return make_sample_report()


# ----------------------------------------------------------------------------- schema


def test_schema_is_valid_2020_12() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    assert schema["$schema"].endswith("/draft/2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_load_schema_returns_a_fresh_copy() -> None:
    a = load_schema()
    a["title"] = "changed"
    assert load_schema()["title"] != "changed"


def test_sample_report_validates(report: dict[str, Any]) -> None:
    validate_report(report)
    assert report["schema_version"] == SCHEMA_VERSION
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", report["created"])
    assert report["target"]["train_data"] is None
    assert [p["probe"] for p in report["probes"]][:2] == ["model_file", "pgd_linf"]


def test_created_defaults_to_now_utc() -> None:
    r = build_report(probes=[], run=RUN, target=TARGET, rubric=RUBRIC)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r["created"])


def test_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    assert s["overall_grade"] == "D"
    assert s["counts"] == {"ok": 4, "skipped": 1, "error": 1}
    assert s["risks"] == {
        "supply-chain": "A",
        "evasion": "D",
        "extraction": None,
        "poisoning": None,
        "privacy": "C",
    }


def test_overall_grade_is_null_when_nothing_graded() -> None:
    probes = [p for p in sample_probes() if p.status != "ok" or p.grade is None]
    r = build_report(probes=probes, run=RUN, target=TARGET, rubric=RUBRIC)
    assert r["summary"]["overall_grade"] is None
    assert r["summary"]["risks"]["privacy"] is None


Mutation = Callable[[dict[str, Any]], None]


def _drop(path: tuple[Any, ...]) -> Mutation:
    def f(r: dict[str, Any]) -> None:
        node: Any = r
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return f


def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def f(r: dict[str, Any]) -> None:
        node: Any = r
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return f


INVALID = [
    ("missing top key", _drop(("summary",)), "summary"),
    ("missing run key", _drop(("run", "seed")), "$.run"),
    ("missing model sha", _drop(("target", "model", "sha256")), "$.target.model"),
    ("missing probe key", _drop(("probes", 1, "grade")), "$.probes[1]"),
    ("grade G", _set(("probes", 1, "grade"), "G"), "$.probes[1].grade"),
    ("grade lower-case", _set(("probes", 0, "grade"), "a"), "$.probes[0].grade"),
    ("overall grade", _set(("summary", "overall_grade"), "Z"), "$.summary.overall_grade"),
    ("status", _set(("probes", 1, "status"), "done"), "$.probes[1].status"),
    ("schema version", _set(("schema_version",), "0.9.0"), "$.schema_version"),
    ("bad sha", _set(("target", "model", "sha256"), "xyz"), "$.target.model.sha256"),
    ("plot kind", _set(("probes", 1, "plots", 0, "kind"), "pie"), "$.probes[1].plots[0].kind"),
    ("y scale", _set(("probes", 1, "plots", 0, "y_scale"), "ln"), "$.probes[1].plots[0].y_scale"),
    ("flags", _set(("probes", 1, "flags"), "one"), "$.probes[1].flags"),
    ("ok needs figure", _set(("probes", 0, "figure"), {}), "$.probes[0].figure"),
]


@pytest.mark.parametrize(("what", "mutate", "where"), INVALID, ids=[i[0] for i in INVALID])
def test_invalid_reports_fail(report: dict[str, Any], what: str, mutate: Any, where: str) -> None:
    pytest.importorskip("jsonschema")
    mutate(report)
    with pytest.raises(DataError, match="report is invalid at") as info:
        validate_report(report)
    assert where in str(info.value)


SEMANTIC = [
    ("series lengths", _set(("probes", 1, "plots", 0, "series", 0, "y"), [0.5]), "series[0].y"),
    ("image size", _set(("probes", 1, "plots", 1, "images", 0, "data"), [0.1]), "images[0].data"),
    ("bar lengths", _set(("probes", 4, "plots", 1, "values"), [0.1]), "plots[1].values"),
    ("table row", _set(("probes", 4, "plots", 2, "rows"), [[1]]), "rows[0]"),
    ("duplicate", _set(("probes", 1, "probe"), "model_file"), "$.probes[1].probe"),
    ("counts", _set(("summary", "counts", "ok"), 9), "$.summary.counts"),
]


@pytest.mark.parametrize(("what", "mutate", "where"), SEMANTIC, ids=[i[0] for i in SEMANTIC])
def test_semantic_checks(report: dict[str, Any], what: str, mutate: Any, where: str) -> None:
    mutate(report)
    with pytest.raises(DataError, match=re.escape(where)):
        validate_report(report)


def test_skipped_probe_must_say_why(report: dict[str, Any]) -> None:
    pytest.importorskip("jsonschema")
    report["probes"][3]["reason"] = ""
    with pytest.raises(DataError, match=r"\$\.probes\[3\]\.reason"):
        validate_report(report)


def test_fallback_checks_without_jsonschema(
    report: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` -> ImportError
    build_mod._validator.cache_clear()
    try:
        validate_report(report)
        for mutate, where in [
            (_drop(("rubric",)), "'rubric' is a required property"),
            (_set(("probes", 1, "grade"), "G"), "$.probes[1].grade"),
            (_set(("probes", 2, "status"), "done"), "$.probes[2].status"),
            (_drop(("probes", 0, "flags")), "'flags' is a required property"),
            (_drop(("probes", 1, "plots", 0, "series")), "$.probes[1].plots[0]"),
        ]:
            bad = copy.deepcopy(report)
            mutate(bad)
            with pytest.raises(DataError, match=re.escape(where)):
                validate_report(bad)
    finally:
        build_mod._validator.cache_clear()


def test_build_rejects_non_probe_records() -> None:
    with pytest.raises(DataError, match="ProbeResult"):
        build_report(probes=[42], run=RUN, target=TARGET, rubric=RUBRIC)  # type: ignore[list-item]


def test_build_validates() -> None:
    pytest.importorskip("jsonschema")
    bad = ProbeResult(probe="x", risk="evasion", grade="Q", figure={"name": "n", "value": 1})
    with pytest.raises(DataError, match="grade"):
        build_report(probes=[bad], run=RUN, target=TARGET, rubric=RUBRIC)


# ----------------------------------------------------------------------------- writing


def test_json_round_trip(report: dict[str, Any], tmp_path: Path) -> None:
    paths = write_reports(report, tmp_path / "out")
    assert set(paths) == {"json", "html", "md"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "report.json",
        "report.html",
        "report.md",
    }
    loaded = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert loaded == report
    assert load_report(paths["json"]) == report
    for original, rec in zip(sample_probes(), loaded["probes"], strict=True):
        back = ProbeResult.from_dict(rec)
        assert back.probe == original.probe and back.grade == original.grade
        assert back.plots == json.loads(json.dumps(original.to_dict()["plots"]))
    assert loaded["probes"][5]["figure"]["value"] == "inf"


def test_write_reports_writes_nothing_when_rendering_fails(
    report: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelshield.report.markdown as md

    def boom(_: Any) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(md, "render_markdown", boom)
    with pytest.raises(RuntimeError):
        write_reports(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_reports_refuses_invalid(report: dict[str, Any], tmp_path: Path) -> None:
    report["summary"]["counts"]["ok"] = 0
    with pytest.raises(DataError):
        write_reports(report, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_load_report_errors(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="cannot read report"):
        load_report(tmp_path / "r.json")


# ----------------------------------------------------------------------------- HTML

_ATTR_URL = re.compile(
    r"""(?:src|href|xlink:href|action|poster|srcset)\s*=\s*["']?([^"'\s>]*)""", re.I
)
_CSS_URL = re.compile(r"url\(\s*['\"]?([^'\")]*)", re.I)


def test_html_sections_and_summary(report: dict[str, Any]) -> None:
    html = render_html(report)
    assert html.startswith("<!DOCTYPE html>")
    for p in report["probes"]:
        assert f'<section id="probe-{p["probe"]}" class="probe' in html
        assert f'href="#probe-{p["probe"]}"' in html
    assert html.count('class="probe status-') == len(report["probes"])
    assert "models/model.pt2" in html and SHA[:12] in html
    assert "robust accuracy between 0.2 and 0.4 at eps = 8/255" in html  # per-probe rubric line
    assert "moderate risk; mitigate before exposing the model" in html  # letter rubric line
    assert "95% CI [0.281, 0.345]" in html
    assert "2.1%" in html and "∞" in html
    assert "needs --train-data" in html
    assert "gradient masking suspected" in html
    assert "tensor float32 [2×3]" in html
    assert "… (15 items)" in html
    assert html.count("<svg") == 3
    assert html.count('src="data:image/png;base64,') == 3
    assert "Report schema 1.0.0" in html and RUN["id"] in html and "2025.1" in html


def test_html_no_external_urls(report: dict[str, Any]) -> None:
    html = render_html(report)
    refs = _ATTR_URL.findall(html) + _CSS_URL.findall(html)
    assert refs, "expected some local references (anchors, data URIs)"
    for ref in refs:
        assert not ref.lower().startswith(("http:", "https:", "//", "ftp:")), ref
        assert ref.startswith(("#", "data:image/png;base64,")), ref
    assert "<script" not in html.lower()
    assert "<link" not in html.lower() and "@import" not in html
    assert "default-src 'none'" in html


def test_html_escapes_user_strings(report: dict[str, Any]) -> None:
    report["probes"][0]["title"] = 'Title "quoted" <b>bold</b>'
    report["probes"][1]["plots"][0]["series"][0]["name"] = "<i>series</i>"
    report["probes"][1]["plots"][1]["images"][0]["caption"] = '"><img src=x onerror=alert(1)>'
    report["target"]["model"]["path"] = "<img src=x>"
    html = render_html(report)
    assert XSS not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<i>series</i>" not in html
    assert "<img src=x" not in html
    assert "onerror=alert(1)>" not in html


def test_html_renders_minimal_report() -> None:
    r = build_report(probes=[], run=RUN, target=TARGET, rubric=RUBRIC)
    html = render_html(r)
    assert "0 probes" in html and "</html>" in html


# ----------------------------------------------------------------------------- Markdown


def test_markdown(report: dict[str, Any]) -> None:
    md = render_markdown(report)
    assert md.startswith("# modelshield scan report\n")
    assert "**Overall grade: D**" in md
    for p in report["probes"]:
        assert f"`{p['probe']}`" in md
    assert XSS not in md and "&lt;script&gt;" in md
    assert "a \\| b" in md  # pipes escaped inside table cells
    assert "95% CI [0.281, 0.345]" in md
    assert "Skipped because: needs --train-data" in md
    assert "> **Warning:** gradient masking suspected" in md
    assert "| FPR | TPR | note |" in md
    assert "Report schema 1.0.0" in md


# ----------------------------------------------------------------------------- SVG


def test_nice_and_log_ticks() -> None:
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.08, 0.94) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(3.0, 3.0)[0] <= 3.0 <= nice_ticks(3.0, 3.0)[-1]
    assert log_ticks(1e-4, 1.0) == [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    assert log_ticks(1.5, 40) == [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
    wide = log_ticks(1e-12, 1e6)
    assert len(wide) <= 10 and wide[0] <= 1e-12 and wide[-1] >= 1e6


def test_line_chart_log_axes_and_band() -> None:
    spec = {
        "title": "t",
        "x_scale": "log",
        "series": [
            {"name": "a", "x": [1e-3, 1e-2, 0.0, 1.0], "y": [0.1, 0.2, 0.3, 0.9]},
            {"name": "b", "x": [1, 2], "y": [0.5, None], "lo": [0.4, 0.1], "hi": [0.6, 0.2]},
        ],
    }
    svg = line_chart(spec)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert ">0.001<" in svg and ">0.1<" in svg  # decade tick labels
    assert svg.count("<polyline") == 3  # series a breaks at x=0 (not on a log axis)
    assert svg.count("<polygon") == 1
    assert ">a<" in svg and ">b<" in svg  # legend


def test_long_curves_are_thinned() -> None:
    n = 20_000
    xs = [i / n for i in range(n + 1)]
    svg = line_chart({"series": [{"name": "roc", "x": xs, "y": [v**0.5 for v in xs]}]})
    points = re.search(r'<polyline points="([^"]*)"', svg)
    assert points is not None
    coords = points.group(1).split()
    assert 50 < len(coords) < 2_000
    assert coords[0] != coords[-1] and "<circle" not in svg


def test_charts_without_data() -> None:
    assert "no data to plot" in line_chart({"series": []})
    assert "no data to plot" in line_chart({"series": [{"name": "", "x": [1], "y": [math.nan]}]})
    assert "no data to plot" in bar_chart({"labels": [], "values": []})


def test_bar_chart_negative_and_long_labels() -> None:
    svg = bar_chart(
        {
            "labels": [f"a rather long label {i}" for i in range(6)],
            "values": [1.0, -2.0, 3.0, None, 0.5, 0.0],
            "y_label": "<y>",
        }
    )
    assert svg.count("<rect") == 1 + 5  # background + bars for non-missing values
    assert "rotate(-35" in svg and "&lt;y&gt;" in svg and ">n/a<" in svg


# ----------------------------------------------------------------------------- PNG


def _decode_png(png: bytes) -> tuple[int, int, int, list[bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos : pos + 4])
        kind, data = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", png[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(kind + data)
        chunks[kind] = data
        pos += 12 + n
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    w, h, depth, ctype = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8
    channels = {0: 1, 2: 3}[ctype]
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + w * channels
    rows = [raw[i * stride : (i + 1) * stride] for i in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, channels, [r[1:] for r in rows]


def test_png_encoder_grey_and_rgb() -> None:
    w, h, c, rows = _decode_png(encode_png(bytes([0, 128, 255, 7]), 2, 2, 1))
    assert (w, h, c) == (2, 2, 1) and rows == [bytes([0, 128]), bytes([255, 7])]
    # an 8x8 RGB image in CHW order, upscaled by nearest neighbour
    data = [0.0] * 64 + [0.5] * 64 + [1.0] * 64
    data[0] = 1.0  # red channel of the top-left pixel
    png, dw, dh = image_to_png([3, 8, 8], data)
    s = upscale_factor(8, 8)
    assert s == 12 and (dw, dh) == (96, 96)
    w, h, c, rows = _decode_png(png)
    assert (w, h, c) == (96, 96, 3)
    assert rows[0][:3] == bytes([255, 128, 255]) and rows[11][33:36] == bytes([255, 128, 255])
    assert rows[12][:3] == bytes([0, 128, 255]) and rows[0][36:39] == bytes([0, 128, 255])


def test_png_clips_and_rejects_bad_shapes() -> None:
    png, w, h = image_to_png([2, 2], [-1.0, 2.0, float("nan"), 0.5], min_size=1)
    assert (w, h) == (2, 2)
    assert _decode_png(png)[3] == [bytes([0, 255]), bytes([0, 128])]
    with pytest.raises(DataError):
        image_to_png([2, 8, 8], [0.0] * 128)
    with pytest.raises(DataError):
        image_to_png([1, 8, 8], [0.0] * 10)


def test_png_readable_by_pillow() -> None:
    image_mod = pytest.importorskip("PIL.Image")
    import io

    png, w, h = image_to_png([3, 4, 5], [0.25] * 60)
    im = image_mod.open(io.BytesIO(png))
    im.load()
    assert im.size == (w, h) and im.mode == "RGB" and im.getpixel((0, 0)) == (64, 64, 64)


# ----------------------------------------------------------------------------- layering


def test_report_imports_only_core() -> None:
    """DESIGN.md: report renders core result types and never imports scan/cli/capabilities."""
    root = Path(build_mod.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("modelshield."):
                    assert name.startswith(("modelshield.core", "modelshield.report")), (
                        f"{path.name} imports {name}"
                    )
