"""The audit report (`mmaudit report RUN_DIR --format html|pdf|json`).

Modules: `load` (RUN_DIR, parent run, policy; metrics and rows as typed schema-v2 frames of
any version), `meta` (what the catalog says about probes and metrics; typed breakdown
labels; shared with the dashboard), `sections` (descriptive sections), `results` (one
section per catalog section, mitigations, targets) and `closing` (worst examples from the
transcript, glossary), each returning plain data; `verdict` (section badges and the cover's
verdict from findings and targets), `provenance` (the model's own provenance, the
environment without the tool's checkout, examples per probe), `datacard` (datacard.json as
tables), `samples` (reading and ranking samples.parquet; shared with the dashboard),
`evidence` (charts and galleries from typed columns), `figures` (plotly figures as JSON),
`regulation` (section -> EU AI Act / NIST AI RMF / Model Card mapping), `integrity`
(confined, capped SHA-256 manifest), `output` (where a report may be written), `render`,
`cover` and `escape` (HTML, JSON, PDF via headless Chromium), `assets` (manifest, images and
heatmap overlays; torch-free, shared with the dashboard), `build` (ties it together).

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
