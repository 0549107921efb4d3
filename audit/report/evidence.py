"""Figures and galleries built from typed columns, for any probe that writes them.

- bar charts of grouped metric rows (labels from the typed breakdown, `meta.dims_label`);
- per-layer curves of metric rows with a `layer`;
- before/after bars of the metrics that changed most against a compared run;
- layer x head heatmaps of result rows with `layer` and `head`;
- image-grid heatmaps over the example image, from result rows with `grid_row`/`grid_col`;
- counterfactual-set galleries from result rows with a `set_id`.
Nothing here names a probe: what a probe writes decides what it gets.
"""
from __future__ import annotations

import pandas as pd

from audit.report import figures, meta
from audit.report.assets import (
    example_image,
    heatmap_grid,
    manifest_record,
    overlay_heatmap,
    png_base64,
    predicted_answer,
)
from audit.report.blocks import figure, gallery, num

__all__ = ["bar_figures", "layer_curves", "layer_head_heatmaps", "change_figures", "grid_gallery", "set_gallery",
           "member_lines"]

MAX_FIGS = 6
N_SETS = 4
N_HEATMAPS = 6
MAX_GRIDS = 3


def _meaning(probe: str, metric: str) -> str:
    """The catalog's meaning of a metric; for a per-example row value it does not list, what the chart shows."""
    meaning = meta.metric_meaning(probe, metric)
    if meaning:
        return meaning
    spec = meta.spec_of(probe)
    return (f"the per-example value '{metric}' that {spec.title if spec else probe} writes, averaged over the "
            "audited examples; larger cells carry more of it (the probe's description above says how it is measured).")


def _caption(probe: str, metric: str, extra: str = "") -> str:
    """Every chart's caption starts with one line saying what its number means."""
    return " ".join(x for x in (f"What this means: {_meaning(probe, metric)}", extra) if x)


def _empty(g: pd.DataFrame) -> pd.Series:
    """Rows with nothing to draw: no value, or a group without examples (n = 0)."""
    return g.value.isna() | (g.n.notna() & (g.n.fillna(1) <= 0))


def bar_figures(m: pd.DataFrame, *, limit: int = MAX_FIGS) -> list[dict]:
    """One bar chart per (metric, scope) of grouped rows without a layer (those are curves);
    groups without examples or without a value get no (blank) bar: the caption counts them."""
    out = []
    sel = m[(m.scope != "overall") & m.layer.isna()]
    for (probe, metric, scope), g in sel.groupby(["probe", "metric", "scope"], sort=False):
        empty = _empty(g)
        drawn = g[~empty]
        if len(drawn) < 2:
            continue
        title = f"{meta.metric_label(probe, metric)} ({meta.SCOPE_SHORT.get(scope, scope)})"
        extra = "Bars: point estimates; whiskers: 95% intervals."
        if empty.any():
            extra += f" {int(empty.sum())} group(s) without examples or without a value are not drawn."
        out.append(figure(figures.bar_ci(title, meta.row_labels(drawn), drawn.value, drawn.ci_low, drawn.ci_high,
                                         axis=meta.axis_title(probe, metric)), _caption(probe, metric, extra)))
        if len(out) >= limit:
            break
    return out


def layer_curves(m: pd.DataFrame) -> list[dict]:
    """One line chart per metric with per-layer rows; one line per other breakdown."""
    out = []
    sel = m[m.layer.notna() & ~_empty(m)]
    for (probe, metric), g in sel.groupby(["probe", "metric"], sort=False):
        series: dict[str, list[tuple]] = {}
        for r in g.to_dict(orient="records"):
            key = meta.dims_label({**r, "layer": None, "layer_end": None})
            series.setdefault(key if key != "overall" else meta.metric_label(probe, metric), []).append(
                (int(r["layer"]), r["value"], r["ci_low"], r["ci_high"]))
        out.append(figure(figures.lines(f"{meta.metric_label(probe, metric)} per layer", series,
                                        xaxis="layer (0 = first)", yaxis=meta.axis_title(probe, metric)),
                          _caption(probe, metric, "Shaded: 95% interval.")))
    return out


