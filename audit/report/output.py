"""Where a report may be written: never over a run's or a dataset's files.

`check_target` refuses (InputError, exit 2, naming the path):
- always: the run's own inputs (summary.json, results.parquet, run_state.json, units/,
  the artifacts summary.json lists), and any path inside the model or data folder the
  summary records (unless it is also inside the run folder), with or without --force;
- without --force: any existing file that is not a report mmaudit wrote earlier
  (recognised by the marker every format carries), a symlink, or a folder.
"""
from __future__ import annotations

from pathlib import Path

from audit.errors import InputError

__all__ = ["check_target", "is_previous_report", "HTML_MARK", "JSON_MARK", "PDF_TITLE"]

HTML_MARK = b'<meta name="generator" content="mmaudit report">'
JSON_MARK = b'"kind": "mmaudit-report"'
PDF_TITLE = "Audit report: "  # the HTML <title>, which Chromium records as the PDF's /Title
HEAD = 1 << 16
PDF_SCAN = 1 << 20
RUN_INPUTS = ("summary.json", "results.parquet", "run_state.json")
ERR_INPUT = "refusing to write the report over {what}; choose another --out (--force does not override this)"
ERR_FOREIGN = "exists and is not a report mmaudit wrote; refusing to replace it (give --force to replace it anyway)"


def _pdf_marked(path: Path) -> bool:
    title = PDF_TITLE.encode()
    utf16 = ("feff" + PDF_TITLE.encode("utf-16-be").hex()).encode()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        chunks = [fh.read(PDF_SCAN)]
        if size > PDF_SCAN:
            fh.seek(max(size - PDF_SCAN, PDF_SCAN))
            chunks.append(fh.read(PDF_SCAN))
    data = b"".join(chunks)
    return b"(" + title in data or utf16 in data.lower()


def is_previous_report(path: Path) -> bool:
    """Whether `path` is a regular file holding an HTML, JSON or PDF report mmaudit wrote."""
    if path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as fh:
        head = fh.read(HEAD)
    if head.startswith(b"<!DOCTYPE html>"):
        return HTML_MARK in head
    if head.lstrip().startswith(b"{"):
        return JSON_MARK in head
    if head.startswith(b"%PDF-"):
        return _pdf_marked(path)
    return False


def _within(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _folder(p) -> Path | None:
    return Path(p).resolve() if isinstance(p, str) and p and Path(p).is_dir() else None


def check_target(target: Path, *, run_dir: Path, summary: dict, force: bool = False) -> None:
    """Raise InputError when writing the report to `target` could destroy something else."""
    where = str(target)
    full, run = target.resolve(), run_dir.resolve()
    inputs = {run / n for n in RUN_INPUTS}
    inputs |= {(run / a["path"]).resolve() for a in summary.get("artifacts") or []
               if isinstance(a, dict) and isinstance(a.get("path"), str) and a["path"]}
    if full in inputs or _within(full, run / "units"):
        raise InputError(ERR_INPUT.format(what=f"an input of the run {run}"), where=where)
    for kind in ("data", "model"):
        folder = _folder((summary.get(kind) or {}).get("path"))
        if folder is not None and _within(full, folder) and not _within(full, run):
            raise InputError(ERR_INPUT.format(what=f"a file in the {kind} folder {folder} the run recorded"),
                             where=where)
    if target.is_dir() and not target.is_symlink():
        raise InputError("is a folder; give a file path to --out", where=where)
    if (target.exists() or target.is_symlink()) and not force and not is_previous_report(target):
        raise InputError(ERR_FOREIGN, where=where)
