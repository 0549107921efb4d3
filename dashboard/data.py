"""Cached, read-only access to the store (and to example images) for the dashboard.

The dashboard reads only the store: a DuckDB file opened read-only per query, with fixed
SQL and bound parameters. A run id is always one the store lists (`runs()`); it is never
used as a path. Images come from the data folder the store recorded for the run, through
`audit.report.assets.resolve_image`, which refuses any path that leaves that folder. A run's
transcript is RUN_DIR/samples.parquet of the run folder the store recorded, and nothing else
(`audit.report.samples.samples_file`: a regular file directly inside that folder).
Cache keys include the store file's size and mtime, so new runs show up without a restart.

Metrics and rows come back as typed schema-v2 frames (`audit.schema`) whatever wrote them:
a store created by version 1 (no typed columns), a migrated store whose old runs have
NULL typed columns, or a version-2 store. Each run is upgraded by its own schema version.
Nothing here imports torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import streamlit as st

from audit.report import samples as transcript
from audit.report.assets import example_image, manifest_record, read_manifest
from audit.schema import METRIC_BASE, METRIC_COLUMNS, metrics_frame, upgrade_metrics, upgrade_rows
from audit.store import SCHEMA, default_store_path

__all__ = ["store_path", "stamp", "runs", "run_row", "summary", "metrics", "all_metrics", "findings", "rows",
           "example_ids", "manifest", "image", "ranked_samples", "sample_probes", "StoreBusy",
           "SAMPLE_VIEW"]

# The transcript columns the sample viewer shows.
SAMPLE_VIEW = ["probe", "example_id", "variant", "call", "prompt", "rendered_prompt", "image_sha256", "candidates",
               "scores", "predicted", "generated"]

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


def _version(column, recorded) -> int:
    """A run's schema version: the runs column when set, else its summary's, else 1."""
    for v in (column, recorded):
        try:
            if v is not None and not pd.isna(v):
                return int(v)
        except (TypeError, ValueError):
            continue
    return 1


@st.cache_data(show_spinner=False, max_entries=32)
def runs(path: str, key: tuple) -> pd.DataFrame:
    """Every stored run with its `schema_version` (version-1 stores have no such column)."""
    df = _query(path, "SELECT * EXCLUDE (summary, config, environment), "
                      "json_extract_string(summary, '$.schema_version') AS recorded_version "
                      "FROM runs ORDER BY created, run_id")
    column = df["schema_version"] if "schema_version" in df.columns else [None] * len(df)
    df = df.assign(schema_version=[_version(c, r) for c, r in zip(column, df.recorded_version)])
    return df.drop(columns=["recorded_version"])


def run_row(path: str, key: tuple, run_id: str | None) -> dict | None:
    """The store's row for `run_id`, or None: the only way a page turns an id into paths."""
    if not run_id:
        return None
    r = runs(path, key)
    hit = r[r.run_id == run_id]
    return hit.iloc[0].to_dict() if len(hit) else None


def _run_version(path: str, key: tuple, run_id: str) -> int:
    row = run_row(path, key, run_id)
    return int(row["schema_version"]) if row else 1


@st.cache_data(show_spinner=False, max_entries=64)
def summary(path: str, key: tuple, run_id: str) -> dict | None:
    df = _query(path, "SELECT summary FROM runs WHERE run_id = ?", (run_id,))
    if df.empty:
        return None
    try:
        return json.loads(df.summary.iloc[0])
    except (TypeError, ValueError):
        return None


def _typed_metrics(df: pd.DataFrame, version: int) -> pd.DataFrame:
    df = df.rename(columns={"grp": "group"})
    if version < 2:
        return upgrade_metrics(df.reindex(columns=METRIC_BASE))
    return metrics_frame(df.reindex(columns=METRIC_COLUMNS).to_dict(orient="records"))


@st.cache_data(show_spinner=False, max_entries=64)
def metrics(path: str, key: tuple, run_id: str) -> pd.DataFrame:
    """The run's metric rows as a typed v2 frame."""
    df = _query(path, "SELECT * FROM metrics WHERE run_id = ? ORDER BY probe, metric, grp NULLS FIRST", (run_id,))
    return _typed_metrics(df, _run_version(path, key, run_id))


