"""The scan report: versioned JSON, a self-contained HTML page and Markdown.

``build_report`` assembles ``report.json`` from :class:`~modelshield.core.results.ProbeResult`
records; ``validate_report`` checks it against the shipped JSON Schema (draft 2020-12);
``write_reports`` writes ``report.json``, ``report.html`` and ``report.md`` atomically.
This package renders ``core`` result types only; it never imports scan, cli or capabilities.
"""

from __future__ import annotations

from modelshield.report.build import (
    GRADES,
    SCHEMA_VERSION,
    build_report,
    load_report,
    load_schema,
    validate_report,
    worst_grade,
    write_reports,
)
from modelshield.report.html import render_html
from modelshield.report.markdown import render_markdown

__all__ = [
    "GRADES",
    "SCHEMA_VERSION",
    "build_report",
    "load_report",
    "load_schema",
    "render_html",
    "render_markdown",
    "validate_report",
    "worst_grade",
    "write_reports",
]
