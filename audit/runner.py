"""Run probes over a dataset in resumable work units and write RUN_DIR (docs/format.md).

Every probe first `plan`s self-contained units; an executor (`audit.executors`: in this
process, or on a Ray cluster) runs them and hands each result back here, where — and only
here — unit files are written (`RUN_DIR/units/<probe>/<k>.parquet`, atomically). A run
killed at any point and started again with the same command recomputes only the missing
units, under either executor, and ends with the same numbers as an uninterrupted run:
every unit's randomness derives from (seed, probe, unit index), never from time or order.

A unit that raises (not bad input, which stops the run with exit 2) is recorded as a
"fail" finding naming the unit and its error; the other units and probes finish, and the
probe with a failed unit gets no metrics (a partial sample would mislead).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import hashlib
import json
import os
import platform
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from audit import __version__
from audit.adapters.base import ModelAdapter
from audit.dataset import Dataset
from audit.errors import InputError
from audit.executors import LocalExecutor, Task
from audit.schema import METRIC_COLUMNS, ROW_COLUMNS, SCHEMA_VERSION, metric_records, metrics_frame, upgrade_rows
from audit.store import Store
from probes.base import Plan, get_probe

__all__ = ["RunSpec", "RunResult", "run_audit", "unit_seed", "write_atomic", "model_fingerprint", "FAULT_ENV"]

# Fault injection for the resume tests: SIGKILL this process after this many units were written.
FAULT_ENV = "MMAUDIT_TEST_KILL_AFTER_UNITS"


@dataclass
class RunSpec:
    """What `mmaudit run` was asked to do (recorded in summary.json's `config`)."""

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
    model_info: dict = field(default_factory=dict)  # identity, dtype, device map, revision, ...
    log_samples: bool = False
    extra: dict = field(default_factory=dict)

    def config(self) -> dict:
        return {"probes": list(self.probes), "suite": self.suite, "seed": self.seed, "device": self.device,
                "batch_size": self.batch_size, "max_examples": self.max_examples, "log_samples": self.log_samples,
                **self.extra}

    def probe_options(self) -> dict:
        return {"batch_size": self.batch_size}


@dataclass
class RunResult:
    summary: dict
    failed_units: list[str]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_units else 0


def model_fingerprint(model: str) -> str:
    """The identity `summary.json` records for `model`: the Hub commit of a cache snapshot, a
    content fingerprint of a local folder (audit.adapters.source), the URL's hash otherwise."""
    from audit.adapters.source import model_identity, source_of_folder

    if Path(model).is_dir():
        return model_identity(source_of_folder(Path(model)))
    return hashlib.sha256(str(model).encode()).hexdigest()


def unit_seed(seed: int, probe: str, k: int) -> int:
    return int(hashlib.sha256(f"{seed}:{probe}:{k}".encode()).hexdigest()[:8], 16)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write next to `path` and rename over it: a reader sees the old file or the new one.
    A full disk or a read-only folder is the user's to fix: one line, nothing half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise InputError(f"cannot write ({exc.strerror or exc}); completed work is kept", where=str(path)) from exc
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _discard_run(out: Path) -> None:
    """Empty a folder that holds an mmaudit run (and nothing else) for `--force`."""
    ours = {"run_state.json", "summary.json", "results.parquet", "samples.parquet", "units"}
    others = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if not (out / "run_state.json").is_file() or others:
        raise InputError("--force only replaces an mmaudit run folder; this one also holds "
                         f"{', '.join(sorted(others)[:3]) or 'no run_state.json'}", where=str(out))
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _open_run(out: Path, identity: dict, log, *, force: bool = False) -> tuple[str, str]:
    """(run_id, created) of a new run in `out`, or of the unfinished run found there."""
    state_file = out / "run_state.json"
    if out.exists() and not out.is_dir():
        raise InputError("exists and is not a folder", where=str(out))
    if state_file.is_file() and force:
        state = None
        try:
            state = json.loads(state_file.read_text())
        except (ValueError, OSError):
            pass
        if not isinstance(state, dict) or {k: state.get(k) for k in identity} != identity:
            log(f"--force: discarding the run in {out} made with other inputs")
            _discard_run(out)
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
            if not isinstance(state, dict):
                raise ValueError("not an object")
        except (ValueError, OSError):
            state = None  # an unreadable state (a full disk mid-write): start the run again
        if state is not None:
            if {k: state.get(k) for k in identity} != identity:
                changed = [k for k in identity if state.get(k) != identity[k]]
                raise InputError(f"holds a run with another {', '.join(changed)}; choose a new --out, or pass "
                                 "--force to discard that run and start again", where=str(out))
            log(f"resuming run {state['run_id']} in {out}")
            return state["run_id"], state["created"]
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output folder exists and is not an unfinished run of this command", where=str(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the run folder ({exc.strerror or exc})", where=str(out)) from exc
    run_id, created = uuid.uuid4().hex[:12], _now()
    write_atomic(state_file, lambda p: p.write_text(json.dumps({**identity, "run_id": run_id, "created": created},
                                                               indent=1)))
    return run_id, created


