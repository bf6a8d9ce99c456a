"""Open report.html in headless Chromium: it renders, offline, without errors.

Needs the system ``chromium`` (Debian package) and Python Playwright. Skipped when
either is missing, except under CI (``CI`` set), where it fails instead: CI must run it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from modelshield.report import write_reports
from tests.report.test_report import make_sample_report

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.browser


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so the browser test must run)")
    pytest.skip(why)


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    _need(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "python playwright is not installed")
        return

    report = make_sample_report()
    paths = write_reports(report, tmp_path / "out")
    url = paths["html"].resolve().as_uri()

    console_errors: list[str] = []
    page_errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on(
                "console",
                lambda m: console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")

            for probe in report["probes"]:
                section = page.locator(f"section#probe-{probe['probe']}")
                assert section.count() == 1
                assert section.is_visible(), probe["probe"]
            boxes = [svg.bounding_box() for svg in page.locator("section.probe svg").all()]
            assert len(boxes) == 3
            for box in boxes:
                assert box is not None and box["width"] > 100 and box["height"] > 50
            images = page.locator("section.probe img").all()
            assert len(images) == 3
            for img in images:
                assert img.evaluate("i => i.complete && i.naturalWidth > 0")
            grade = page.locator("header .overall .grade")
            assert grade.inner_text().strip() == "D"
            colour = grade.evaluate("e => getComputedStyle(e).backgroundColor")
            assert colour == "rgb(240, 136, 62)"

            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            keep = os.environ.get("MODELSHIELD_SCREENSHOT")
            if keep:
                shutil.copyfile(shot, keep)
        finally:
            browser.close()

    assert not console_errors, console_errors
    assert not page_errors, page_errors
    assert requests, "the page load itself should be recorded"
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
