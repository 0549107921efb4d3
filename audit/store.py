"""Append-only result store in an embedded DuckDB file.

Every run records its provenance (model and data SHA-256, config, seed, versions, device,
git revision) next to its metrics and the long-form rows behind them, so any number in a
report or on the dashboard traces back to the rows and hashes that produced it. Runs are
never updated after they are finished; a re-audit is a new run linked by `parent_run_id`.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

__all__ = ["Store", "default_store_path"]

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
ROW_COLUMNS = ["probe", "metric", "value", "example_id", "group", "site", "variant"]


def default_store_path() -> Path:
    return Path(os.environ.get("MMAUDIT_STORE", Path.home() / ".mmaudit" / "store.duckdb"))


class Store:
    """Thin, append-only access to the DuckDB file; opened per operation (one writer at a time)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_store_path()

    @contextlib.contextmanager
    def _connect(self, *, read_only: bool = False) -> Iterator:
        import duckdb

        if read_only and not self.path.exists():
            con = duckdb.connect(":memory:")  # an empty store reads as empty tables
            con.execute(SCHEMA)
        elif read_only:
            con = duckdb.connect(str(self.path), read_only=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(self.path))
            con.execute(SCHEMA)
        try:
            yield con
        finally:
            con.close()

    def record_run(self, summary: dict, rows: pd.DataFrame, *, run_dir: str, parent_run_id: str | None = None) -> None:
        """Insert one finished run (summary.json content plus its long-form rows)."""
        with self._connect() as con:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [summary["run_id"]]).fetchone():
                return  # append-only: a recorded run is never rewritten
            con.execute("BEGIN")
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [summary["run_id"], summary["created"], run_dir, summary["model"]["path"],
                 summary["model"]["architecture"], summary["model"]["sha256"], summary["data"]["path"],
                 summary["data"]["sha256"], summary["data"]["n"], summary["config"].get("seed"),
                 json.dumps(summary["config"]), json.dumps(summary["environment"]), parent_run_id,
                 json.dumps(summary)],
            )
            metrics = pd.DataFrame(summary["metrics"], columns=["probe", "metric", "value", "ci_low", "ci_high", "group", "n"])
            metrics.insert(0, "run_id", summary["run_id"])
            con.register("m", metrics)
            con.execute("INSERT INTO metrics SELECT run_id, probe, metric, value, ci_low, ci_high, \"group\", n FROM m")
            findings = pd.DataFrame(summary["findings"], columns=["probe", "severity", "message"])
            findings.insert(0, "run_id", summary["run_id"])
            con.register("f", findings)
            con.execute("INSERT INTO findings SELECT * FROM f")
            r = rows.reindex(columns=ROW_COLUMNS).copy()
            r.insert(0, "run_id", summary["run_id"])
            r = r.astype({c: "string" for c in ["example_id", "group", "site", "variant"]})
            con.register("r", r)
            con.execute("INSERT INTO result_rows SELECT run_id, probe, metric, value, example_id, \"group\", site, variant FROM r")
            for art in summary.get("artifacts", []):
                con.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
                            [summary["run_id"], art["probe"], art["name"], art["kind"], art["path"]])
            con.execute("COMMIT")

    def runs(self) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute(
                "SELECT run_id, created, architecture, model_path, data_path, n_examples, seed, run_dir, parent_run_id "
                "FROM runs ORDER BY created"
            ).df()

    def metrics(self, run_id: str) -> pd.DataFrame:
        with self._connect(read_only=True) as con:
            return con.execute("SELECT * FROM metrics WHERE run_id = ? ORDER BY probe, metric, grp", [run_id]).df()

    def rows(self, run_id: str, *, probe: str | None = None) -> pd.DataFrame:
        sql = "SELECT * FROM result_rows WHERE run_id = ?" + (" AND probe = ?" if probe else "")
        with self._connect(read_only=True) as con:
            return con.execute(sql, [run_id, probe] if probe else [run_id]).df()

    def summary(self, run_id: str) -> dict | None:
        with self._connect(read_only=True) as con:
            row = con.execute("SELECT summary FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return json.loads(row[0]) if row else None
