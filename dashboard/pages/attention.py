"""Attention explorer: per example, the image with the attention heatmap over it, and the
image attention share per layer and head where the rows carry them."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import streamlit as st

from audit.report import figures
from audit.report.assets import heatmap_grid, overlay_heatmap, parse_grid
from dashboard import data, ui

ctx = ui.context("Attention explorer")
if ctx is not None:
    ids = data.example_ids(ctx.path, ctx.key, ctx.run_id, "attention", "attention_heatmap")
    share_ids = data.example_ids(ctx.path, ctx.key, ctx.run_id, "attention", "image_attention_share")
    if not ids and not share_ids:
        ui.no_rows("attention rows (run the `attention` probe on a white-box generative model)")
    else:
        example = st.selectbox("Example", ids or share_ids, key="attn_example")
        rec = data.manifest(ctx.data_dir).get(example)
        if rec is not None:
            st.text(f"prompt: {rec.get('prompt')}\nreference answer: {rec.get('answer')}")
        left, right = st.columns(2)
        with left:
            st.markdown("**Heatmap over the image**")
            sites = data.distinct(ctx.path, ctx.key, ctx.run_id, "attention", "attention_heatmap", "site")
            site = st.selectbox("Heatmap source (layer/head aggregate)", sites, key="attn_site") if len(sites) > 1 \
                else (sites[0] if sites else None)
            heat_rows = ctx.rows("attention", ("attention_heatmap",), example_id=example, site=site)
            grid = parse_grid(heat_rows.variant.dropna().iloc[0]) if heat_rows.variant.notna().any() else None
            if grid is None:
                st.text("no heatmap rows for this example")
            else:
                heat = heatmap_grid(zip(heat_rows.group, heat_rows.value), grid)
                img = data.image(ctx.data_dir, example)
                alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.55, 0.05, key="attn_alpha")
                cols = st.columns(2)
                if img is not None:
                    cols[0].image(np.asarray(img.resize((256, 256), 0)), caption="image")
                else:
                    cols[0].text("image not available\n(data folder missing)")
                cols[1].image(np.asarray(overlay_heatmap(img, heat, size=256, alpha=alpha)), caption="attention")
                st.text(f"grid {grid[0]}x{grid[1]}; values min {np.nanmin(heat):.4f}, max {np.nanmax(heat):.4f}")
        with right:
            st.markdown("**Image attention share by layer and head**")
            share = ctx.rows("attention", ("image_attention_share",), example_id=example)
            if share.empty:
                st.text("no per-layer rows for this example")
            else:
                layer = pd.to_numeric(share.site.str.extract(r"blocks\.(\d+)\.", expand=False), errors="coerce")
                head = pd.to_numeric(share.variant.str.extract(r"head:(\d+)", expand=False), errors="coerce")
                t = pd.DataFrame({"layer": layer, "head": head, "value": share.value}).dropna()
                layers = sorted(t.layer.unique().astype(int))
                choice = st.selectbox("Layer", ["all layers"] + [f"layer {i}" for i in layers], key="attn_layer")
                if choice == "all layers":
                    z = t.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
                    ui.show_figure(figures.heatmap("share per layer and head", z.values.tolist(),
                                                   x=[f"head {int(h)}" for h in z.columns],
                                                   y=[f"layer {int(i)}" for i in z.index], xaxis="head", yaxis="layer"))
                else:
                    li = int(re.sub(r"\D", "", choice))
                    part = t[t.layer == li].sort_values("head")
                    heads = st.multiselect("Heads", [int(h) for h in part["head"]], default=[int(h) for h in part["head"]],
                                           key="attn_heads")
                    part = part[part["head"].isin(heads)]
                    part = part.assign(group=[f"head {int(h)}" for h in part["head"]], ci_low=np.nan, ci_high=np.nan)
                    ui.show_figure(ui.bar_ci(f"layer {li}: image attention share per head", part, axis="share"))
                    if len(part):
                        st.text(f"mean over the selected heads: {part.value.mean():.4f}")
        m = ctx.metrics()
        ui.show_table(ui.metric_frame(m[m.probe == "attention"]))
