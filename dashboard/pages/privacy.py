"""Privacy & defenses: empirical and theoretical ε, ε against utility and fairness against
utility over every run of the store, and which run was derived from which."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from audit.report import figures
from dashboard import data, ui

PRIVACY = ("epsilon_theoretical", "epsilon_lower_bound", "mia_auc", "tpr_at_1pct_fpr")
FAIRNESS = ("group_fairness", "counterfactual_bias", "retrieval_skew")


def keyed(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(key=[f"{p} · {x}" + (f" [{g}]" if isinstance(g, str) else "")
                          for p, x, g in zip(df.probe, df.metric, df.group)])


def pick(label: str, keys: list[str], prefer: tuple[str, ...], key: str) -> str | None:
    if not keys:
        return None
    default = next((k for p in prefer for k in keys if p in k), keys[0])
    return st.selectbox(label, keys, index=keys.index(default), key=key)


def scatter(df: pd.DataFrame, xkey: str, ykey: str, title: str) -> None:
    x = df[df.key == xkey].set_index("run_id").value
    y = df[df.key == ykey].set_index("run_id").value
    both = pd.concat([x.rename("x"), y.rename("y")], axis=1).dropna()
    if both.empty:
        st.text("no run has both measures")
        return
    ui.show_figure(figures.scatter(title, [(r.x, r.y, i) for i, r in both.iterrows()], xaxis=xkey, yaxis=ykey))


ctx = ui.context("Privacy & defenses")
if ctx is not None:
    allm = keyed(data.all_metrics(ctx.path, ctx.key))
    priv = allm[allm.metric.isin(PRIVACY)]
    mine = priv[priv.run_id == ctx.run_id]
    st.subheader("Selected run")
    if mine.empty:
        st.info("This run has no privacy_audit metrics (ε, membership-inference AUC).")
    else:
        ui.show_table(ui.metric_frame(mine))
        th = mine[mine.metric == "epsilon_theoretical"].value
        lb = mine[mine.metric == "epsilon_lower_bound"].value
        if len(th) and len(lb) and lb.iloc[0] > th.iloc[0] + 1e-9:
            st.error("The empirical ε lower bound exceeds the theoretical ε: the DP accounting is wrong.")
    keys = sorted(allm.key.unique())
    utility = pick("Utility measure", [k for k in keys if "accuracy" in k or "f1" in k] or keys,
                   ("modality_ablation · accuracy [none]", "accuracy"), "priv_utility")
    st.subheader("ε against utility (all runs)")
    eps_keys = sorted(priv.key.unique())
    if not eps_keys:
        st.text("no run in the store has privacy metrics yet")
    elif utility:
        eps = pick("Privacy measure", eps_keys, ("epsilon_theoretical", "epsilon_lower_bound"), "priv_eps")
        scatter(allm, eps, utility, "privacy against utility")
    st.subheader("Fairness against utility (all runs)")
    fk = sorted(allm[allm.probe.isin(FAIRNESS)].key.unique())
    if not fk:
        st.text("no run in the store has fairness metrics yet")
    elif utility:
        fair = pick("Fairness measure", fk, ("accuracy_difference [group]", "flip_rate", "difference"), "priv_fair")
        scatter(allm, fair, utility, "fairness against utility")
    st.subheader("Lineage (defended models are audited as new runs linked to their parent)")
    lineage = ctx.runs[ctx.runs.parent_run_id.notna()][["run_id", "parent_run_id", "created", "model_path"]]
    if lineage.empty:
        st.text("no run in the store names a parent run")
    else:
        ui.show_table(lineage)
