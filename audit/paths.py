"""Never lose what the user already has: output paths checked against input paths.

`check_output(out, inputs=..., what=...)` refuses an output that is an input, contains an
input (it would be replaced or deleted with it) or lies inside an input folder (writing
there changes the input: a dataset's hash, a model folder). Paths are compared after
resolving symlinks. Every command that writes calls it before writing anything.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from audit.errors import InputError

__all__ = ["check_output", "overlap"]


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def overlap(out: str | os.PathLike, other: str | os.PathLike) -> str | None:
    """How `out` overlaps `other` ("is", "contains", "is inside"), or None."""
    a, b = _resolved(out), _resolved(other)
    if a == b:
        return "is"
    if b.is_relative_to(a):
        return "contains"
    if a.is_relative_to(b):
        return "is inside"
    return None


def check_output(out: str | os.PathLike, *, inputs: Iterable[tuple[str, str | os.PathLike | None]],
                 flag: str = "--out") -> Path:
    """`out` resolved, or InputError naming the input it would destroy or change.

    `inputs` are (label, path) pairs, e.g. ("--data", data_dir); None paths are skipped.
    """
    for label, path in inputs:
        if path is None or str(path).startswith(("http://", "https://")):
            continue
        how = overlap(out, path)
        if how:
            raise InputError(f"{how} the {label} folder {path}; writing there would destroy or change an input. "
                             "Choose another output path", where=f"{flag} {out}")
    return _resolved(out)
