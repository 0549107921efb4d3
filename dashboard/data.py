"""Cached, read-only access to the store (and to example images) for the dashboard.

The dashboard reads only the store: a DuckDB file opened read-only per query, with fixed
SQL and bound parameters. A run id is always one the store lists (`runs()`); it is never
used as a path. Images come from the data folder the store recorded for the run, through
`audit.report.assets.resolve_image`, which refuses any path that leaves that folder.
Cache keys include the store file's size and mtime, so new runs show up without a restart.
Nothing here imports torch.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from audit.report.assets import example_image, read_manifest
from audit.store import SCHEMA, default_store_path

__all__ = ["store_path", "stamp", "runs", "run_row", "summary", "metrics", "all_metrics", "findings", "rows",
           "example_ids", "manifest", "image", "StoreBusy"]

ENV = "MMAUDIT_STORE"  # set by `mmaudit dashboard --store`


class StoreBusy(RuntimeError):
    """The store is locked by a writer (a run being recorded); retry in a moment."""


def store_path() -> str:
    return str(Path(os.environ[ENV]) if os.environ.get(ENV) else default_store_path())


def stamp(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of the store file: part of every cache key."""
    try:
        st_ = os.stat(path)
    except OSError:
        return (0, 0)
    return (st_.st_size, st_.st_mtime_ns)


def _query(path: str, sql: str, params: tuple = ()) -> pd.DataFrame:
    import duckdb

    if not Path(path).is_file():
        con = duckdb.connect(":memory:")
        con.execute(SCHEMA)
    else:
        try:
            con = duckdb.connect(path, read_only=True)
        except duckdb.Error as exc:  # locked by a writer, or not a DuckDB file
            raise StoreBusy(f"cannot open the store read-only ({type(exc).__name__}); retry in a moment") from exc
    try:
        return con.execute(sql, list(params)).df()
    finally:
        con.close()


@st.cache_data(show_spinner=False, max_entries=32)
def runs(path: str, key: tuple) -> pd.DataFrame:
    return _query(path, "SELECT run_id, created, architecture, model_path, data_path, n_examples, seed, run_dir, "
                        "parent_run_id, model_sha256, data_sha256 FROM runs ORDER BY created, run_id")


def run_row(path: str, key: tuple, run_id: str | None) -> dict | None:
    """The store's row for `run_id`, or None: the only way a page turns an id into paths."""
    if not run_id:
        return None
    r = runs(path, key)
    hit = r[r.run_id == run_id]
    return hit.iloc[0].to_dict() if len(hit) else None


@st.cache_data(show_spinner=False, max_entries=64)
def summary(path: str, key: tuple, run_id: str) -> dict | None:
    import json

    df = _query(path, "SELECT summary FROM runs WHERE run_id = ?", (run_id,))
    if df.empty:
        return None
    try:
        return json.loads(df.summary.iloc[0])
    except (TypeError, ValueError):
        return None


@st.cache_data(show_spinner=False, max_entries=64)
def metrics(path: str, key: tuple, run_id: str) -> pd.DataFrame:
    df = _query(path, "SELECT probe, metric, grp AS \"group\", value, ci_low, ci_high, n FROM metrics "
                      "WHERE run_id = ? ORDER BY probe, metric, grp NULLS FIRST", (run_id,))
    return df


@st.cache_data(show_spinner=False, max_entries=16)
def all_metrics(path: str, key: tuple, metric_names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Metric rows of every run (optionally only some metric names), joined with run facts."""
    sql = ("SELECT m.run_id, r.created, r.parent_run_id, m.probe, m.metric, m.grp AS \"group\", m.value, m.ci_low, "
           "m.ci_high, m.n FROM metrics m JOIN runs r USING (run_id)")
    if metric_names:
        sql += " WHERE m.metric IN (" + ", ".join("?" for _ in metric_names) + ")"
    return _query(path, sql + " ORDER BY r.created, m.run_id", tuple(metric_names or ()))


@st.cache_data(show_spinner=False, max_entries=64)
def findings(path: str, key: tuple, run_id: str) -> pd.DataFrame:
    return _query(path, "SELECT severity, probe, message FROM findings WHERE run_id = ? ORDER BY "
                        "CASE severity WHEN 'fail' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, probe", (run_id,))


@st.cache_data(show_spinner=False, max_entries=128)
def rows(path: str, key: tuple, run_id: str, probe: str, metric_names: tuple[str, ...] = (),
         example_id: str | None = None, site: str | None = None) -> pd.DataFrame:
    """Result rows of one run and probe, narrowed in SQL (metric names, one example, one site)."""
    sql = ("SELECT metric, value, example_id, grp AS \"group\", site, variant FROM result_rows "
           "WHERE run_id = ? AND probe = ?")
    params: list = [run_id, probe]
    if metric_names:
        sql += " AND metric IN (" + ", ".join("?" for _ in metric_names) + ")"
        params += list(metric_names)
    if example_id is not None:
        sql += " AND example_id = ?"
        params.append(example_id)
    if site is not None:
        sql += " AND site = ?"
        params.append(site)
    return _query(path, sql, tuple(params))


@st.cache_data(show_spinner=False, max_entries=64)
def example_ids(path: str, key: tuple, run_id: str, probe: str, metric: str) -> list[str]:
    df = _query(path, "SELECT DISTINCT example_id FROM result_rows WHERE run_id = ? AND probe = ? AND metric = ? "
                      "AND example_id IS NOT NULL ORDER BY example_id", (run_id, probe, metric))
    return df.example_id.astype(str).tolist()


@st.cache_data(show_spinner=False, max_entries=64)
def distinct(path: str, key: tuple, run_id: str, probe: str, metric: str, column: str) -> list[str]:
    col = {"group": "grp", "site": "site", "variant": "variant"}[column]  # fixed names only, never user text
    df = _query(path, f"SELECT DISTINCT {col} AS v FROM result_rows WHERE run_id = ? AND probe = ? AND metric = ? "
                      f"AND {col} IS NOT NULL ORDER BY 1", (run_id, probe, metric))
    return df.v.astype(str).tolist()


def _manifest_stamp(data_dir: str) -> tuple[int, int]:
    return stamp(str(Path(data_dir) / "manifest.jsonl"))


@st.cache_resource(show_spinner=False, max_entries=8)
def _manifest(data_dir: str, key: tuple) -> dict[str, dict]:
    return read_manifest(data_dir)


def manifest(data_dir: str | None) -> dict[str, dict]:
    """{example id: manifest record} of a run's data folder ({} when it is gone). Read-only."""
    if not data_dir or not isinstance(data_dir, str) or not Path(data_dir).is_dir():
        return {}
    return _manifest(data_dir, _manifest_stamp(data_dir))


def image(data_dir: str | None, example_id: str | None):
    """The example's image (PIL, RGB) from inside the run's data folder, or None."""
    if example_id is None:
        return None
    m = manifest(data_dir)
    rec = m.get(example_id) or m.get(str(example_id).split("~")[0])
    return example_image(data_dir, rec)
