"""Privacy & defenses: every probe the catalog puts on the "privacy" page for the selected
run; over every run of the store, privacy against utility and fairness against utility
(utility: metrics the catalog says are better when higher; fairness: metrics of the probes
in the catalog's fairness section); and which run was derived from which."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.catalog import PAGES
from audit.report import figures, meta
from audit.report.results import EPS_LOWER, EPS_THEORY
from dashboard import data, ui

PAGE = "privacy"


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(key=[f"{p} · {x}" + (f" [{g}]" if isinstance(g, str) else "")
                          for p, x, g in zip(df.probe, df.metric, df.group)])


def pick(label: str, keys: list[str], key: str) -> str | None:
    return st.selectbox(label, keys, index=0, key=key) if keys else None


def scatter(df: pd.DataFrame, xkey: str, ykey: str, title: str) -> None:
    x = df[df.key == xkey].drop_duplicates("run_id").set_index("run_id").value
    y = df[df.key == ykey].drop_duplicates("run_id").set_index("run_id").value
    both = pd.concat([x.rename("x"), y.rename("y")], axis=1).dropna()
    if both.empty:
        st.text("no run has both measures")
        return
    ui.show_figure(figures.scatter(title, [(r.x, r.y, i) for i, r in both.iterrows()], xaxis=xkey, yaxis=ykey))


def dp_check(mine: pd.DataFrame) -> None:
    get = {x: v for x, v in zip(mine.metric, mine.value) if not pd.isna(v)}
    if EPS_LOWER in get and EPS_THEORY in get and get[EPS_LOWER] > get[EPS_THEORY] + 1e-9:
        st.error("The empirical ε lower bound exceeds the theoretical ε. The bound holds with 95% confidence, so "
                 "this says, with a false-alarm rate of at most 5%, that the DP accounting is wrong.")


def ordered_keys(df: pd.DataFrame) -> list[str]:
    """Distinct keys, overall rows first (then in store order)."""
    df = df.assign(o=(df.scope != "overall").astype(int))
    return list(dict.fromkeys(df.sort_values("o", kind="stable").key))


ctx = ui.context(PAGES[PAGE])
if ctx is not None:
    st.header("Selected run")
    m = ctx.metrics()
    shown = ui.probe_panels(ctx, PAGE, m)
    if not shown:
        st.info("This run has no privacy metrics (ε, membership-inference AUC).")
    else:
        dp_check(m[m.probe.isin(shown) & (m.scope == "overall")])
    st.header("Across runs")
    allm = keyed(data.all_metrics(ctx.path, ctx.key))
    higher = [meta.direction(p, x) > 0 for p, x in zip(allm.probe, allm.metric)]
    utility = pick("Utility measure (the catalog says higher is better)", ordered_keys(allm[higher]), "priv_utility")
    priv = allm[allm.probe.isin(meta.expected_probes(page=PAGE))]
    st.subheader("Privacy against utility (all runs)")
    if priv.empty:
        st.text("no run in the store has privacy metrics yet")
    elif utility:
        eps = pick("Privacy measure", ordered_keys(priv), "priv_eps")
        scatter(allm, eps, utility, "privacy against utility")
    st.subheader("Fairness against utility (all runs)")
    fair = allm[allm.probe.isin(meta.expected_probes(section="fairness")) & allm.scope.isin(["overall", "comparison"])]
    if fair.empty:
        st.text("no run in the store has fairness metrics yet")
    elif utility:
        fk = pick("Fairness measure", ordered_keys(fair), "priv_fair")
        scatter(allm, fk, utility, "fairness against utility")
    st.subheader("Lineage (defended models are audited as new runs linked to their parent)")
    lineage = ctx.runs[ctx.runs.parent_run_id.notna()][["run_id", "parent_run_id", "created", "model_path"]]
    if lineage.empty:
        st.text("no run in the store names a parent run")
    else:
        ui.show_table(lineage)
