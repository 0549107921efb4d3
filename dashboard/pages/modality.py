"""Modality reliance: how much the answers depend on the image and on the text (ablation,
Shapley shares, knockout), per ablation and per layer, and per example."""
from __future__ import annotations

import re

import streamlit as st

from audit.report import figures
from dashboard import ui

RELIANCE = ("image_reliance", "text_reliance", "v_shap", "t_shap", "max_effect", "image_attribution_share",
            "image_attention_share", "rollout_image_share", "image_effect", "restored")
LAYER = re.compile(r"^layer:(\d+)$")

ctx = ui.context("Modality reliance")
if ctx is not None:
    m = ctx.metrics()
    rel = m[m.metric.isin(RELIANCE)]
    if rel.empty:
        ui.no_rows("modality reliance metrics (run modality_ablation, mm_shap, attention or attention_knockout)")
    else:
        flat = rel[~rel.group.fillna("").str.match(LAYER)]
        flat = flat.assign(label=[f"{p} · {x}" + (f" ({g})" if isinstance(g, str) else "")
                                  for p, x, g in zip(flat.probe, flat.metric, flat.group)])
        ui.show_figure(ui.bar_ci("Reliance and attribution shares (95% intervals)", flat, "label", axis="share"))
        layered = m[m.group.fillna("").str.match(LAYER)]
        if len(layered):
            series = {f"{p} · {x}": [(int(LAYER.match(r.group).group(1)), r.value, r.ci_low, r.ci_high)
                                     for r in g.itertuples()] for (p, x), g in layered.groupby(["probe", "metric"])}
            ui.show_figure(figures.lines("Per-layer curves", series, xaxis="layer", yaxis="value"))
        ui.show_table(ui.metric_frame(rel))
        tv = ctx.rows("modality_ablation", ("tv",))
        if len(tv):
            st.subheader("Per-example answer change under each ablation")
            kinds = sorted(tv.variant.dropna().unique())
            chosen = st.multiselect("Ablations", kinds, default=kinds[:4], key="mod_ablations")
            part = tv[tv.variant.isin(chosen)]
            fig = {"data": [{"type": "histogram", "x": part[part.variant == k].value.tolist(), "name": k,
                             "opacity": 0.6, "nbinsx": 30} for k in chosen],
                   "layout": {"barmode": "overlay", "height": 340, "xaxis": {"title": {"text": "total variation"}},
                              "yaxis": {"title": {"text": "examples"}}}}
            ui.show_figure(fig)
            worst = (part.groupby("example_id").value.max().sort_values(ascending=False).head(20)
                     .rename("largest change").reset_index())
            st.markdown("**Examples that depend most on the ablated modality**")
            ui.show_table(worst)
