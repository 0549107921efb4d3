"""The audit report (`mmaudit report RUN_DIR --format html|pdf|json`).

Modules: `load` (RUN_DIR, parent run, policy; metrics and rows as typed schema-v2 frames of
any version), `meta` (what the catalog says about probes and metrics; typed breakdown
labels; shared with the dashboard), `sections` (descriptive sections) and `results` (one
section per catalog section, mitigations, targets), each returning plain data, `evidence`
(charts and galleries from typed columns), `figures` (plotly figures as JSON), `regulation`
(section -> EU AI Act / NIST AI RMF / Model Card mapping), `integrity` (confined, capped
SHA-256 manifest), `output` (where a report may be written), `render` (HTML, JSON, PDF via
headless Chromium), `assets` (manifest, images and heatmap overlays; torch-free, shared with
the dashboard), `build` (ties it together).

This package imports nothing heavy at import time, so the dashboard can use `assets`.
"""
from __future__ import annotations

__all__ = ["build_report", "build_document", "FORMATS"]

FORMATS = ("html", "pdf", "json")


def build_document(*args, **kwargs):
    from audit.report.build import build_document as impl

    return impl(*args, **kwargs)


def build_report(*args, **kwargs):
    from audit.report.build import build_report as impl

    return impl(*args, **kwargs)
