"""Everything one report reads: RUN_DIR (summary.json, results.parquet), the parent or
baseline run, the policy, probe metadata and the model/data folders when they still exist."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from audit.errors import InputError
from audit.gate import Policy, load_policy, load_summary

__all__ = ["RunBundle", "load_bundle", "probe_infos", "ROW_COLUMNS", "METRIC_COLUMNS"]

ROW_COLUMNS = ["probe", "metric", "value", "example_id", "group", "site", "variant"]
METRIC_COLUMNS = ["probe", "metric", "value", "ci_low", "ci_high", "group", "n"]


@dataclass
class RunBundle:
    run_dir: Path
    summary: dict
    rows: pd.DataFrame
    metrics: pd.DataFrame
    infos: dict[str, dict]
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
    def data_dir(self) -> Path | None:
        p = (self.summary.get("data") or {}).get("path")
        return Path(p) if isinstance(p, str) and Path(p).is_dir() else None

    @property
    def model_dir(self) -> Path | None:
        p = (self.summary.get("model") or {}).get("path")
        return Path(p) if isinstance(p, str) and Path(p).is_dir() else None

    def manifest(self) -> dict[str, dict]:
        if self._manifest is None:
            from audit.report.assets import read_manifest

            self._manifest = read_manifest(self.data_dir)
        return self._manifest

    def probes_with_metrics(self) -> set[str]:
        return set(self.metrics.probe.dropna().unique()) | set(self.rows.probe.dropna().unique())

    def requested_probes(self) -> list[str]:
        probes = (self.summary.get("config") or {}).get("probes") or []
        return [p for p in probes if isinstance(p, str)]

    def skipped(self) -> dict[str, list[str]]:
        """probe -> messages of findings saying it was skipped or unavailable."""
        out: dict[str, list[str]] = {}
        for f in self.summary.get("findings") or []:
            msg = str(f.get("message", ""))
            if msg.startswith("skipped") or "not available" in msg:
                out.setdefault(str(f.get("probe")), []).append(msg)
        return out

    def model_json(self, name: str) -> dict | None:
        d = self.model_dir
        if d is None or not (d / name).is_file():
            return None
        try:
            obj = json.loads((d / name).read_text(encoding="utf-8"))
        except (ValueError, OSError):
            return None
        return obj if isinstance(obj, dict) else None


def probe_infos() -> dict[str, dict]:
    """ProbeInfo of every registered probe, as plain dicts ({} when probes cannot load)."""
    try:
        from probes.base import available

        registry = available()
    except Exception:  # noqa: BLE001 - a broken optional dependency must not kill the report
        return {}
    out = {}
    for name, cls in registry.items():
        info = cls.info
        out[name] = {"name": info.name, "category": info.category, "description": info.description,
                     "citation": info.citation, "cost_per_example": info.cost_per_example,
                     "needs_white_box": info.needs_white_box, "metrics": list(info.metrics)}
    return out


def _metrics_frame(summary: dict) -> pd.DataFrame:
    df = pd.DataFrame(summary.get("metrics") or [], columns=METRIC_COLUMNS)
    for c in ("value", "ci_low", "ci_high"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _rows(run_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    f = run_dir / "results.parquet"
    if not f.is_file():
        return pd.DataFrame(columns=ROW_COLUMNS), ["results.parquet is missing: sections that need per-example "
                                                   "rows (heatmaps, counterfactual pairs) are left out"]
    try:
        rows = pd.read_parquet(f)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise InputError(f"unreadable results.parquet ({type(exc).__name__})", where=str(f)) from exc
    return rows.reindex(columns=ROW_COLUMNS), []


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
    rows, notes = _rows(run_dir)
    parent, source = _find_parent(summary, store=store, baseline=baseline)
    pol = load_policy(policy) if policy else None
    return RunBundle(run_dir=run_dir, summary=summary, rows=rows, metrics=_metrics_frame(summary),
                     infos=probe_infos(), parent=parent, parent_source=source, policy=pol,
                     policy_path=Path(policy) if policy else None, notes=notes)