def layer_head_heatmaps(rows: pd.DataFrame) -> list[dict]:
    """Mean over examples of result rows per (layer, head), one heatmap per row metric."""
    out = []
    sel = rows[rows.layer.notna() & rows["head"].notna() & rows.value.notna()]
    for (probe, metric), g in sel.groupby(["probe", "metric"], sort=False):
        z = g.pivot_table(index="layer", columns="head", values="value", aggfunc="mean").sort_index()
        z = z.sort_index(axis=1)
        label = meta.metric_label(probe, metric)
        out.append(figure(figures.heatmap(f"{label} per layer and head (mean over examples)", z.values.tolist(),
                                          x=[f"head {int(h)}" for h in z.columns],
                                          y=[f"layer {int(i)}" for i in z.index], xaxis="head", yaxis="layer",
                                          colorbar=meta.unit_text(probe, metric) or ""),
                          _caption(probe, metric)))
    return out


def change_figures(both: pd.DataFrame, *, limit: int = 4, per_chart: int = 12) -> list[dict]:
    """Before/after bars, one chart per metric (one metric per axis): metrics with an agreed
    direction first, each group by its largest change; p-values (tests, not effects) are left to
    the table. `both`: metric rows with `value_before` and `delta` (this run − the compared run)."""
    sel = both[both.delta.notna()]
    sel = sel[[meta.metric_unit(p, m) != "p-value" for p, m in zip(sel.probe, sel.metric)]]  # tests, not effects
    if sel.empty:
        return []
    size = sel.assign(a=sel.delta.abs()).groupby(["probe", "metric"], sort=False).a.max()
    # metrics with an agreed direction (better / worse) first, then by the size of their largest change
    order = sorted(size.index, key=lambda pm: (meta.direction(*pm) == 0, -size[pm]))
    out = []
    for probe, metric in order[:limit]:
        g = sel[(sel.probe == probe) & (sel.metric == metric)]
        g = g.reindex(g.delta.abs().sort_values(ascending=False, kind="stable").index).head(per_chart)
        sign = meta.direction(probe, metric)
        better = [None if sign == 0 or abs(d) < 1e-12 else d * sign > 0 for d in g.delta]
        spec = meta.spec_of(probe)
        title = f"{spec.title if spec else probe}: {meta.metric_label(probe, metric)}, before and after"
        out.append(figure(figures.before_after(title, meta.row_labels(g), g.value_before, g.value, better,
                                               axis=meta.axis_title(probe, metric)),
                          _caption(probe, metric, "Grey: the compared run. This run: green where better, red where "
                                                  "worse, blue where the metric has no agreed direction (catalog).")))
    return out


def grid_gallery(rows: pd.DataFrame, *, manifest: dict, data_dir) -> list[dict]:
    """Per (row metric, variant) with image-grid cells: the first examples' heatmaps over their images."""
    out = []
    sel = rows[rows.grid_row.notna() & rows.grid_col.notna() & rows.example_id.notna()]
    keys = sel.assign(v=sel.variant.fillna("")).groupby(["probe", "metric", "v"], sort=False)
    for (probe, metric, variant), g in list(keys)[:MAX_GRIDS]:
        items = []
        for eid in sorted(g.example_id.unique())[:N_HEATMAPS]:
            part = g[g.example_id == eid]
            heat = heatmap_grid(zip(part.grid_row, part.grid_col, part.value))
            if heat is None:
                continue
            rec = manifest.get(eid)
            lines = [f"example: {eid}", f"grid {heat.shape[0]}x{heat.shape[1]}"]
            if rec:
                lines.append(f"prompt: {rec.get('prompt')}")
            img = example_image(data_dir, rec)
            items.append({"title": str(eid), "png": png_base64(overlay_heatmap(img, heat)), "lines": lines})
        if not items:
            continue
        what = f"{metric}" + (f" ({variant})" if variant else "")
        caption = (f"{meta.spec_of(probe).title if meta.spec_of(probe) else probe}: {what} over the image grid, "
                   "per example (min-max scaled, blended over the image)")
        if data_dir is None:
            caption += "; the data folder is not available, so the heatmaps are drawn without their images"
        out.append(gallery([{"title": f"{what} heatmaps", "items": items}], caption))
    return out