def _environment(device: str) -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "mmaudit": __version__, "device": device,
            "platform": platform.platform()}


def _samples_path(unit_path: Path) -> Path:
    return unit_path.with_name(unit_path.stem + ".samples.parquet")


def _read_unit(path: Path) -> pd.DataFrame | None:
    """A finished unit's rows, or None when the file is unreadable (recomputed, not trusted)."""
    try:
        return upgrade_rows(pd.read_parquet(path), SCHEMA_VERSION)
    except Exception:  # noqa: BLE001 - pyarrow raises many types for a truncated file
        return None


def _check_images(plans) -> None:
    """Every image the plans will read opens and decodes its header: a bad file stops the run
    before anything is written, so fixing it and rerunning the same command just works."""
    seen: dict[str, list] = {}
    for _, plan in plans:
        for unit in plan.units:
            group = seen.setdefault(unit.data_root, [])
            group += [e for e in unit.examples if e.image is not None]
    for root, examples in seen.items():
        unique = list({e.image: e for e in examples}.values())
        problems = Dataset.view(root, unique).check_images()
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise InputError(f"{problems[0][1]}{more}")


def run_audit(spec: RunSpec, *, adapter: ModelAdapter, data: Dataset, executor=None, progress: bool = True,
              log=print, pre_findings: list[dict] | None = None, confirm=None, force: bool = False) -> RunResult:
    """Plan, run what is missing, summarise, write RUN_DIR and record the run.

    `confirm(estimate) -> bool` is asked before any unit runs (False stops with nothing lost).
    """
    out = Path(spec.out)
    model_id = spec.model_info.get("identity") or model_fingerprint(spec.model)
    identity = {"model_identity": model_id, "data_sha256": data.sha256, "config": spec.config()}

    findings = list(pre_findings or [])
    plans: list[tuple[object, Plan]] = []
    probe_info: dict[str, dict] = {}
    for name in spec.probes:
        probe = get_probe(name, **spec.probe_options())
        plan = probe.plan(adapter, data, max_examples=spec.max_examples)
        findings += list(plan.findings)
        if plan.skipped:
            findings += [{"probe": name, "severity": "warning", "message": f"skipped: {p}"} for p in plan.skipped]
            probe_info[name] = {"status": "skipped", "examples": 0, "units": 0}
            continue
        if not plan.units:
            if spec.suite is None:  # asked for by name: an empty selection is an error, not a pass
                raise InputError(f"no example in the data fits probe {name!r} ({probe.spec.description})",
                                 where=str(data.path))
            findings.append({"probe": name, "severity": "warning",
                             "message": "skipped: no example in the data fits this probe"})
            probe_info[name] = {"status": "skipped", "examples": 0, "units": 0}
            continue
        probe_info[name] = {"status": "ok", "examples": plan.n_examples, "selected": plan.n_selected,
                            "units": len(plan.units), "declared_forward_passes": round(plan.cost, 1)}
        if plan.n_selected is not None and plan.n_selected > plan.n_examples:
            findings.append({"probe": name, "severity": "info",
                             "message": f"audited {plan.n_examples} of the {plan.n_selected} examples that fit "
                                        f"(--max-examples {spec.max_examples})"})
        plans.append((probe, plan))

    if not plans:
        reasons = "; ".join(f["message"] for f in findings if f["severity"] != "info")
        raise InputError(f"nothing to audit: {reasons or 'no probe found an example'}", where=str(data.path))
    _check_images(plans)
    run_id, created = _open_run(out, identity, log, force=force)

    tasks, done_rows = [], {}
    for probe, plan in plans:
        unit_dir = out / "units" / probe.name
        try:
            unit_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot write ({exc.strerror or exc})", where=str(unit_dir)) from exc
        for unit in plan.units:
            path = unit_dir / f"{unit.index:05d}.parquet"
            rows = _read_unit(path) if path.is_file() else None
            if rows is not None and spec.log_samples and not _samples_path(path).is_file():
                rows = None  # the transcript of this unit is missing: run it again
            if rows is not None:
                done_rows[(probe.name, unit.index)] = rows
            else:
                tasks.append(Task(probe=probe.name, options=spec.probe_options(), unit=unit,
                                  seed=unit_seed(spec.seed, probe.name, unit.index), log_samples=spec.log_samples))
    from audit.estimate import estimate

    est = estimate(adapter, tasks, batch_size=spec.batch_size)
    log(f"plan: {len(plans)} probe(s), {sum(p.n_examples for _, p in plans)} example-probes, "
        f"{len(tasks)} of {sum(len(p.units) for _, p in plans)} units to run: {est.text}")
    if confirm is not None and not confirm(est):
        raise KeyboardInterrupt

    failed: list[str] = []
    answers: dict[str, tuple[int, int]] = {}  # generate mode: probe -> (answers read, not parsed)
    kill_after = int(os.environ.get(FAULT_ENV, "0") or 0)
    written = {"n": 0}

    def on_result(task: Task, rows: pd.DataFrame | None, error: BaseException | None) -> None:
        name, k = task.probe, task.unit.index
        if error is not None:
            if isinstance(error, InputError):
                raise error
            msg = " ".join(f"{type(error).__name__}: {error}".split())[:500]
            failed.append(f"{name} unit {k}")
            findings.append({"probe": name, "severity": "fail",
                             "message": f"unit {k} ({len(task.unit.examples)} examples, first "
                                        f"{task.unit.ids[0]!r}) failed: {msg}; the probe has no metrics"})
            probe_info[name]["status"] = "failed"
            return
        samples = rows.attrs.pop("samples", None)  # parquet would try to store attrs as JSON
        read, unparsed = rows.attrs.pop("answers", (0, 0))
        answers[name] = tuple(a + b for a, b in zip(answers.get(name, (0, 0)), (read, unparsed)))
        rows = rows.reindex(columns=ROW_COLUMNS)
        path = out / "units" / name / f"{k:05d}.parquet"
        if samples is not None:  # the transcript first: a unit file means its transcript exists
            write_atomic(_samples_path(path), lambda p: samples.to_parquet(p, index=False))
        write_atomic(path, lambda p: rows.to_parquet(p, index=False))
        done_rows[(name, k)] = rows
        written["n"] += 1
        if kill_after and written["n"] >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    executor = executor or LocalExecutor(adapter)
    t0 = time.perf_counter()
    executor.run(tasks, on_result=on_result, progress=progress)
    elapsed = time.perf_counter() - t0

    for name, (read, unparsed) in answers.items():
        if unparsed:
            findings.append({"probe": name, "severity": "warning" if unparsed > 0.05 * read else "info",
                             "message": f"{unparsed} of {read} generated answers matched no choice (POPE / VLMEvalKit "
                                        "parsing rules) and were scored as ties"})
    for note in adapter.capabilities.notes:
        if note.startswith(("approximate", "generate mode")):
            findings.append({"probe": "run", "severity": "warning" if note.startswith("approximate") else "info",
                             "message": note})

    all_rows, all_metrics = [], []
    for probe, plan in plans:
        if probe_info[probe.name]["status"] == "failed":
            continue
        frames = [done_rows[(probe.name, u.index)] for u in plan.units]
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)
        metrics = metrics_frame(probe.summarize(rows, seed=spec.seed).to_dict(orient="records"))
        findings += probe.findings(metrics)
        all_rows.append(rows)
        all_metrics.append(metrics)

    rows = pd.concat(all_rows, ignore_index=True) if all_rows else pd.DataFrame(columns=ROW_COLUMNS)
    metrics = pd.concat(all_metrics, ignore_index=True) if all_metrics else pd.DataFrame(columns=METRIC_COLUMNS)
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "created": created,
        "model": {"path": str(spec.model), "architecture": adapter.architecture, "sha256": model_id,
                  **spec.model_info},
        "data": {"path": str(data.path), "sha256": data.sha256, "n": len(data)},
        "config": spec.config(),
        "environment": _environment(adapter.device),
        "probes": probe_info,
        "metrics": metric_records(metrics),
        "findings": findings,
        "timing": {"audit_seconds": round(elapsed, 2), "units_run": len(tasks)},
    }
    if spec.parent_run_id:
        summary["parent_run_id"] = spec.parent_run_id
    artifacts = [{"probe": None, "name": "results.parquet", "kind": "rows", "path": "results.parquet"},
                 {"probe": None, "name": "summary.json", "kind": "summary", "path": "summary.json"}]
    summary["artifacts"] = artifacts
    if spec.log_samples:
        parts = [pd.read_parquet(_samples_path(out / "units" / p.name / f"{u.index:05d}.parquet"))
                 for p, plan in plans if probe_info[p.name]["status"] == "ok" for u in plan.units]
        from audit.samples import SAMPLE_COLUMNS

        samples = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SAMPLE_COLUMNS)
        write_atomic(out / "samples.parquet", lambda p: samples.to_parquet(p, index=False))
        artifacts.append({"probe": None, "name": "samples.parquet", "kind": "samples", "path": "samples.parquet"})
    write_atomic(out / "results.parquet", lambda p: rows.to_parquet(p, index=False))
    write_atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1, allow_nan=False)))
    Store(spec.store).record_run(summary, rows, run_dir=str(out.resolve()), parent_run_id=spec.parent_run_id)
    return RunResult(summary=summary, failed_units=failed)
