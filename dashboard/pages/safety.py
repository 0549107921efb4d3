"""Safety: every probe the catalog puts on the "safety" page (hallucination, typographic
attacks, robustness, ...), with its tables, charts by condition and what each metric means."""
from __future__ import annotations

import streamlit as st

from audit.catalog import PAGES
from dashboard import data, ui

PAGE = "safety"

ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    m = ctx.metrics()
    shown = ui.probe_panels(ctx, PAGE, m)
    if not shown:
        ui.no_rows("metrics of the probes shown here")
    f = data.findings(ctx.path, ctx.key, ctx.run_id)
    f = f[f.probe.isin(shown)]
    if len(f):
        st.markdown("**Findings**")
        ui.show_findings(f)
