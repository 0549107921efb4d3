"""mmaudit dashboard, home page "Runs & scorecard": every stored run, and the selected run's
provenance, headline metrics (the catalog's headline metrics, overall rows) and findings.
The other pages are dashboard/pages/*.py, one per catalog page plus the run comparison.

Start it with `mmaudit dashboard [--store DB_PATH]` (or `streamlit run dashboard/app.py` with
MMAUDIT_STORE set). It reads the store only and never imports torch."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.catalog import metric_spec
from dashboard import data, ui

ctx = ui.context(ui.HOME)
if ctx is not None:
    st.subheader("Stored runs")
    ui.show_table(ctx.runs[["run_id", "created", "architecture", "n_examples", "seed", "parent_run_id", "model_path",
                            "data_path", "schema_version"]])
    run = ctx.run
    st.subheader("Scorecard of the selected run")
    st.text(f"run {run['run_id']} · created {run['created']} · {run['architecture']}")
    m = ctx.metrics()
    f = data.findings(ctx.path, ctx.key, ctx.run_id)
    sev = f.severity.value_counts()
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("metric rows", len(m))
    c2.metric("probes", m.probe.nunique())
    c3.metric("warnings", int(sev.get("warning", 0)))
    c4.metric("failures", int(sev.get("fail", 0)))
    overall = m[m.scope == "overall"]
    headline = overall[[bool(getattr(metric_spec(p, x), "headline", False)) for p, x in zip(overall.probe,
                                                                                             overall.metric)]]
    st.markdown("**Headline metrics** (the catalog's headline metrics, overall rows, 95% intervals)")
    ui.show_table(ui.metric_frame(headline if len(headline) else overall))
    ui.show_meanings(headline if len(headline) else overall)
    with st.expander(f"Every overall row ({len(overall)})"):
        ui.show_table(ui.metric_frame(overall))
    st.markdown("**Findings**")
    if f.empty:
        st.text("no findings")
    else:
        ui.show_table(f)
    st.subheader("Provenance")
    prov = pd.DataFrame([(k, str(run.get(k))) for k in ("run_dir", "model_path", "model_sha256", "data_path",
                                                        "data_sha256", "seed", "parent_run_id", "schema_version")],
                        columns=["field", "value"])
    ui.show_table(prov)
    s = data.summary(ctx.path, ctx.key, ctx.run_id) or {}
    with st.expander("Environment and configuration"):
        st.json({"environment": s.get("environment"), "config": s.get("config")})
    st.caption("Full written report of this run:")
    st.code(f"mmaudit report {run['run_dir']} --format html", language="bash")
