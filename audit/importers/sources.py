"""Source files: streamed content hashes and paths that cannot leave their folder.

Every path a source names (an image file, a CSV's file column, a VLMEvalKit `image_path`)
is resolved inside one declared folder; absolute paths outside it, `..` and symlinks that
lead out are refused, and URLs are never fetched.
"""
from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from audit.errors import InputError

__all__ = ["sha256_file", "hash_source", "safe_path", "hidden", "fingerprint", "Delimited"]

BLOCK = 1 << 20
_URL_PREFIXES = ("http:", "https:", "ftp:", "s3:", "gs:", "hf:", "data:", "file:")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (benchmarks' TSVs reach gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def hash_source(path: Path) -> dict:
    """{"path", "kind", "sha256", "bytes"[, "files"]} of a file, or of a folder's visible
    files (hashes of relative path, size and content, in sorted order)."""
    if path.is_file():
        return {"path": str(path), "kind": "file", "sha256": sha256_file(path), "bytes": path.stat().st_size}
    digest, total, count = hashlib.sha256(), 0, 0
    for full in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = full.relative_to(path)
        if hidden(rel):
            continue
        size = full.stat().st_size
        digest.update(f"{rel.as_posix()}\0{size}\0{sha256_file(full)}\0".encode())
        total, count = total + size, count + 1
    return {"path": str(path), "kind": "folder", "sha256": digest.hexdigest(), "bytes": total, "files": count}


def safe_path(root: Path, raw: str, *, where: str) -> Path:
    """The file `raw` names inside `root`, or InputError (URL, escape, missing file)."""
    text = str(raw).strip()
    if not text or "\0" in text:
        raise InputError("empty or invalid image path", where=where)
    if "://" in text or text.lower().startswith(_URL_PREFIXES):
        raise InputError(f"image {text!r} is a URL; mmaudit never fetches remote images (download them and "
                         "give --images DIR)", where=where)
    base = root.resolve()
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute():
        full = Path(text)
    else:
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts:
            raise InputError(f"image path {text!r} points outside {root}", where=where)
        full = root.joinpath(*parts)
    resolved = full.resolve()
    if not resolved.is_relative_to(base):
        raise InputError(f"image path {text!r} is outside the image folder {root} (give --images DIR to "
                         "choose the folder)", where=where)
    if not resolved.is_file():
        raise InputError(f"image file {text!r} not found in {root}", where=where)
    return resolved


def fingerprint(path: Path) -> list:
    """(path, size, mtime_ns): enough to notice that a cached import's image changed."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


# A VLMEvalKit cell holds a whole base64 image; csv's default 128 KiB field limit is too small.
MAX_FIELD = 160 << 20
if csv.field_size_limit() < MAX_FIELD:
    csv.field_size_limit(MAX_FIELD)


class Delimited:
    """A CSV/TSV as pandas writes them (quoted fields may hold tabs and newlines): `header`,
    then (line number, fields) per row; every row must have the header's number of fields.
    Use as a context manager (the file is closed on exit)."""

    def __init__(self, path: Path, *, delimiter: str) -> None:
        self.path = path
        self._fh = open(path, encoding="utf-8-sig", newline="")
        self._reader = csv.reader(self._fh, delimiter=delimiter, strict=True)
        kind = "TSV" if delimiter == "\t" else "CSV"
        try:
            header = next(self._reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            self.close()
            raise InputError(f"not a readable {kind} file ({exc})", where=f"{path} line 1") from None
        if not header:
            self.close()
            raise InputError("empty file (expected a header row)", where=str(path))
        self.header = [h.strip() for h in header]
        dup = [h for h in self.header if self.header.count(h) > 1]
        if dup or "" in self.header:
            self.close()
            what = f"a duplicate column {dup[0]!r}" if dup else "an empty column name"
            raise InputError(f"the header has {what}", where=f"{path} line 1")

    def __enter__(self) -> Delimited:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    def __iter__(self) -> Iterator[tuple[int, list[str]]]:
        reader, width, line = self._reader, len(self.header), self._reader.line_num
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"unreadable row ({exc})", where=f"{self.path} line {reader.line_num}") from None
            start, line = line + 1, reader.line_num
            if not fields:
                continue  # a blank line
            if len(fields) != width:
                raise InputError(f"row has {len(fields)} fields, the header has {width} ({', '.join(self.header)})",
                                 where=f"{self.path} line {start}")
            yield start, fields
