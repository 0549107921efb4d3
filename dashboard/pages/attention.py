"""Attention explorer: every probe the catalog puts on the "attention" page, then per example
the image with a heatmap from the rows' image-grid cells (`grid_row`, `grid_col`) over it, and
the values per layer and head where the rows carry `layer` and `head`."""
from __future__ import annotations

import numpy as np
import streamlit as st

from audit.catalog import PAGES
from audit.report import figures, meta
from audit.report.assets import heatmap_grid, overlay_heatmap
from dashboard import data, ui

PAGE = "attention"


def heatmap_panel(ctx: ui.Context, r, example: str) -> None:
    grid = r[r.grid_row.notna() & r.grid_col.notna()]
    if grid.empty:
        st.text("no image-grid rows for this example")
        return
    sources = sorted({(m, v if isinstance(v, str) else "") for m, v in zip(grid.metric, grid.variant)})
    source = st.selectbox("Heatmap source", sources, key="attn_site",
                          format_func=lambda s: f"{s[0]} ({s[1]})" if s[1] else s[0]) if len(sources) > 1 \
        else sources[0]
    part = grid[(grid.metric == source[0]) & (grid.variant.fillna("") == source[1])]
    heat = heatmap_grid(zip(part.grid_row, part.grid_col, part.value))
    if heat is None:
        st.text("no finite heatmap values for this example")
        return
    img = data.image(ctx.data_dir, example)
    alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.55, 0.05, key="attn_alpha")
    cols = st.columns(2)
    if img is not None:
        cols[0].image(np.asarray(img.resize((256, 256), 0)), caption="image")
    else:
        cols[0].text("image not available\n(data folder missing)")
    cols[1].image(np.asarray(overlay_heatmap(img, heat, size=256, alpha=alpha)), caption=source[0])
    st.text(f"grid {heat.shape[0]}x{heat.shape[1]}; values min {np.nanmin(heat):.4f}, max {np.nanmax(heat):.4f}")


def layer_head_panel(r, probe: str) -> None:
    t = r[r.layer.notna() & r["head"].notna() & r.value.notna()]
    if t.empty:
        st.text("no per-layer and per-head rows for this example")
        return
    metric = st.selectbox("Measure", sorted(t.metric.unique()), key="attn_measure") if t.metric.nunique() > 1 \
        else t.metric.iloc[0]
    t = t[t.metric == metric]
    layers = {f"layer {int(i)}": int(i) for i in sorted(t.layer.unique())}
    choice = st.selectbox("Layer", ["all layers", *layers], key="attn_layer")
    if choice == "all layers":
        z = t.pivot_table(index="layer", columns="head", values="value", aggfunc="mean")
        ui.show_figure(figures.heatmap(f"{meta.metric_label(probe, metric)} per layer and head", z.values.tolist(),
                                       x=[f"head {int(h)}" for h in z.columns], y=[f"layer {int(i)}" for i in z.index],
                                       xaxis="head", yaxis="layer"))
        return
    part = t[t.layer == layers[choice]].sort_values("head")
    heads = st.multiselect("Heads", [int(h) for h in part["head"]], default=[int(h) for h in part["head"]],
                           key="attn_heads")
    part = part[part["head"].isin(heads)].assign(ci_low=np.nan, ci_high=np.nan)
    ui.show_figure(ui.bar_ci(f"{choice}: {meta.metric_label(probe, metric)} per head", part,
                             axis=meta.axis_title(probe, metric)))
    if len(part):
        st.text(f"mean over the selected heads: {part.value.mean():.4f}")


ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    m = ctx.metrics()
    ui.probe_panels(ctx, PAGE, m)
    with_rows = [p for p in meta.expected_probes(page=PAGE) if p in set(ctx.row_metrics().probe)]
    st.subheader("Per example")
    if not with_rows:
        ui.no_rows("per-example rows of the probes shown here (run `attention` on a white-box generative model)")
    else:
        probe = st.selectbox("Probe", with_rows, key="attn_probe", format_func=lambda p: meta.spec_of(p).title) \
            if len(with_rows) > 1 else with_rows[0]
        ids = data.example_ids(ctx.path, ctx.key, ctx.run_id, probe, None)
        example = st.selectbox("Example", ids, key="attn_example")
        rec = data.manifest(ctx.data_dir).get(example)
        if rec is not None:
            st.text(f"prompt: {rec.get('prompt')}\nreference answer: {rec.get('answer')}")
        r = ctx.rows(probe, example_id=example)
        left, right = st.columns(2)
        with left:
            st.markdown("**Heatmap over the image**")
            heatmap_panel(ctx, r, example)
        with right:
            st.markdown("**By layer and head**")
            layer_head_panel(r, probe)
