"""mmaudit dashboard, home page "Runs & scorecard": every stored run, and the selected run's
provenance (the model's own, never the audit tool's checkout), headline metrics (the catalog's
headline metrics, overall rows), every finding in full and how many examples each probe audited.
The other pages are dashboard/pages/*.py, one per catalog page plus the sample viewer and the
run comparison.

Start it with `mmaudit dashboard [--store DB_PATH]` (or `streamlit run dashboard/app.py` with
MMAUDIT_STORE set). It reads the store (and, for the sample viewer, the samples.parquet of a
run folder the store recorded) and never imports torch."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.catalog import metric_spec
from audit.report import provenance
from dashboard import data, ui

ctx = ui.context(ui.HOME)
if ctx is not None:
    st.subheader("Stored runs")
    # n_examples is the size of the audited split, not what any probe audited (see the scorecard)
    ui.show_table(ctx.runs[["run_id", "created", "architecture", "n_examples", "seed", "parent_run_id", "model_path",
                            "data_path", "schema_version"]].rename(columns={"n_examples": "examples in the split"}))
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
    st.markdown("**Findings** (worst first, each in full)")
    ui.show_findings(f)
    s = data.summary(ctx.path, ctx.key, ctx.run_id) or {}
    counts = provenance.probe_counts(s)
    st.markdown("**Examples audited per probe**")
    st.text(provenance.examples_line(s))
    if counts:
        ui.show_table(pd.DataFrame(counts).rename(columns={"examples": "examples audited",
                                                           "selected": "examples that fit",
                                                           "capped": "capped by --max-examples"}))
    st.subheader("Provenance")
    st.markdown("**The audited model** (as the run recorded it when loading it)")
    model = s.get("model") or {"path": run.get("model_path"), "sha256": run.get("model_sha256")}
    ui.show_table(pd.DataFrame([(k, str(v)) for k, v in provenance.model_items(model)], columns=["field", "value"]))
    for level, short, _ in provenance.model_notes(model):
        (st.error if level == "fail" else st.warning)(f"{level.upper()}: {short} (see the report's identity section)")
    prov = pd.DataFrame([(k, str(run.get(k))) for k in ("run_dir", "data_path", "data_sha256", "seed",
                                                        "parent_run_id", "schema_version")],
                        columns=["field", "value"])
    st.markdown("**The run**")
    ui.show_table(prov)
    with st.expander("Environment and configuration"):
        st.json({"environment": provenance.environment(s.get("environment")), "config": s.get("config")})
    st.caption("Full written report of this run:")
    st.code(f"mmaudit report {run['run_dir']} --format html", language="bash")
