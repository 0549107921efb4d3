"""Bias explorer: per-group and intersectional tables with intervals, comparisons per attribute,
and counterfactual sets side by side (images, prompts and the model's answers)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from audit.report.assets import predicted_answer
from audit.report.blocks import group_kind
from dashboard import data, ui

FAIRNESS = ("group_fairness", "counterfactual_bias", "retrieval_skew")


def member_lines(row, rec: dict | None, in_manifest: bool) -> list[str]:
    lines = [f"example: {row.example_id}"]
    if rec is not None:
        lines.append(f"prompt: {rec.get('prompt')}" if in_manifest
                     else f"prompt: {rec.get('id')} with the term for {row.variant}")
    ans = predicted_answer(rec, getattr(row, "pred_first", None))
    if ans is not None:
        lines.append(f"answer: {ans}")
    p = getattr(row, "p_first", None)
    if p is not None and not pd.isna(p) and rec and rec.get("choices"):
        lines.append(f"P({rec['choices'][0]}) = {p:.3f}")
    t = getattr(row, "target_logprob", None)
    if t is not None and not pd.isna(t):
        lines.append(f"log p(target) = {t:.3f}")
    return lines


def counterfactual_sets(ctx: ui.Context, attr: str | None) -> None:
    """The sets with the largest effect first; each member side by side: image, prompt, answer."""
    r = ctx.rows("counterfactual_bias", ("flip", "logprob_gap"))
    if r.empty:
        st.text("no counterfactual sets in this run (run counterfactual_bias)")
        return
    if attr is not None and (r.group == attr).any():
        r = r[r.group == attr]
    set_attr = dict(zip(r.site, r.group))
    wide = r.pivot_table(index=["site", "group"], columns="metric", values="value", aggfunc="max")
    wide = wide.reindex(columns=["flip", "logprob_gap"]).reset_index()
    wide = wide.sort_values(["flip", "logprob_gap"], ascending=False)
    if st.toggle("Only sets whose answer flips", value=False, key="bias_flips"):
        wide = wide[wide.flip >= 0.5]
    st.text(f"{len(wide)} set(s); {int((wide.flip >= 0.5).sum())} flip")
    if wide.empty:
        return
    gaps = dict(zip(wide.site, wide.logprob_gap))
    set_id = st.selectbox("Counterfactual set (largest effect first)", wide.site.tolist(), key="bias_set",
                          format_func=lambda s: f"{s} · |log-prob gap| {gaps.get(s, np.nan):.3f}")
    mem = ctx.rows("counterfactual_bias", ("pred_first", "p_first", "target_logprob"), site=set_id)
    wm = mem.pivot_table(index=["example_id", "variant"], columns="metric", values="value", aggfunc="mean")
    wm = wm.reset_index().sort_values("variant")
    manifest = data.manifest(ctx.data_dir)
    for col, row in zip(st.columns(max(len(wm), 1)), wm.itertuples()):
        rec = manifest.get(row.example_id) or manifest.get(str(row.example_id).split("~")[0])
        img = data.image(ctx.data_dir, row.example_id)
        with col:
            st.text(f"{set_attr.get(set_id, 'value')} = {row.variant}")
            if img is not None:
                st.image(np.asarray(img.resize((192, 192), 0)))
            else:
                st.text("image not available")
            st.text("\n".join(member_lines(row, rec, row.example_id in manifest)))


ctx = ui.context("Bias explorer")
if ctx is not None:
    m = ctx.metrics()
    fm = m[m.probe.isin(FAIRNESS)]
    if fm.empty:
        ui.no_rows("fairness metrics (run group_fairness, counterfactual_bias or retrieval_skew)")
    else:
        kinds = fm.group.map(group_kind)
        attrs = sorted({str(g).split("=")[0] for g in fm.group[kinds == "disaggregated"]}
                       | {str(g) for g in fm.group[kinds == "comparison"] if "&" not in str(g)})
        with_sets = set(fm[fm.probe == "counterfactual_bias"].group.dropna())
        first = next((i for i, a in enumerate(attrs) if a in with_sets), 0)  # attributes with sets first
        attr = st.selectbox("Sensitive attribute", attrs, index=first, key="bias_attr") if attrs else None
        tab_groups, tab_inter = st.tabs(["Groups", "Intersections"])
        with tab_groups:
            per = fm[(kinds == "disaggregated") & fm.group.astype(str).str.startswith(f"{attr}=")]
            if per.empty:
                st.text("no per-group rows for this attribute")
            else:
                metric = st.selectbox("Metric", sorted(per.metric.unique()), key="bias_metric")
                ui.show_figure(ui.bar_ci(f"{metric} by {attr}", per[per.metric == metric], axis=metric))
                ui.show_table(ui.metric_frame(per))
            st.markdown("**Comparisons for this attribute**")
            ui.show_table(ui.metric_frame(fm[fm.group == attr]))
        with tab_inter:
            inter = fm[kinds == "intersectional"]
            if inter.empty:
                st.text("no intersectional rows in this run")
            else:
                metric = st.selectbox("Metric", sorted(inter.metric.unique()), key="bias_inter_metric")
                ui.show_figure(ui.bar_ci(f"{metric} by intersection", inter[inter.metric == metric], axis=metric))
                ui.show_table(ui.metric_frame(inter))
                ui.show_table(ui.metric_frame(fm[fm.group.astype(str).str.contains("&") & (kinds == "comparison")]))
        st.subheader("Counterfactual sets")
        counterfactual_sets(ctx, attr)
