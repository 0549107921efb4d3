"""Append-only result store in an embedded DuckDB file.

Every run records its provenance (model identity and data SHA-256, config, seed, versions,
device) next to its metrics, findings, the long-form rows behind them and the files it
wrote (`artifacts`), so any number in a report or on the dashboard traces back to the rows
and hashes that produced it. Runs are never updated; a re-audit is a new run linked by
`parent_run_id`.

DuckDB allows one writer per file: a second process gets an IOException while the first
holds it. Writes retry with backoff for up to `LOCK_WAIT` seconds and reads open the file
read-only (also retried), so two audits recording into one store both end recorded and
`mmaudit runs` works while an audit writes. Stores written by schema version 1 gain the
version-2 columns on their first write (ALTER TABLE ... ADD COLUMN IF NOT EXISTS).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from audit.errors import InputError
from audit.schema import DIM_COLUMNS, DIM_DTYPES, METRIC_COLUMNS, ROW_COLUMNS, ROW_DTYPES, summary_metrics_frame

__all__ = ["Store", "default_store_path", "SCHEMA", "LOCK_WAIT"]

LOCK_WAIT = 120.0  # seconds a writer waits for another writer before giving up
_SQL_TYPES = {"string": "VARCHAR", "float64": "DOUBLE", "Int64": "BIGINT"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY, created VARCHAR, run_dir VARCHAR, model_path VARCHAR,
  architecture VARCHAR, model_sha256 VARCHAR, data_path VARCHAR, data_sha256 VARCHAR,
  n_examples INTEGER, seed BIGINT, config JSON, environment JSON, parent_run_id VARCHAR,
  summary JSON
);
CREATE TABLE IF NOT EXISTS metrics (
  run_id VARCHAR, probe VARCHAR, metric VARCHAR, value DOUBLE, ci_low DOUBLE,
  ci_high DOUBLE, grp VARCHAR, n BIGINT
);
CREATE TABLE IF NOT EXISTS findings (run_id VARCHAR, probe VARCHAR, severity VARCHAR, message VARCHAR);
CREATE TABLE IF NOT EXISTS result_rows (
  run_id VARCHAR, probe VARCHAR, metric VARCHAR, value DOUBLE, example_id VARCHAR,
  grp VARCHAR, site VARCHAR, variant VARCHAR
);
CREATE TABLE IF NOT EXISTS artifacts (run_id VARCHAR, probe VARCHAR, name VARCHAR, kind VARCHAR, path VARCHAR);
"""
# Version-2 columns, added to stores created by version 1 on their first write.
_METRIC_V2 = [c for c in DIM_COLUMNS]
_ROW_V2 = [c for c in ROW_COLUMNS if c not in ("probe", "metric", "value", "example_id", "group", "site", "variant")]
MIGRATE = "\n".join(
    [f"ALTER TABLE metrics ADD COLUMN IF NOT EXISTS {c} {_SQL_TYPES[DIM_DTYPES[c]]};" for c in _METRIC_V2]
    + [f"ALTER TABLE result_rows ADD COLUMN IF NOT EXISTS {c} {_SQL_TYPES[ROW_DTYPES[c]]};" for c in _ROW_V2]
    + ["ALTER TABLE runs ADD COLUMN IF NOT EXISTS schema_version INTEGER;"])


def default_store_path() -> Path:
    return Path(os.environ.get("MMAUDIT_STORE") or Path.home() / ".mmaudit" / "store.duckdb")


def _locked(exc: Exception) -> bool:
    msg = str(exc).lower()
    return "lock" in msg or "conflicting" in msg or "being used" in msg


