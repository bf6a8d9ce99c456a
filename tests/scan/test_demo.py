"""`modelshield scan --demo`: the main job end to end, opened in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from modelshield.report import load_schema
from tests.conftest import run_cli
from tests.report.test_html_browser import ARGS, CHROMIUM, _need


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "scan"
    r = run_cli("scan", "--demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_demo_writes_both_reports(demo: tuple[Path, str]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, load_schema())
    assert f"report: {out / 'report.html'}" in stdout
    probes = {p["probe"]: p for p in report["probes"]}
    assert probes["model-file"]["status"] == "ok"
    ev = probes["evasion-whitebox"]
    assert ev["status"] == "ok"
    assert ev["details"]["clean_accuracy"] > 0.85  # the demo model learned the digits
    assert report["target"]["train_data"]["n"] > report["target"]["data"]["n"]


def test_demo_rerun_reuses_everything(demo: tuple[Path, str]) -> None:
    out, _ = demo
    before = {p.name: p.read_bytes() for p in (out / "probes").glob("*.json")}
    r = run_cli("scan", "--demo", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "reusing the model trained earlier" in r.stderr
    assert len(before) >= 4  # model file, evasion, membership, inversion
    assert r.stderr.count("finished in an earlier run") == len(before)
    assert {p.name: p.read_bytes() for p in (out / "probes").glob("*.json")} == before


@pytest.mark.browser
def test_demo_report_in_chromium(demo: tuple[Path, str]) -> None:
    _need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "python playwright is not installed")
        return
    out, _ = demo
    report = json.loads((out / "report.json").read_text())
    probes = report["probes"]
    # every risk class of the mission is graded from a measured figure in the demo
    graded = {p["risk"] for p in probes if p["status"] == "ok" and p.get("grade")}
    assert {"evasion", "extraction", "poisoning", "privacy"} <= graded, graded
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
            for probe in probes:  # every probe has its section, skipped ones with the reason
                section = page.locator(f"section#probe-{probe['probe']}")
                assert section.count() == 1 and section.is_visible(), probe["probe"]
                text = section.inner_text()
                if probe["status"] == "skipped":
                    assert probe["reason"] in text, probe["probe"]
                    continue
                if probe.get("grade"):
                    assert "What to do" in text or "WHAT TO DO" in text, probe["probe"]
                for plot in probe.get("plots", []):  # each plot drawn, with a real size
                    kind = plot["kind"]
                    sel = {"images": "img", "table": "table"}.get(kind, "svg")
                    items = section.locator(sel).all()
                    assert items, (probe["probe"], kind)
                    for item in items:
                        box = item.bounding_box()
                        assert box is not None and box["width"] > 20 and box["height"] > 10
                        if sel == "img":
                            assert item.evaluate("i => i.complete && i.naturalWidth > 0")
            shot = out / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            keep = Path(os.environ.get("MODELSHIELD_ARTIFACTS", "test-artifacts"))
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, keep / "demo-report.png")  # the test's artefact
        finally:
            browser.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
