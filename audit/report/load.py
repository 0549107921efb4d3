"""Everything one report reads: RUN_DIR (summary.json, results.parquet), the parent or
baseline run, the policy, and the model/data folders the summary records when they exist.

Metrics and rows of any schema version are read through `audit.schema` (typed v2 frames),
so no other module of the report parses `group`, `site` or `variant` strings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from audit.errors import InputError
from audit.gate import Policy, load_policy, load_summary
from audit.report.meta import specs
from audit.schema import ROW_COLUMNS, rows_frame, summary_metrics_frame, upgrade_rows

__all__ = ["RunBundle", "load_bundle", "MAX_JSON_BYTES"]

MAX_JSON_BYTES = 8 * 2**20  # config.json / defense.json / datacard.json larger than this are not read


def read_small_json(path: Path) -> dict | None:
    """A JSON object from a regular file of at most MAX_JSON_BYTES, or None."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_JSON_BYTES:
            return None
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return obj if isinstance(obj, dict) else None


def _folder(p) -> Path | None:
    return Path(p) if isinstance(p, str) and p and Path(p).is_dir() else None


@dataclass
class RunBundle:
    run_dir: Path
    summary: dict
    rows: pd.DataFrame                  # typed v2 rows (audit.schema.ROW_COLUMNS)
    metrics: pd.DataFrame               # typed v2 metric frame
    parent: dict | None = None          # summary of the run this one is compared to
    parent_source: str | None = None    # how the parent was found
    policy: Policy | None = None
    policy_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    _manifest: dict | None = None

    @property
    def run_id(self) -> str:
        return str(self.summary.get("run_id"))

    @property
    def version(self) -> int:
        return int(self.summary.get("schema_version") or 1)

    @property
    def data_dir(self) -> Path | None:
        return _folder((self.summary.get("data") or {}).get("path"))

    @property
    def model_dir(self) -> Path | None:
        return _folder((self.summary.get("model") or {}).get("path"))

    @property
    def parent_metrics(self) -> pd.DataFrame | None:
        return summary_metrics_frame(self.parent) if self.parent is not None else None

    def manifest(self) -> dict[str, dict]:
        if self._manifest is None:
            from audit.report.assets import read_manifest

            self._manifest = read_manifest(self.data_dir)
        return self._manifest

    def ran(self) -> set[str]:
        """Probes with metrics or rows in this run."""
        return set(self.metrics.probe.dropna()) | set(self.rows.probe.dropna())

    def requested_probes(self) -> list[str]:
        probes = (self.summary.get("config") or {}).get("probes") or []
        return [p for p in probes if isinstance(p, str)]

    def skipped(self) -> dict[str, list[str]]:
        """probe -> why it produced nothing (the run's probe status and its findings)."""
        out: dict[str, list[str]] = {}
        for name, info in (self.summary.get("probes") or {}).items():
            if isinstance(info, dict) and info.get("status") not in (None, "ok"):
                out.setdefault(str(name), []).append(f"status {info.get('status')}")
        for f in self.summary.get("findings") or []:
            msg = str(f.get("message", ""))
            if msg.startswith("skipped") or "not available" in msg or "failed" in msg:
                out.setdefault(str(f.get("probe")), []).append(msg)
        return out

    def model_json(self, name: str) -> dict | None:
        """config.json or defense.json of the audited model folder (small regular files only)."""
        d = self.model_dir
        return read_small_json(d / name) if d is not None else None

    def findings(self, probes) -> list[dict]:
        probes = set(probes)
        return [f for f in self.summary.get("findings") or [] if isinstance(f, dict) and f.get("probe") in probes]


def _rows(run_dir: Path, version: int) -> tuple[pd.DataFrame, list[str]]:
    f = run_dir / "results.parquet"
    if not f.is_file():
        return rows_frame([]), ["results.parquet is missing: sections that need per-example rows (heatmaps, "
                                "counterfactual sets) are left out"]
    try:
        raw = pd.read_parquet(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise InputError(f"unreadable results.parquet ({type(exc).__name__})", where=str(f)) from exc
    return upgrade_rows(raw.reindex(columns=[c for c in raw.columns if c in ROW_COLUMNS]), version), []


def _find_parent(summary: dict, *, store: str | Path | None, baseline: str | Path | None):
    if baseline:
        return load_summary(baseline, where=f"--baseline {baseline}"), f"--baseline {baseline}"
    pid = summary.get("parent_run_id")
    if not pid:
        return None, None
    from audit.store import Store, default_store_path

    path = Path(store) if store else default_store_path()
    if not path.is_file():
        return None, f"parent run {pid} is not in a store here (give --store DB_PATH or --baseline RUN_DIR)"
    try:
        parent = Store(path).summary(str(pid))
    except Exception as exc:  # noqa: BLE001 - a locked or foreign file: report without the parent
        return None, f"could not read the store {path} ({type(exc).__name__})"
    if parent is None:
        return None, f"parent run {pid} is not in the store {path}"
    return parent, f"parent run {pid} from the store {path}"


def load_bundle(run_dir: str | Path, *, store: str | Path | None = None, baseline: str | Path | None = None,
                policy: str | Path | None = None) -> RunBundle:
    run_dir = Path(run_dir)
    if store is not None and Path(store).exists() and not Path(store).is_file():
        raise InputError("not a DuckDB store file", where=str(store))
    summary = load_summary(run_dir)
    specs(plugins=True)  # installed plugin probes register their catalog specs (their report sections)
    version = int(summary.get("schema_version") or 1)
    rows, notes = _rows(run_dir, version)
    parent, source = _find_parent(summary, store=store, baseline=baseline)
    pol = load_policy(policy) if policy else None
    return RunBundle(run_dir=run_dir, summary=summary, rows=rows, metrics=summary_metrics_frame(summary),
                     parent=parent, parent_source=source, policy=pol, policy_path=Path(policy) if policy else None,
                     notes=notes)
