"""Run probes over a dataset in resumable work units and write RUN_DIR as CONTRACT.md says.

RUN_DIR/units/<probe>/<k>.parquet holds each finished unit (written atomically), so a run
killed at any point and started again with the same command recomputes only the units
that are missing, and ends with the same numbers as an uninterrupted run (every unit's
randomness derives from (seed, probe, unit index), never from wall-clock or order).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from audit import __version__
from audit.adapters.base import ModelAdapter
from audit.dataset import Dataset
from audit.errors import InputError
from audit.store import Store
from probes.base import METRIC_COLUMNS, ROW_COLUMNS, SUITES, available, get_probe

__all__ = ["RunSpec", "resolve_probes", "run_audit", "model_fingerprint"]

SCHEMA_VERSION = 1


@dataclass
class RunSpec:
    model: str
    data: str
    probes: list[str]
    out: str
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 16
    max_examples: int | None = None
    suite: str | None = None
    store: str | None = None
    parent_run_id: str | None = None
    extra: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {"probes": self.probes, "suite": self.suite, "seed": self.seed, "device": self.device,
                "batch_size": self.batch_size, "max_examples": self.max_examples, **self.extra}


def resolve_probes(*, suite: str | None, probes: str | None) -> tuple[list[str], list[str]]:
    """(probe names to run, names of the suite not available in this version)."""
    registry = available()
    if probes:
        names = [p.strip() for p in probes.split(",") if p.strip()]
        unknown = [p for p in names if p not in registry]
        if unknown:
            raise InputError(f"unknown probe(s) {', '.join(unknown)}; available: {', '.join(sorted(registry))}",
                             where="--probes")
        return names, []
    names = list(SUITES[suite or "standard"])
    return [p for p in names if p in registry], [p for p in names if p not in registry]


def model_fingerprint(model: str) -> str:
    """SHA-256 over config and weight files of a model folder (the URL for an endpoint)."""
    path = Path(model)
    if not path.is_dir():
        return hashlib.sha256(model.encode()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors", ".jinja")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _git_revision(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _environment(device: str, model: str) -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mmaudit": __version__, "device": device,
            "platform": platform.platform(), "model_git_revision": _git_revision(model) if Path(model).is_dir() else None}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _unit_seed(seed: int, probe: str, k: int) -> int:
    return int(hashlib.sha256(f"{seed}:{probe}:{k}".encode()).hexdigest()[:8], 16)


def run_audit(spec: RunSpec, *, adapter: ModelAdapter, data: Dataset, skipped_names: list[str] = (),
              progress: bool = True, log=print) -> dict:
    out = Path(spec.out)
    model_sha = model_fingerprint(spec.model)
    identity = {"model_sha256": model_sha, "data_sha256": data.sha256, "config": spec.config()}
    state_file = out / "run_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if {k: state.get(k) for k in identity} != identity:
            raise InputError("holds a run with another model, data or configuration; choose a new --out", where=str(out))
        run_id, created = state["run_id"], state["created"]
        log(f"resuming run {run_id} in {out}")
    else:
        if out.exists() and any(out.iterdir()):
            raise InputError("output folder exists and is not an unfinished run of this command", where=str(out))
        out.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        state_file.write_text(json.dumps({**identity, "run_id": run_id, "created": created}, indent=1))

    findings = [{"probe": n, "severity": "info", "message": f"{n} is part of the suite but not available in mmaudit {__version__}"}
                for n in skipped_names]
    plans = []
    for name in spec.probes:
        probe = get_probe(name)
        problems = probe.check(adapter)
        if problems:
            findings += [{"probe": name, "severity": "warning", "message": f"skipped: {p}"} for p in problems]
            continue
        subset = probe.select(data)
        if spec.max_examples:
            subset = subset[: spec.max_examples]
        if len(subset) == 0:
            findings.append({"probe": name, "severity": "warning", "message": "skipped: no example in the data fits this probe"})
            continue
        ids = [e.id for e in subset]
        units = [ids[i:i + probe.unit_size] for i in range(0, len(ids), probe.unit_size)]
        plans.append((probe, subset, units))

    passes = sum(p.info.cost_per_example * len(s) for p, s, _ in plans)
    log(f"plan: {len(plans)} probe(s), {sum(len(s) for _, s, _ in plans)} example-probes, "
        f"~{passes:.0f} forward passes on {spec.device}{_time_estimate(adapter, data, passes)}")

    all_rows, all_metrics = [], []
    total_units = sum(len(u) for _, _, u in plans)
    bar = tqdm(total=total_units, desc="audit", unit="unit", disable=not progress, mininterval=1.0)
    for probe, subset, units in plans:
        name = probe.info.name
        unit_dir = out / "units" / name
        unit_dir.mkdir(parents=True, exist_ok=True)
        frames = []
        for k, ids in enumerate(units):
            path = unit_dir / f"{k:05d}.parquet"
            if not path.is_file():
                chunk = subset.select(predicate=lambda e, keep=frozenset(ids): e.id in keep)
                rows = probe.run(adapter, chunk, seed=_unit_seed(spec.seed, name, k))
                rows = rows.reindex(columns=ROW_COLUMNS)
                _write_atomic(path, lambda p, r=rows: r.to_parquet(p, index=False))
            frames.append(pd.read_parquet(path))
            bar.update(1)
        rows = pd.concat(frames, ignore_index=True)
        metrics = probe.summarize(rows, seed=spec.seed).reindex(columns=METRIC_COLUMNS)
        findings += getattr(probe, "findings", lambda m: [])(metrics)
        all_rows.append(rows)
        all_metrics.append(metrics)
    bar.close()

    rows = pd.concat(all_rows, ignore_index=True) if all_rows else pd.DataFrame(columns=ROW_COLUMNS)
    metrics = pd.concat(all_metrics, ignore_index=True) if all_metrics else pd.DataFrame(columns=METRIC_COLUMNS)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": created,
        "model": {"path": str(spec.model), "architecture": adapter.architecture, "sha256": model_sha},
        "data": {"path": str(data.path), "sha256": data.sha256, "n": len(data)},
        "config": spec.config(),
        "environment": _environment(adapter.device, spec.model),
        "metrics": [_clean(m) for m in metrics.to_dict(orient="records")],
        "findings": findings,
    }
    if spec.parent_run_id:
        summary["parent_run_id"] = spec.parent_run_id
    _write_atomic(out / "results.parquet", lambda p: rows.to_parquet(p, index=False))
    _write_atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1, allow_nan=False)))
    Store(spec.store).record_run(summary, rows, run_dir=str(out.resolve()), parent_run_id=spec.parent_run_id)
    return summary


def _clean(m: dict) -> dict:
    """JSON-safe metric row: NaN becomes null, numpy scalars become Python numbers."""
    out = {}
    for k, v in m.items():
        if v is None or (isinstance(v, float) and v != v):
            out[k] = None
        elif k == "n":
            out[k] = int(v)
        elif isinstance(v, (int, float)) or hasattr(v, "item"):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def _time_estimate(adapter: ModelAdapter, data: Dataset, passes: float) -> str:
    """Rough wall time from one timed scoring call on the first example."""
    from audit.adapters.base import Query

    e = next((e for e in data if e.image and (e.choices or e.answer)), None)
    if e is None or passes == 0:
        return ""
    q = Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,)))
    adapter.score([q])  # warm-up
    t0 = time.perf_counter()
    adapter.score([q] * 8, batch_size=8)
    per = (time.perf_counter() - t0) / 8
    return f" (about {per * passes:.0f} s unbatched; batching usually beats this)"
