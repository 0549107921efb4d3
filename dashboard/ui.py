"""Widgets every dashboard page shares: the store and run picker, safe text, tables, charts,
and the catalog-driven probe panels.

Which probes a page shows, their titles, metric labels, units and meanings come from the
catalog (`audit.report.meta`); breakdowns come from typed columns. Strings from the store
(example ids, prompts, groups, finding messages, paths) are shown with st.text, st.code,
st.json or inside dataframes and plotly figures, never through markdown or HTML; catalog
text in captions is markdown-escaped; no call here or in any page passes unsafe_allow_html.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from audit.report import evidence, meta
from audit.report.blocks import num
from dashboard import data
from dashboard.nav import COMPARE, HOME, SAMPLES, nav

__all__ = ["context", "Context", "metric_frame", "show_table", "show_figure", "bar_ci", "no_rows", "nav",
           "probe_panels", "page_probes", "plain_caption", "show_findings", "HOME", "COMPARE", "SAMPLES"]

SEVERITY = {"fail": "FAIL", "warning": "WARNING", "info": "info"}
_MD = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


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

    @property
    def run_dir(self) -> str | None:
        """The run folder the store recorded (the only place a page reads run files from)."""
        return self.run.get("run_dir") if self.run else None

    def metrics(self) -> pd.DataFrame:
        return data.metrics(self.path, self.key, self.run_id)

    def rows(self, probe: str, metric_names=(), **kw) -> pd.DataFrame:
        return data.rows(self.path, self.key, self.run_id, probe, tuple(metric_names), **kw)

    def row_metrics(self) -> pd.DataFrame:
        return data.row_metrics(self.path, self.key, self.run_id)


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
    st.sidebar.code(path, language=None, wrap_lines=True)  # the whole path, wrapped, never cut off
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
    row = data.run_row(path, key, run_id)
    if row is not None:  # the picker's label is cut off in a narrow sidebar: the whole of it, wrapped
        st.sidebar.caption("Selected run")
        st.sidebar.code(f"{_label(runs, run_id)}\nmodel {row.get('model_path')}\nrun folder {row.get('run_dir')}",
                        language=None, wrap_lines=True)
    return Context(path, key, runs, row)


def _nav() -> None:
    """Links to every page, when the app runs from dashboard/app.py (not a page file alone)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    main = Path(getattr(ctx, "main_script_path", "") or "")
    if main.name != "app.py" or not (main.parent / "pages").is_dir():
        return
    for target, label in nav():
        st.sidebar.page_link(target, label=label)
    st.sidebar.divider()


def plain_caption(text: str) -> None:
    """A caption whose text is shown literally (markdown characters escaped)."""
    st.caption(_MD.sub(r"\\\1", str(text)))


def metric_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Typed metric rows for display: catalog label and unit, breakdown from typed columns, CONTRACT group."""
    recs = df.to_dict(orient="records")
    out = pd.DataFrame({
        "probe": [r["probe"] for r in recs], "metric": [r["metric"] for r in recs],
        "measure": [meta.metric_label(r["probe"], r["metric"]) for r in recs],
        "breakdown": [meta.dims_label(r) for r in recs],
        "group": [None if meta.is_missing(r.get("group")) else r["group"] for r in recs],
        "value": [num(r["value"]) for r in recs], "95% CI low": [num(r["ci_low"]) for r in recs],
        "95% CI high": [num(r["ci_high"]) for r in recs],
        "n": [None if meta.is_missing(r.get("n")) else int(r["n"]) for r in recs],
        "unit": [meta.metric_unit(r["probe"], r["metric"]) for r in recs]})
    for extra in ("run_id", "created"):
        if extra in df.columns:
            out.insert(0, extra, df[extra].tolist())
    return out


def show_table(df: pd.DataFrame, *, height: int | str = "auto") -> None:
    st.dataframe(df, hide_index=True, height=height)


def show_findings(f: pd.DataFrame) -> None:
    """Every finding in full, wrapped (a table cell would cut long messages off), worst first."""
    if f.empty:
        st.text("no findings")
        return
    for r in f.to_dict(orient="records"):
        st.text(f"{SEVERITY.get(str(r.get('severity')), str(r.get('severity')))} · {r.get('probe')}: "
                f"{r.get('message')}")


def show_meanings(df: pd.DataFrame) -> None:
    """The catalog's "what this means" line of every metric in `df`."""
    for line in meta.meanings(df):
        plain_caption(f"What this means: {line}")


def show_figure(fig: dict | go.Figure, *, key: str | None = None) -> None:
    figure = fig if isinstance(fig, go.Figure) else go.Figure(fig)
    figure.update_layout(width=None, autosize=True)
    st.plotly_chart(figure, key=key, config={"displaylogo": False})


def bar_ci(title: str, df: pd.DataFrame, label_col: str | None = None, *, axis: str = "value") -> dict:
    """Bars with 95% intervals; labels from `label_col`, or from the rows' typed breakdown. Rows
    without a value or of a group without examples (n = 0) get no (blank) bar."""
    from audit.report import figures

    if "n" in df.columns:
        df = df[df.value.notna() & ~(df.n.notna() & (pd.to_numeric(df.n, errors="coerce").fillna(1) <= 0))]
    else:
        df = df[df.value.notna()]
    labels = [str(x) for x in df[label_col]] if label_col else meta.row_labels(df)
    return figures.bar_ci(title, labels, df.value, df.ci_low, df.ci_high, axis=axis)


def no_rows(what: str) -> None:
    st.info(f"This run has no {what}.")


def page_probes(m: pd.DataFrame, page: str) -> list[str]:
    """Probes of the run whose catalog spec puts them on `page`."""
    return meta.probes_where(m.probe.dropna().unique(), page=page)


def probe_panels(ctx: Context, page: str, m: pd.DataFrame, *, grouped: bool = True) -> list[str]:
    """For each probe the catalog puts on `page`: title, description, overall table, charts and
    grouped rows (by scope), each with its meaning. Returns the probes shown."""
    probes = page_probes(m, page)
    missing = [p for p in meta.expected_probes(page=page) if p not in probes]
    if missing:
        st.text("not run: " + ", ".join(missing))
    for p in probes:
        spec = meta.spec_of(p)
        pm = m[m.probe == p]
        st.subheader(spec.title)
        plain_caption(f"{p}: {spec.description}")
        overall = pm[pm.scope == "overall"]
        if len(overall):
            show_table(metric_frame(overall))
            show_meanings(overall)
        if not grouped:
            continue
        for i, blk in enumerate(evidence.bar_figures(pm) + evidence.layer_curves(pm)):
            show_figure(blk["figure"], key=f"panel-{p}-{i}")
            if blk.get("caption"):
                plain_caption(blk["caption"])
        rest = pm[pm.scope != "overall"]
        if len(rest):
            with st.expander(f"{spec.title}: every grouped row ({len(rest)})"):
                show_table(metric_frame(rest))
                show_meanings(rest)
    return probes
