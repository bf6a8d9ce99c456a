"""`modelshield scan --demo`: the main job end to end, opened in headless Chromium."""

from __future__ import annotations

import json
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
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((out / "report.html").resolve().as_uri(), wait_until="load")
            for name in ("model-file", "evasion-whitebox"):
                assert page.locator(f"section#probe-{name}").is_visible()
            assert page.locator("section#probe-evasion-whitebox svg").count() >= 1
            text = page.locator("section#probe-evasion-whitebox").inner_text()
            assert "What to do" in text or "WHAT TO DO" in text
        finally:
            browser.close()
    assert not errors, errors
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
