"""Bias explorer: every probe the catalog puts on the "bias" page; per sensitive attribute
(typed `attribute` column) the per-group and intersectional rows with intervals and the
comparisons; and counterfactual sets (rows with a `set_id`) side by side: images, prompts and
every value the probe wrote per member."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from audit.catalog import PAGES
from audit.report import meta
from audit.report.assets import manifest_record
from audit.report.evidence import member_lines
from dashboard import data, ui

PAGE = "bias"


def set_probes(ctx: ui.Context) -> list[str]:
    return [p for p in meta.expected_probes(page=PAGE) if p in set(ctx.row_metrics().probe)]


def counterfactual_sets(ctx: ui.Context, attr: str | None) -> None:
    """The sets with the largest set-level values first; each member side by side: image, prompt, values."""
    frames = [ctx.rows(p) for p in set_probes(ctx)]
    r = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["set_id", "attribute"])
    r = r[r.set_id.notna() & r.attribute.notna()]
    if r.empty:
        st.text("no counterfactual sets in this run (run counterfactual_bias)")
        return
    if attr is not None and (r.attribute == attr).any():
        r = r[r.attribute == attr]
    per_set = r.groupby(["metric", "set_id"]).size().groupby(level=0).max()
    set_level = [m for m in dict.fromkeys(r.metric) if per_set[m] == 1]
    wide = r[r.metric.isin(set_level)].pivot_table(index="set_id", columns="metric", values="value", aggfunc="max")
    wide = wide.reindex(index=sorted(r.set_id.unique()), columns=set_level)
    wide = wide.sort_values(set_level, ascending=False) if set_level else wide
    if set_level:
        st.text(f"{len(wide)} set(s), largest first by {', '.join(set_level)}")
    scores = {s: ", ".join(f"{k} {v:.3g}" for k, v in row.items() if not pd.isna(v)) for s, row in wide.iterrows()}
    set_id = st.selectbox("Counterfactual set (largest effect first)", list(wide.index), key="bias_set",
                          format_func=lambda s: f"{s} · {scores.get(s, '')}")
    members = r[(r.set_id == set_id) & ~r.metric.isin(set_level)]
    members = members.assign(v=members.attribute_value.fillna("?"))
    manifest = data.manifest(ctx.data_dir)
    groups = sorted(members.groupby(["example_id", "v"]), key=lambda kv: str(kv[0][1]))
    for col, ((eid, value), part) in zip(st.columns(max(len(groups), 1)), groups):
        rec, exact = manifest_record(manifest, eid)
        img = data.image(ctx.data_dir, eid)
        with col:
            if img is not None:
                st.image(np.asarray(img.resize((192, 192), 0)))
            else:
                st.text("image not available")
            attribute = part.attribute.iloc[0]
            st.text("\n".join(member_lines(part, rec, eid, attribute, value, exact=exact)))


def attribute_tabs(fm: pd.DataFrame) -> str | None:
    attrs = sorted(set(fm.attribute.dropna()))
    with_sets = set(fm[fm.scope == "comparison"].attribute.dropna())
    first = next((i for i, a in enumerate(attrs) if a in with_sets), 0)
    attr = st.selectbox("Sensitive attribute", attrs, index=first, key="bias_attr") if attrs else None
    tab_groups, tab_inter = st.tabs(["Groups", "Intersections"])
    with tab_groups:
        per = fm[(fm.scope == "group") & (fm.attribute == attr)]
        if per.empty:
            st.text("no per-group rows for this attribute")
        else:
            metric = st.selectbox("Metric", sorted(per.metric.unique()), key="bias_metric")
            sel = per[per.metric == metric]
            probe = sel.probe.iloc[0]
            ui.show_figure(ui.bar_ci(f"{meta.metric_label(probe, metric)} by {attr}", sel,
                                     axis=meta.axis_title(probe, metric)))
            ui.plain_caption(f"What this means: {meta.metric_meaning(probe, metric) or metric}")
            ui.show_table(ui.metric_frame(per))
            ui.show_meanings(per)
        st.markdown("**Comparisons for this attribute**")
        comp = fm[(fm.scope == "comparison") & (fm.attribute == attr) & fm.attribute2.isna()]
        ui.show_table(ui.metric_frame(comp))
        ui.show_meanings(comp)
    with tab_inter:
        inter = fm[fm.scope == "intersection"]
        if inter.empty:
            st.text("no intersectional rows in this run")
        else:
            metric = st.selectbox("Metric", sorted(inter.metric.unique()), key="bias_inter_metric")
            sel = inter[inter.metric == metric]
            probe = sel.probe.iloc[0]
            ui.show_figure(ui.bar_ci(f"{meta.metric_label(probe, metric)} by intersection", sel,
                                     axis=meta.axis_title(probe, metric)))
            ui.plain_caption(f"What this means: {meta.metric_meaning(probe, metric) or metric}; intersections "
                             "without examples are not drawn.")
            ui.show_table(ui.metric_frame(inter))
            ui.show_table(ui.metric_frame(fm[(fm.scope == "comparison") & fm.attribute2.notna()]))
    return attr


ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    m = ctx.metrics()
    probes = ui.probe_panels(ctx, PAGE, m, grouped=False)
    fm = m[m.probe.isin(probes)]
    if fm.empty:
        ui.no_rows("fairness metrics (run group_fairness, counterfactual_bias or retrieval_skew)")
    else:
        st.subheader("By sensitive attribute")
        attr = attribute_tabs(fm)
        other = fm[(fm.scope != "overall") & fm.attribute.isna()]
        if len(other):
            with st.expander(f"Other grouped rows ({len(other)})"):
                ui.show_table(ui.metric_frame(other))
        st.subheader("Counterfactual sets")
        counterfactual_sets(ctx, attr)
