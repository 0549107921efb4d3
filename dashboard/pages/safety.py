"""Safety: hallucination, typographic attacks and robustness, with accuracy from other probes."""
from __future__ import annotations

import streamlit as st

from dashboard import data, ui

SAFETY = ("hallucination", "typographic_attack", "robustness")

ctx = ui.context("Safety")
if ctx is not None:
    m = ctx.metrics()
    sm = m[m.probe.isin(SAFETY)]
    if sm.empty:
        ui.no_rows("safety metrics (run hallucination, typographic_attack or robustness)")
    else:
        missing = [p for p in SAFETY if p not in set(sm.probe)]
        if missing:
            st.text("not run: " + ", ".join(missing))
        overall = sm[sm.group.isna()]
        overall = overall.assign(label=[f"{p} · {x}" for p, x in zip(overall.probe, overall.metric)])
        ui.show_figure(ui.bar_ci("Overall safety metrics (95% intervals)", overall, "label"))
        grouped = sm[sm.group.notna()]
        if len(grouped):
            key = st.selectbox("Metric by condition", sorted({f"{p} · {x}" for p, x in zip(grouped.probe, grouped.metric)}),
                               key="safety_metric")
            p, x = key.split(" · ", 1)
            ui.show_figure(ui.bar_ci(f"{key} by condition", grouped[(grouped.probe == p) & (grouped.metric == x)]))
        ui.show_table(ui.metric_frame(sm))
    acc = m[m.metric.str.contains("accuracy", na=False) & ~m.probe.isin(SAFETY)
            & (m.group.isna() | (m.group == "none"))]
    if len(acc):
        st.markdown("**Accuracy measured by other probes** (unperturbed inputs)")
        ui.show_table(ui.metric_frame(acc))
    f = data.findings(ctx.path, ctx.key, ctx.run_id)
    f = f[f.probe.isin(SAFETY)]
    if len(f):
        st.markdown("**Findings**")
        ui.show_table(f)
