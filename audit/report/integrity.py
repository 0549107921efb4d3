"""SHA-256 manifest of the model, data and run files behind a report, with the date.

The recorded fingerprints (summary.json) are recomputed with the same functions the run
used (`audit.runner.model_fingerprint`, `audit.dataset.Dataset.sha256`), so the manifest
says whether the model or data changed since the audit.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

__all__ = ["file_sha256", "integrity_manifest"]

MAX_FILES = 2000
RUN_FILES = ("summary.json", "results.parquet", "run_state.json")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _entries(kind: str, root: Path, files) -> list[dict]:
    out = []
    for f in files:
        if len(out) >= MAX_FILES:
            break
        if f.is_file() and not f.is_symlink():
            out.append({"kind": kind, "file": f.relative_to(root).as_posix(), "bytes": f.stat().st_size,
                        "sha256": file_sha256(f)})
    return out


def _combined(kind: str, label: str, root: Path, files: list[Path]) -> dict:
    h, size = hashlib.sha256(), 0
    for f in files:
        rel = f.relative_to(root).as_posix()
        digest = file_sha256(f)
        h.update(f"{rel}\0{digest}\n".encode())
        size += f.stat().st_size
    return {"kind": kind, "file": f"{label} ({len(files)} files; sha256 of 'path\\0sha256' lines)",
            "bytes": size, "sha256": h.hexdigest()}


def _recheck_model(path: str | None, recorded: str | None) -> str:
    if not path or not Path(path).is_dir():
        return "model folder not found; recorded fingerprint not re-checked"
    try:
        from audit.runner import model_fingerprint

        now = model_fingerprint(path)
    except Exception as exc:  # noqa: BLE001
        return f"could not re-check ({type(exc).__name__})"
    return "unchanged since the audit" if now == recorded else f"CHANGED since the audit (now {now})"


def _recheck_data(path: str | None, recorded: str | None) -> str:
    if not path or not (Path(path) / "manifest.jsonl").is_file():
        return "data folder not found; recorded fingerprint not re-checked"
    try:
        from audit.dataset import Dataset

        now = Dataset.load(path, on_error="skip").sha256
    except Exception as exc:  # noqa: BLE001 - a changed folder may no longer validate
        return f"could not re-check ({type(exc).__name__}: the data folder changed or is invalid)"
    return "unchanged since the audit" if now == recorded else f"CHANGED since the audit (now {now})"


def integrity_manifest(summary: dict, run_dir: Path) -> dict:
    model, data = summary.get("model") or {}, summary.get("data") or {}
    files: list[dict] = []
    mdir = Path(model["path"]) if isinstance(model.get("path"), str) else None
    if mdir is not None and mdir.is_dir():
        files += _entries("model", mdir, sorted(p for p in mdir.rglob("*") if p.is_file())[:MAX_FILES])
    ddir = Path(data["path"]) if isinstance(data.get("path"), str) else None
    if ddir is not None and ddir.is_dir():
        top = [p for p in sorted(ddir.iterdir()) if p.is_file()]
        files += _entries("data", ddir, top)
        nested = sorted(p for p in ddir.rglob("*") if p.is_file() and p.parent != ddir and not p.is_symlink())
        if nested:
            files.append(_combined("data", "files in sub-folders", ddir, nested))
    files += _entries("run", run_dir, [run_dir / n for n in RUN_FILES])
    units = sorted((run_dir / "units").rglob("*.parquet")) if (run_dir / "units").is_dir() else []
    if units:
        files.append(_combined("run", "units/", run_dir, units))
    return {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_created": summary.get("created"),
        "recorded": {"model_sha256": model.get("sha256"), "data_sha256": data.get("sha256")},
        "model_check": _recheck_model(model.get("path"), model.get("sha256")),
        "data_check": _recheck_data(data.get("path"), data.get("sha256")),
        "files": files,
    }