def member_lines(member: pd.DataFrame, rec: dict | None, eid: str, attribute, value, *, exact: bool) -> list[str]:
    """What one member of a counterfactual set shows: its attribute value, prompt, answer and
    every row value it has (per-choice rows as metric[token]). A member whose prompt the
    probe rewrote (typed variant "rewritten", or a v1 derived id) is not shown the source prompt."""
    per_token = member[member.token.notna()]
    values = member[member.token.isna()].groupby("metric").value.mean().to_dict()
    rewritten = not exact or bool((member.variant == "rewritten").any())
    lines = [f"{attribute} = {value}", f"example: {eid}"]
    if rec and not rewritten:
        lines.append(f"prompt: {rec.get('prompt')}")
    elif rec:
        lines.append(f"prompt: the prompt of {rec.get('id')} with its {attribute} term set to {value}")
    ans = predicted_answer(rec, num(values.get("pred_first")))
    if ans is not None:
        lines.append(f"model answer: {ans}")
    for metric, v in sorted(values.items()):
        if metric != "pred_first" and num(v) is not None:
            lines.append(f"{metric} = {v:.3f}")
    for r in per_token.to_dict(orient="records"):
        if num(r["value"]) is not None:
            lines.append(f"{r['metric']}[{r['token']}] = {r['value']:.3f}")
    return lines


def _set_levels(g: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(set-level metrics: one row per set, member metrics: one row per member), in first-seen order."""
    per_set = g.groupby(["metric", "set_id"], sort=False).size().groupby(level=0, sort=False).max()
    return [m for m, k in per_set.items() if k == 1], [m for m, k in per_set.items() if k > 1]


def set_gallery(rows: pd.DataFrame, *, manifest: dict, data_dir) -> list[dict]:
    """Per probe with set rows: the sets with the largest set-level values first, members side by side."""
    out = []
    sel = rows[rows.set_id.notna() & rows.attribute.notna()]  # sets that vary a (sensitive) attribute
    for probe, g in sel.groupby("probe", sort=False):
        set_metrics, member_metrics = _set_levels(g)
        if not member_metrics:
            continue
        order = g[g.metric.isin(set_metrics)].pivot_table(index="set_id", columns="metric", values="value",
                                                          aggfunc="max").reindex(columns=set_metrics)
        order = order.sort_values(set_metrics, ascending=False) if set_metrics else order
        ids = list(order.index) or sorted(g.set_id.unique())
        members = g[g.metric.isin(member_metrics)]
        groups = []
        for set_id in ids[:N_SETS]:
            part = members[members.set_id == set_id]
            attr = part.attribute.dropna().iloc[0] if part.attribute.notna().any() else "attribute"
            items = []
            keyed = part.assign(v=part.attribute_value.fillna("?"))
            for (eid, value), m in sorted(keyed.groupby(["example_id", "v"]), key=lambda kv: str(kv[0][1])):
                rec, exact = manifest_record(manifest, eid)
                img = example_image(data_dir, rec)
                items.append({"title": str(value), "png": png_base64(img) if img is not None else None,
                              "lines": member_lines(m, rec, eid, attr, value, exact=exact)})
            scores = ", ".join(f"{k} {num(v):.3g}" for k, v in order.loc[set_id].items()
                               if num(v) is not None) if set_id in order.index else ""
            groups.append({"title": f"set {set_id} ({attr})" + (f": {scores}" if scores else ""), "items": items})
        caption = (f"{meta.spec_of(probe).title if meta.spec_of(probe) else probe}: counterfactual sets with the "
                   f"largest effect" + (f" (sorted by {', '.join(set_metrics)})" if set_metrics else ""))
        if data_dir is None:
            caption += "; images are not shown because the data folder is not available"
        out.append(gallery(groups, caption))
    return out