class Store:
    """Thin, append-only access to the DuckDB file; opened per operation."""

    def __init__(self, path: str | Path | None = None, *, lock_wait: float = LOCK_WAIT) -> None:
        self.path = Path(path).expanduser().absolute() if path else default_store_path()
        self.lock_wait = lock_wait

    def _open(self, read_only: bool):
        import duckdb

        if self.path.exists() and not self.path.is_file():
            raise InputError("the store is not a file (expected a DuckDB file)", where=str(self.path))
        deadline = time.monotonic() + self.lock_wait
        delay = 0.05
        while True:
            try:
                if read_only:
                    return duckdb.connect(str(self.path), read_only=True)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                if not _locked(exc) or time.monotonic() > deadline:
                    what = "locked by another process" if _locked(exc) else "unreadable"
                    raise InputError(f"the store is {what} ({' '.join(str(exc).split())[:200]})",
                                     where=str(self.path)) from exc
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
            except duckdb.Error as exc:
                raise InputError(f"not a DuckDB store ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                                 where=str(self.path)) from exc
            except OSError as exc:
                raise InputError(f"cannot open the store ({exc.strerror})", where=str(self.path)) from exc

    @contextlib.contextmanager
    def _connect(self, *, read_only: bool = False) -> Iterator:
        import duckdb

        if read_only and not self.path.exists():
            con = duckdb.connect(":memory:")  # an empty store reads as empty tables
            con.execute(SCHEMA)
            con.execute(MIGRATE)
        else:
            con = self._open(read_only)
            if not read_only:
                con.execute(SCHEMA)
                con.execute(MIGRATE)
        try:
            yield con
        except duckdb.Error as exc:
            raise InputError(f"store operation failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                             where=str(self.path)) from exc
        finally:
            con.close()

    def record_run(self, summary: dict, rows: pd.DataFrame, *, run_dir: str, parent_run_id: str | None = None) -> None:
        """Insert one finished run (summary.json content plus its long-form rows)."""
        run_id = summary["run_id"]
        with self._connect() as con:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchone():
                return  # append-only: a recorded run is never rewritten
            con.execute("BEGIN")
            try:
                con.execute(
                    "INSERT INTO runs (run_id, created, run_dir, model_path, architecture, model_sha256, data_path, "
                    "data_sha256, n_examples, seed, config, environment, parent_run_id, summary, schema_version) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run_id, summary["created"], run_dir, summary["model"]["path"],
                     summary["model"]["architecture"], summary["model"]["sha256"], summary["data"]["path"],
                     summary["data"]["sha256"], summary["data"]["n"], summary["config"].get("seed"),
                     json.dumps(summary["config"]), json.dumps(summary["environment"]), parent_run_id,
                     json.dumps(summary), int(summary.get("schema_version") or 1)],
                )
                metrics = summary_metrics_frame(summary).rename(columns={"group": "grp"})
                metrics.insert(0, "run_id", run_id)
                con.register("m", metrics)
                cols = ", ".join(["run_id"] + [("grp" if c == "group" else c) for c in METRIC_COLUMNS])
                con.execute(f"INSERT INTO metrics ({cols}) SELECT {cols} FROM m")
                findings = pd.DataFrame(summary["findings"], columns=["probe", "severity", "message"])
                findings.insert(0, "run_id", run_id)
                con.register("f", findings)
                con.execute("INSERT INTO findings SELECT * FROM f")
                r = rows.reindex(columns=ROW_COLUMNS).rename(columns={"group": "grp"})
                r.insert(0, "run_id", run_id)
                con.register("r", r)
                cols = ", ".join(["run_id"] + [("grp" if c == "group" else c) for c in ROW_COLUMNS])
                con.execute(f"INSERT INTO result_rows ({cols}) SELECT {cols} FROM r")
                for art in summary.get("artifacts", []):
                    con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
                                [run_id, art.get("probe"), art["name"], art["kind"], art["path"]])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def runs(self) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute(
                "SELECT run_id, created, architecture, model_path, data_path, n_examples, seed, run_dir, parent_run_id "
                "FROM runs ORDER BY created, run_id"
            ).df()

    def metrics(self, run_id: str) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY probe, metric, grp", [run_id]).df()

    def rows(self, run_id: str, *, probe: str | None = None) -> pd.DataFrame:
        sql = "SELECT * FROM result_rows WHERE run_id = ?" + (" AND probe = ?" if probe else "")
        with self._connect(read_only=True) as con:
            return con.execute(sql, [run_id, probe] if probe else [run_id]).df()

    def artifacts(self, run_id: str) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute("SELECT * FROM artifacts WHERE run_id = ? ORDER BY name", [run_id]).df()

    def summary(self, run_id: str) -> dict | None:
        with self._connect(read_only=True) as con:
            row = con.execute("SELECT summary FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return json.loads(row[0]) if row else None
