"""The common writer: one dataset folder, built in a hidden sibling and renamed into place.

Nothing appears at the destination until every example is written and the folder loads
with `audit.dataset.Dataset.load`; on any error the temporary folder (and any parent
folder this import created) is removed, so a failed import leaves nothing behind.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from audit.dataset import SPLITS, Dataset
from audit.errors import InputError
from audit.importers.images import DEFAULT_MAX_PIXELS, ImageStore
from audit.paths import check_output

__all__ = ["DatasetWriter", "ERR_EXISTS", "STAMP", "check_destination"]

STAMP = ".mmaudit-import.json"  # cache entries only: their key and the outside files they read

ERR_EXISTS = "exists and is not empty; choose a new folder (an import never replaces existing data)"
_SCALARS = (str, int, float, bool)


def check_destination(out: str | os.PathLike, *, inputs: Iterable[tuple[str, Path | None]],
                      replace: bool = False) -> Path:
    """`out` resolved, or InputError: it overlaps an input, is a file, or holds data already."""
    path = check_output(out, inputs=list(inputs))
    if path.exists() and not path.is_dir():
        raise InputError("exists and is not a folder", where=f"--out {path}")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise InputError(ERR_EXISTS, where=f"--out {path}")
    return path


class DatasetWriter:
    """Use as a context manager: `add` examples, then `commit(datacard)`; an exception aborts."""

    def __init__(self, out: str | os.PathLike, *, inputs: Iterable[tuple[str, Path | None]],
                 max_pixels: int = DEFAULT_MAX_PIXELS, replace: bool = False) -> None:
        self.out = check_destination(out, inputs=inputs, replace=replace)
        self.replace = replace
        self._created = self._make_parents(self.out.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.import-", dir=self.out.parent))
        self.tmp.chmod(0o755)  # mkdtemp makes it private; a data folder is meant to be read
        self.images = ImageStore(self.tmp, max_pixels=max_pixels)
        self._manifest = open(self.tmp / "manifest.jsonl", "w", encoding="utf-8")
        self._ids: dict[str, str] = {}
        self.counts: dict[str, Counter] = {k: Counter() for k in ("split", "category", "setting", "tag", "source")}
        self.with_image = 0

    @staticmethod
    def _make_parents(parent: Path) -> list[Path]:
        missing = []
        p = parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        parent.mkdir(parents=True, exist_ok=True)
        return missing  # deepest first: removed in this order if the import fails

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def n(self) -> int:
        return len(self._ids)

    def add(self, example: dict[str, Any], *, where: str, source: str) -> None:
        """Validate one example against docs/format.md (naming the source row) and write it."""
        ex = {k: v for k, v in example.items() if v is not None and v != {} and v != []}
        ex_id = ex.get("id")
        if not isinstance(ex_id, str) or not ex_id:
            raise InputError("empty id", where=where)
        if ex_id in self._ids:
            raise InputError(f"duplicate id {ex_id!r} (first from {self._ids[ex_id]})", where=where)
        if not isinstance(ex.get("prompt"), str) or not ex["prompt"].strip():
            raise InputError("empty prompt (question)", where=where)
        choices = ex.get("choices")
        if choices is not None and (len(set(choices)) != len(choices) or not all(isinstance(c, str) and c
                                                                                 for c in choices)):
            raise InputError(f"choices {choices} must be distinct non-empty strings", where=where)
        if choices is not None and ex.get("answer") is not None and ex["answer"] not in choices:
            raise InputError(f"answer {ex['answer']!r} is not one of the choices {choices}", where=where)
        if ex.get("varies") is not None and ex.get("pair_id") is None:
            raise InputError("'varies' is set but 'pair_id' is not", where=where)
        if ex.get("split") is not None and ex["split"] not in SPLITS:
            raise InputError(f"split {ex['split']!r} is not one of {', '.join(SPLITS)}", where=where)
        for key, value in ex.get("attributes", {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"attribute {key!r} is {value} (not a finite number)", where=where)
            if not isinstance(value, _SCALARS) and not (isinstance(value, list) and all(isinstance(v, _SCALARS)
                                                                                      for v in value)):
                raise InputError(f"attribute {key!r} has a {type(value).__name__} value; expected text or a "
                                 "number", where=where)
        self._ids[ex_id] = where
        self._manifest.write(json.dumps(ex, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
        attrs = ex.get("attributes", {})
        self.counts["split"][ex.get("split") or "none"] += 1
        for key, counter in (("category", "category"), ("pope_setting", "setting")):
            if key in attrs:
                self.counts[counter][str(attrs[key])] += 1
        for tag in ex.get("tags", ()):
            self.counts["tag"][tag] += 1
        self.counts["source"][source] += 1
        self.with_image += "image" in ex

    def summary(self) -> dict[str, Any]:
        return {"examples": self.n, "images": self.images.count, "examples_with_image": self.with_image,
                "images_reencoded_to_png": self.images.reencoded,
                **{f"by_{k}": dict(sorted(v.items())) for k, v in self.counts.items() if v}}

    def commit(self, datacard: dict[str, Any], *, stamp: dict[str, Any] | None = None) -> Path:
        """Write datacard.json (and the cache stamp), check the folder loads, rename into place."""
        self._manifest.close()
        if self.n == 0:
            raise InputError("the sources hold no examples (nothing to import)", where="mmaudit data import")
        (self.tmp / "datacard.json").write_text(json.dumps(datacard, indent=2, sort_keys=True,
                                                           ensure_ascii=False) + "\n", encoding="utf-8")
        if stamp is not None:
            (self.tmp / STAMP).write_text(json.dumps(stamp, sort_keys=True) + "\n", encoding="utf-8")
        try:  # the importers validate with source locations; this is the format's own check
            Dataset.load(self.tmp)
        except InputError as exc:
            raise RuntimeError(f"the importer wrote a manifest that does not load: {exc}") from None
        self._swap()
        return self.out

    def _swap(self) -> None:
        parked = None
        if self.out.exists() and self.replace:
            parked = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, parked / "data")
        try:
            os.replace(self.tmp, self.out)  # atomic; fails if `out` appeared meanwhile and is not empty
        except OSError as exc:
            if parked is not None:
                os.replace(parked / "data", self.out)
            raise InputError(f"{ERR_EXISTS} ({exc.strerror})", where=f"--out {self.out}") from None
        finally:
            if parked is not None:
                shutil.rmtree(parked, ignore_errors=True)

    def abort(self) -> None:
        if not self._manifest.closed:
            self._manifest.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        for p in self._created:
            try:
                p.rmdir()
            except OSError:
                break  # something else is in it now: not ours to remove

