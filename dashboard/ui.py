"""Widgets every dashboard page shares: the store and run picker, safe text, tables, charts.

Strings from the store (example ids, prompts, groups, finding messages, paths) are shown
with st.text, st.code, st.json or inside dataframes and plotly figures, never through
markdown or HTML; no call here or in any page passes unsafe_allow_html.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from dashboard import data

__all__ = ["context", "Context", "metric_frame", "show_table", "show_figure", "bar_ci", "no_rows", "NAV"]

# Page links shown in the sidebar (Streamlit's own file-name navigation is hidden by
# `mmaudit dashboard`): entry script app.py plus the files of dashboard/pages/.
NAV = (("app.py", "Runs & scorecard"), ("pages/attention.py", "Attention explorer"),
       ("pages/modality.py", "Modality reliance"), ("pages/bias.py", "Bias explorer"), ("pages/safety.py", "Safety"),
       ("pages/privacy.py", "Privacy & defenses"), ("pages/compare.py", "Run comparison"))


class Context:
    """The store and the selected run of this page view."""

    def __init__(self, path: str, key: tuple, runs: pd.DataFrame, run: dict | None):
        self.path, self.key, self.runs, self.run = path, key, runs, run

    @property
    def run_id(self) -> str | None:
        return self.run["run_id"] if self.run else None

    @property
    def data_dir(self) -> str | None:
        return self.run.get("data_path") if self.run else None

    def metrics(self) -> pd.DataFrame:
        return data.metrics(self.path, self.key, self.run_id)

    def rows(self, probe: str, metric_names=(), **kw) -> pd.DataFrame:
        return data.rows(self.path, self.key, self.run_id, probe, tuple(metric_names), **kw)


def _label(runs: pd.DataFrame, run_id: str) -> str:
    r = runs[runs.run_id == run_id].iloc[0]
    return f"{r.run_id} · {str(r.created)[:19]} · {r.architecture}"


def pick_run(runs: pd.DataFrame, *, label: str, key: str, default: str | None = None, where=None) -> str | None:
    """A run of the store (selectbox over the store's ids; no free text). The choice is kept
    in session_state[key] so it survives page switches."""
    ids = runs.run_id.astype(str).tolist()
    if not ids:
        return None
    wanted = st.session_state.get(key) or default
    index = ids.index(wanted) if wanted in ids else len(ids) - 1
    choice = (where or st.sidebar).selectbox(label, ids, index=index, key=f"{key}_picker",
                                             format_func=lambda i: _label(runs, i))
    st.session_state[key] = choice
    return choice


def context(title: str) -> Context | None:
    """Page title, the sidebar run picker, and the empty-store / busy-store messages.

    Returns None when the page has nothing to show (the message is already on screen)."""
    st.set_page_config(page_title=f"mmaudit · {title}", layout="wide")
    _nav()
    st.title(title)
    path = data.store_path()
    key = data.stamp(path)
    st.sidebar.caption("Store")
    st.sidebar.code(path, language=None)
    try:
        runs = data.runs(path, key)
    except data.StoreBusy as exc:
        st.warning("The store is busy (a run is being recorded). Reload in a moment.")
        st.text(str(exc))
        return None
    if runs.empty:
        st.info("The store has no runs yet. Record one with `mmaudit run ... --store` (or `mmaudit demo`) and "
                "reload this page.")
        return None
    # A ?run= link selects a run only if the store lists it; the id is never used as a path.
    q = st.query_params.get("run")
    if q in set(runs.run_id) and "run_id" not in st.session_state:
        st.session_state["run_id"] = q
    run_id = pick_run(runs, label="Run", key="run_id")
    return Context(path, key, runs, data.run_row(path, key, run_id))


def _nav() -> None:
    """Links to every page, when the app runs from dashboard/app.py (not a page file alone)."""
    from pathlib import Path

    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    main = Path(getattr(ctx, "main_script_path", "") or "")
    if main.name != "app.py" or not (main.parent / "pages").is_dir():
        return
    for target, label in NAV:
        st.sidebar.page_link(target, label=label)
    st.sidebar.divider()


def metric_frame(df: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("probe", "metric", "group", "value", "ci_low", "ci_high", "n") if c in df.columns]
    out = df[cols].rename(columns={"ci_low": "95% CI low", "ci_high": "95% CI high"})
    return out.reset_index(drop=True)


def show_table(df: pd.DataFrame, *, height: int | str = "auto") -> None:
    st.dataframe(df, hide_index=True, height=height)


def show_figure(fig: dict | go.Figure, *, key: str | None = None) -> None:
    figure = fig if isinstance(fig, go.Figure) else go.Figure(fig)
    figure.update_layout(width=None, autosize=True)
    st.plotly_chart(figure, key=key, config={"displaylogo": False})


def bar_ci(title: str, df: pd.DataFrame, label_col: str = "group", *, axis: str = "value") -> dict:
    from audit.report import figures

    labels = [str(x) if x is not None and not pd.isna(x) else "overall" for x in df[label_col]]
    return figures.bar_ci(title, labels, df.value, df.ci_low, df.ci_high, axis=axis)


def no_rows(what: str) -> None:
    st.info(f"This run has no {what}.")