@st.cache_data(show_spinner=False, max_entries=16)
def all_metrics(path: str, key: tuple) -> pd.DataFrame:
    """Metric rows of every run (typed, each run by its own version), with run_id, created, parent_run_id."""
    frames = []
    for r in runs(path, key).to_dict(orient="records"):
        m = metrics(path, key, r["run_id"])
        frames.append(m.assign(run_id=r["run_id"], created=r["created"], parent_run_id=r["parent_run_id"]))
    return pd.concat(frames, ignore_index=True) if frames else metrics_frame([]).assign(
        run_id=pd.Series(dtype=object), created=pd.Series(dtype=object), parent_run_id=pd.Series(dtype=object))


@st.cache_data(show_spinner=False, max_entries=64)
def findings(path: str, key: tuple, run_id: str) -> pd.DataFrame:
    return _query(path, "SELECT severity, probe, message FROM findings WHERE run_id = ? ORDER BY "
                        "CASE severity WHEN 'fail' THEN 0 WHEN 'warning' THEN 1 ELSE 2 END, probe", (run_id,))


@st.cache_data(show_spinner=False, max_entries=128)
def rows(path: str, key: tuple, run_id: str, probe: str, metric_names: tuple[str, ...] = (),
         example_id: str | None = None) -> pd.DataFrame:
    """Result rows of one run and probe as a typed v2 frame, narrowed in SQL by the columns every
    version has (metric names, one example); typed filters (set, layer, ...) are for the caller."""
    sql = "SELECT * FROM result_rows WHERE run_id = ? AND probe = ?"
    params: list = [run_id, probe]
    if metric_names:
        sql += " AND metric IN (" + ", ".join("?" for _ in metric_names) + ")"
        params += list(metric_names)
    if example_id is not None:
        sql += " AND example_id = ?"
        params.append(example_id)
    df = _query(path, sql, tuple(params)).drop(columns=["run_id"]).rename(columns={"grp": "group"})
    return upgrade_rows(df, _run_version(path, key, run_id))


@st.cache_data(show_spinner=False, max_entries=64)
def row_metrics(path: str, key: tuple, run_id: str) -> pd.DataFrame:
    """(probe, metric, rows) of the run's result rows: what each probe wrote per example."""
    return _query(path, "SELECT probe, metric, count(*) AS rows FROM result_rows WHERE run_id = ? "
                        "GROUP BY probe, metric ORDER BY probe, metric", (run_id,))


@st.cache_data(show_spinner=False, max_entries=64)
def example_ids(path: str, key: tuple, run_id: str, probe: str, metric: str | None = None) -> list[str]:
    """Example ids with rows of `probe` (of one row metric when given), sorted."""
    sql = "SELECT DISTINCT example_id FROM result_rows WHERE run_id = ? AND probe = ? AND example_id IS NOT NULL"
    params: tuple = (run_id, probe)
    if metric is not None:
        sql += " AND metric = ?"
        params += (metric,)
    return _query(path, sql + " ORDER BY example_id", params).example_id.astype(str).tolist()


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
    rec, _ = manifest_record(manifest(data_dir), example_id)
    return example_image(data_dir, rec)


@st.cache_data(show_spinner=False, max_entries=16)
def _samples(run_dir: str, key: tuple, probe: str | None) -> pd.DataFrame:
    return transcript.read_samples(run_dir, probe=probe, columns=SAMPLE_VIEW)


@st.cache_data(show_spinner=False, max_entries=16)
def _sample_probes(run_dir: str, key: tuple) -> list[str]:
    return transcript.sample_probes(run_dir)


def sample_probes(run_dir: str | None) -> list[str]:
    """Probes with rows in the run's transcript ([] when the run folder has no samples.parquet)."""
    f = transcript.samples_file(run_dir) if isinstance(run_dir, str) else None
    return _sample_probes(run_dir, stamp(str(f))) if f is not None else []


@st.cache_data(show_spinner=False, max_entries=8)
def _ranked(run_dir: str, key: tuple, probe: str, data_dir: str | None, manifest_key: tuple) -> pd.DataFrame:
    return transcript.rank(_samples(run_dir, key, probe), manifest(data_dir))


def ranked_samples(run_dir: str | None, probe: str, data_dir: str | None) -> pd.DataFrame:
    """One probe's transcript ranked worst first (`audit.report.samples.rank`), with the reference
    answers from the run's data folder; cached until the transcript or the manifest changes."""
    f = transcript.samples_file(run_dir) if isinstance(run_dir, str) else None
    if f is None:
        return transcript.rank(pd.DataFrame(columns=SAMPLE_VIEW), {})
    mkey = _manifest_stamp(data_dir) if isinstance(data_dir, str) and data_dir else (0, 0)
    return _ranked(run_dir, stamp(str(f)), probe, data_dir, mkey)
