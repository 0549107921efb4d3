"""Run comparison: a candidate run against a baseline (by default its parent run)."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.report import figures
from audit.report.blocks import better_direction, group_kind
from dashboard import data, ui

ctx = ui.context("Run comparison")
if ctx is not None:
    others = ctx.runs[ctx.runs.run_id != ctx.run_id]
    if others.empty:
        st.info("The store holds one run; record another (e.g. the audit of a defended model) to compare.")
    else:
        parent = ctx.run.get("parent_run_id")
        default = parent if parent in set(others.run_id) else others.run_id.iloc[-1]
        base_id = ui.pick_run(others, label="Baseline", key="baseline_id", default=default, where=st)
        st.text(f"candidate {ctx.run_id}  vs  baseline {base_id}" + ("  (its parent run)" if base_id == parent else ""))
        a = ctx.metrics()
        b = data.metrics(ctx.path, ctx.key, base_id)
        both = a.merge(b, on=["probe", "metric", "group"], how="outer", suffixes=("", "_baseline"))
        both["delta"] = both.value - both.value_baseline
        both["direction"] = both.metric.map(better_direction)
        both["change"] = [None if pd.isna(d) or s == 0 or abs(d) < 1e-12 else ("better" if d * s > 0 else "worse")
                          for d, s in zip(both.delta, both.direction)]
        scope = st.radio("Rows", ["overall and per attribute", "all rows"], horizontal=True, key="cmp_scope")
        if scope != "all rows":
            both = both[both.group.map(group_kind).isin(["overall", "comparison"])]
        only = st.toggle("Only rows present in both runs", value=True, key="cmp_both")
        if only:
            both = both[both.value.notna() & both.value_baseline.notna()]
        both = both.reindex(both.delta.abs().sort_values(ascending=False, na_position="last").index)
        top = both[both.delta.notna()].head(20)
        if len(top):
            labels = [f"{p} · {x}" + (f" [{g}]" if isinstance(g, str) else "")
                      for p, x, g in zip(top.probe, top.metric, top.group)]
            better = [None if c is None else c == "better" for c in top.change]
            ui.show_figure(figures.delta_bars("Largest changes (candidate − baseline)", labels, top.delta, better))
        ui.show_table(both[["probe", "metric", "group", "value_baseline", "value", "delta", "change", "n"]]
                      .rename(columns={"value_baseline": "baseline", "value": "candidate"}))
        worse = int((both.change == "worse").sum())
        better_n = int((both.change == "better").sum())
        st.text(f"{better_n} better, {worse} worse, {len(both) - worse - better_n} unchanged or without direction")
