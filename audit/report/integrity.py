"""SHA-256 manifest of the model, data and run files behind a report, with the date.

Only files the audit itself wrote or read are listed, and every path is confined:
- run folder: summary.json, results.parquet, run_state.json, units/*.parquet and the
  `artifacts` summary.json names (relative paths that stay inside the run folder);
- data folder: manifest.jsonl and the images it names (resolved inside the folder by
  `assets.resolve_image`), never a directory listing;
- model folder: only when it holds a config.json, its top-level model files (weights,
  configs, tokenizer and chat-template files).
A path in summary.json that points at /etc therefore lists nothing. Hashes are streamed,
and a file over the per-file cap (or beyond the total budget) is skipped with a note, so a
huge or sparse file cannot stall the report. The recorded fingerprints are re-checked
with the functions the run used (`audit.dataset.Dataset.sha256`, the runner's
`model_fingerprint`), only when the files they read fit the same budget.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from audit.report.assets import MAX_MANIFEST_BYTES, UnsafePath, read_manifest, resolve_image

__all__ = ["file_sha256", "integrity_manifest", "HashBudget", "MAX_FILE_BYTES", "MAX_TOTAL_BYTES", "MAX_FILES"]

MAX_FILES = 2000
MAX_FILE_BYTES = 2 * 2**30    # one file larger than this is not hashed
MAX_TOTAL_BYTES = 16 * 2**30  # nor anything once this much was hashed
RUN_FILES = ("summary.json", "results.parquet", "run_state.json")
MODEL_SUFFIXES = (".json", ".safetensors", ".jinja", ".txt", ".model")
BLOCK = 1 << 20


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class HashBudget:
    """Per-file cap and total budget of bytes hashed for one report."""

    max_file: int = MAX_FILE_BYTES
    max_total: int = MAX_TOTAL_BYTES
    used: int = 0
    skipped: list[str] = field(default_factory=list)

    def refuse(self, size: int) -> str | None:
        """Why a file of `size` bytes is not hashed, or None."""
        if size > self.max_file:
            return f"{_gib(size)}, over the {_gib(self.max_file)} per-file cap"
        if self.used + size > self.max_total:
            return f"the report's hashing budget of {_gib(self.max_total)} is spent"
        return None


def file_sha256(path: Path, *, limit: int | None = None) -> str | None:
    """Streamed SHA-256 of a file; None when it holds more than `limit` bytes."""
    h, seen = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            seen += len(block)
            if limit is not None and seen > limit:
                return None  # it grew past its size at stat time
            h.update(block)
    return h.hexdigest()


def _regular(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _entry(kind: str, root: Path, f: Path, budget: HashBudget) -> dict:
    size = f.stat().st_size
    rel = f.relative_to(root).as_posix()
    why = budget.refuse(size)
    digest = None if why else file_sha256(f, limit=size)
    if digest is None and why is None:
        why = "the file changed while it was read"
    if why:
        budget.skipped.append(f"{kind} {rel}: not hashed ({why})")
    else:
        budget.used += size
    return {"kind": kind, "file": rel, "bytes": size, "sha256": digest, "note": f"not hashed: {why}" if why else None}


def _combined(kind: str, label: str, root: Path, files: list[Path], budget: HashBudget) -> dict:
    h, size, done = hashlib.sha256(), 0, 0
    for f in files:
        entry = _entry(kind, root, f, budget)
        if entry["sha256"] is not None:
            h.update(f"{entry['file']}\0{entry['sha256']}\n".encode())
            size += entry["bytes"]
            done += 1
    note = None if done == len(files) else f"{len(files) - done} of {len(files)} not hashed (see the notes)"
    return {"kind": kind, "file": f"{label} ({done} files; sha256 of 'path\\0sha256' lines)", "bytes": size,
            "sha256": h.hexdigest() if done else None, "note": note}


def _inside(root: Path, rel) -> Path | None:
    """`root/rel` when rel is a relative path that stays inside root (symlinks resolved)."""
    if not isinstance(rel, str) or not rel or "\x00" in rel or PurePosixPath(rel).is_absolute() or "\\" in rel:
        return None
    parts = PurePosixPath(rel).parts
    if ".." in parts:
        return None
    full = root.joinpath(*parts)
    try:
        if not full.resolve().is_relative_to(root.resolve()):
            return None
    except OSError:
        return None
    return full


def _run_files(run_dir: Path, summary: dict, budget: HashBudget) -> list[dict]:
    names = list(RUN_FILES) + [a.get("path") for a in summary.get("artifacts") or [] if isinstance(a, dict)]
    files, seen = [], set()
    for name in names:
        f = _inside(run_dir, name)
        if f is not None and _regular(f) and f.resolve() not in seen:
            seen.add(f.resolve())
            files.append(f)
    out = [_entry("run", run_dir, f, budget) for f in files[:MAX_FILES]]
    units_dir = run_dir / "units"
    if units_dir.is_dir() and not units_dir.is_symlink():
        units = sorted(p for p in units_dir.rglob("*.parquet") if _regular(p))[:MAX_FILES]
        if units:
            out.append(_combined("run", "units/", run_dir, units, budget))
    return out


def _manifest_images(ddir: Path, manifest: dict[str, dict]) -> tuple[list[Path], int]:
    """Image files the manifest names inside the data folder, and how many it names that were refused."""
    paths, refused = set(), 0
    for rec in manifest.values():
        rel = rec.get("image")
        if rel is None:
            continue
        try:
            full = resolve_image(ddir, rel)
        except UnsafePath:
            refused += 1
            continue
        paths.add(full)
    return sorted(paths), refused


def _model_files(mdir: Path) -> list[Path]:
    if not _regular(mdir / "config.json"):
        return []  # not a model folder: list nothing
    return sorted(p for p in mdir.iterdir() if p.suffix in MODEL_SUFFIXES and _regular(p))[:MAX_FILES]


def _fits(files: list[Path], budget: HashBudget) -> str | None:
    sizes = [f.stat().st_size for f in files]
    big = next((f for f, s in zip(files, sizes) if s > budget.max_file), None)
    if big is not None:
        return f"{big.name} is {_gib(big.stat().st_size)}, over the {_gib(budget.max_file)} per-file cap"
    if sum(sizes) > budget.max_total:
        return f"its files hold {_gib(sum(sizes))}, over the report's budget of {_gib(budget.max_total)}"
    return None


def _recheck_model(mdir: Path | None, recorded: str | None, files: list[Path], budget: HashBudget) -> str:
    if mdir is None or not files:
        return "model folder not found; recorded fingerprint not re-checked"
    import audit.runner as runner  # torch-free at import time

    fingerprint = getattr(runner, "model_fingerprint", None)
    if fingerprint is None:
        return "this version of mmaudit records no content fingerprint of the model; not re-checked"
    too_big = _fits(files, budget)
    if too_big:
        return f"not re-checked: {too_big}"
    try:
        now = fingerprint(str(mdir))
    except Exception as exc:  # noqa: BLE001
        return f"could not re-check ({type(exc).__name__})"
    return "unchanged since the audit" if now == recorded else f"CHANGED since the audit (now {now})"


def _recheck_data(ddir: Path | None, recorded: str | None, files: list[Path], budget: HashBudget) -> str:
    if ddir is None or not files:
        return "data folder not found; recorded fingerprint not re-checked"
    too_big = _fits(files, budget)
    if too_big:
        return f"not re-checked: {too_big}"
    try:
        from audit.dataset import Dataset

        now = Dataset.load(ddir, on_error="skip").sha256
    except Exception as exc:  # noqa: BLE001 - a changed folder may no longer validate
        return f"could not re-check ({type(exc).__name__}: the data folder changed or is invalid)"
    return "unchanged since the audit" if now == recorded else f"CHANGED since the audit (now {now})"


def integrity_manifest(summary: dict, run_dir: Path, *, data_dir: Path | None, model_dir: Path | None,
                       budget: HashBudget | None = None) -> dict:
    """The manifest of files behind the report; `data_dir`/`model_dir` are the folders the
    summary records, already checked to be directories (None otherwise)."""
    budget = budget or HashBudget()
    model, data = summary.get("model") or {}, summary.get("data") or {}
    files: list[dict] = []
    model_files = _model_files(model_dir) if model_dir is not None else []
    files += [_entry("model", model_dir, f, budget) for f in model_files]
    data_files: list[Path] = []
    if data_dir is not None and _regular(data_dir / "manifest.jsonl") \
            and (data_dir / "manifest.jsonl").stat().st_size > MAX_MANIFEST_BYTES:
        budget.skipped.append(f"data manifest.jsonl: not read (over {_gib(MAX_MANIFEST_BYTES)})")
    elif data_dir is not None and _regular(data_dir / "manifest.jsonl"):
        manifest = read_manifest(data_dir)
        images, refused = _manifest_images(data_dir, manifest)
        files.append(_entry("data", data_dir, data_dir / "manifest.jsonl", budget))
        if images:
            files.append(_combined("data", "images named by manifest.jsonl", data_dir, images, budget))
        if refused:
            budget.skipped.append(f"data: {refused} image path(s) in manifest.jsonl missing or outside the folder")
        data_files = [data_dir / "manifest.jsonl", *images]
    files += _run_files(run_dir, summary, budget)
    return {
        "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_created": summary.get("created"),
        "recorded": {"model_sha256": model.get("sha256"), "data_sha256": data.get("sha256")},
        "model_check": _recheck_model(model_dir, model.get("sha256"), model_files, budget),
        "data_check": _recheck_data(data_dir, data.get("sha256"), data_files, budget),
        "files": files,
        "skipped": list(budget.skipped),
    }
