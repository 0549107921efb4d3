"""Modality reliance: every probe the catalog puts on the "modality" page (ablation, Shapley
shares, attribution), with charts per ablation and per layer, and the per-example values of
any of their row measures, split by the rows' typed modality and variant."""
from __future__ import annotations

import streamlit as st

from audit.catalog import PAGES
from audit.report import meta
from dashboard import ui

PAGE = "modality"


def per_example(ctx: ui.Context) -> None:
    rm = ctx.row_metrics()
    rm = rm[rm.probe.isin(meta.expected_probes(page=PAGE))]
    if rm.empty:
        return
    st.subheader("Per example")
    probes = meta.probes_where(rm.probe.unique(), page=PAGE)
    probe = st.selectbox("Probe", probes, key="mod_probe", format_func=lambda p: meta.spec_of(p).title) \
        if len(probes) > 1 else probes[0]
    metric = st.selectbox("Row measure", sorted(rm[rm.probe == probe].metric), key="mod_metric")
    r = ctx.rows(probe, (metric,))
    r = r[r.value.notna()]
    kinds = [meta.dims_label({"modality": m, "variant": v}) for m, v in zip(r.modality, r.variant)]
    r = r.assign(kind=kinds)
    options = sorted(r.kind.unique())
    chosen = st.multiselect("Conditions", options, default=options[:4], key="mod_ablations")
    part = r[r.kind.isin(chosen)]
    fig = {"data": [{"type": "histogram", "x": part[part.kind == k].value.tolist(), "name": k, "opacity": 0.6,
                     "nbinsx": 30} for k in chosen],
           "layout": {"barmode": "overlay", "height": 340, "xaxis": {"title": {"text": metric}},
                      "yaxis": {"title": {"text": "rows"}}}}
    ui.show_figure(fig)
    top = (part.groupby("example_id").value.max().sort_values(ascending=False).head(20)
           .rename(f"largest {metric}").reset_index())
    st.markdown("**Examples with the largest values**")
    ui.show_table(top)


ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    m = ctx.metrics()
    if not ui.probe_panels(ctx, PAGE, m):
        ui.no_rows("metrics of the probes shown here (run modality_ablation, mm_shap or attribution)")
    per_example(ctx)
