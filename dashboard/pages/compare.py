"""Run comparison: a candidate run against a baseline (by default its parent run). Rows are
matched by their CONTRACT label (probe, metric, group), the same in every schema version;
whether a change is better or worse follows the catalog's direction of each metric. The metrics
that changed most are drawn one per chart, before (grey) against after."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.report import evidence, meta
from dashboard import data, ui


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    out = df.assign(g=df.group.astype("object").where(df.group.notna(), "\0overall"))
    return out.assign(k=out.groupby(["probe", "metric", "g"], sort=False).cumcount())


def disjoint(r) -> bool | None:
    vals = [r.ci_low, r.ci_high, r.ci_low_baseline, r.ci_high_baseline]
    if any(pd.isna(v) for v in vals):
        return None
    return r.ci_high < r.ci_low_baseline or r.ci_high_baseline < r.ci_low


ctx = ui.context(ui.COMPARE)
if ctx is not None:
    others = ctx.runs[ctx.runs.run_id != ctx.run_id]
    if others.empty:
        st.info("The store holds one run; record another (e.g. the audit of a defended model) to compare.")
    else:
        parent = ctx.run.get("parent_run_id")
        default = parent if parent in set(others.run_id) else others.run_id.iloc[-1]
        base_id = ui.pick_run(others, label="Baseline", key="baseline_id", default=default, where=st)
        st.text(f"candidate {ctx.run_id}  vs  baseline {base_id}" + ("  (its parent run)" if base_id == parent else ""))
        a, b = keyed(ctx.metrics()), keyed(data.metrics(ctx.path, ctx.key, base_id))
        both = a.merge(b[["probe", "metric", "g", "k", "value", "ci_low", "ci_high", "scope"]],
                       on=["probe", "metric", "g", "k"], how="outer", suffixes=("", "_baseline"))
        both["scope"] = both.scope.fillna(both.scope_baseline)
        both["delta"] = both.value - both.value_baseline
        sign = [meta.direction(p, x) for p, x in zip(both.probe, both.metric)]
        both["change"] = [None if pd.isna(d) or s == 0 or abs(d) < 1e-12 else ("better" if d * s > 0 else "worse")
                          for d, s in zip(both.delta, sign)]
        both["intervals disjoint"] = [disjoint(r) for r in both.itertuples()]
        scope = st.radio("Rows", ["overall and per attribute", "all rows"], horizontal=True, key="cmp_scope")
        if scope != "all rows":
            both = both[both.scope.isin(["overall", "comparison"])]
        if st.toggle("Only rows present in both runs", value=True, key="cmp_both"):
            both = both[both.value.notna() & both.value_baseline.notna()]
        both = both.reindex(both.delta.abs().sort_values(ascending=False, na_position="last").index)
        # one chart per metric (one metric per axis), the metrics that changed most first
        for i, blk in enumerate(evidence.change_figures(both.rename(columns={"value_baseline": "value_before"}))):
            ui.show_figure(blk["figure"], key=f"cmp-{i}")
            ui.plain_caption(blk["caption"])
        table = ui.metric_frame(both).drop(columns=["95% CI low", "95% CI high", "value"])
        table = table.assign(baseline=both.value_baseline.tolist(), candidate=both.value.tolist(),
                             delta=both.delta.tolist(), change=both.change.tolist(),
                             **{"intervals disjoint": both["intervals disjoint"].tolist()})
        ui.show_table(table)
        worse = int((both.change == "worse").sum())
        better_n = int((both.change == "better").sum())
        st.text(f"{better_n} better, {worse} worse, {len(both) - worse - better_n} unchanged or without direction")
        ui.plain_caption("'change' follows the point estimates and the catalog's direction of each metric; "
                         "'intervals disjoint' marks changes whose two 95% intervals do not overlap (a conservative "
                         "test, false-alarm rate below 5% per row, not corrected for the number of rows).")
