"""`--format auto`: the format of each source from its name and first bytes.

- a folder holding manifest.jsonl is already a dataset folder (not imported);
- a folder with dataset_dict.json or state.json (save_to_disk), or with *.parquet files
  (directly or in data/), or a .parquet file: hf;
- a .tsv file: vlmevalkit;
- a .json / .jsonl file whose first record has question_id, image, text and label: pope;
- a .csv file, or a folder of images: imagefolder.
Every source must be of one format.
"""
from __future__ import annotations

import json
from pathlib import Path

from audit.dataset import IMAGE_EXTENSIONS
from audit.errors import InputError
from audit.importers.hf import is_hf_folder
from audit.importers.pope import REQUIRED

__all__ = ["detect_format", "format_of", "AUTO_HELP", "is_dataset_folder"]

AUTO_HELP = __doc__.split("\n\n", 1)[1].strip()


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.jsonl").is_file()


def _first_record(path: Path) -> object:
    with open(path, "rb") as fh:
        head = fh.read(1 << 16)
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith("["):  # a JSON array: look at its first element
        text = text[1:].lstrip()
        try:
            return json.JSONDecoder().raw_decode(text)[0]
        except json.JSONDecodeError:
            return None
    line = text.split("\n", 1)[0]
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def format_of(path: Path) -> str:
    """The format of one source, or InputError saying why it cannot tell."""
    if not path.exists():
        raise InputError("no such file or folder", where=str(path))
    if path.is_dir():
        if is_dataset_folder(path):
            raise InputError("is already an mmaudit dataset folder (manifest.jsonl); use it with --data as it is",
                             where=str(path))
        if is_hf_folder(path):
            return "hf"
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.rglob("*")):
            return "imagefolder"
        raise InputError("cannot tell the format of this folder (no save_to_disk files, parquet or images); "
                         "give --format", where=str(path))
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "vlmevalkit"
    if suffix == ".parquet":
        return "hf"
    if suffix == ".csv":
        return "imagefolder"
    if suffix in (".json", ".jsonl"):
        first = _first_record(path)
        if isinstance(first, dict) and all(k in first for k in REQUIRED):
            return "pope"
        raise InputError(f"a JSON file whose first record lacks POPE's fields ({', '.join(REQUIRED)}); give "
                         "--format", where=str(path))
    raise InputError(f"cannot tell the format from the extension {suffix or '(none)'!r}; give --format",
                     where=str(path))


def detect_format(sources: list[Path]) -> str:
    formats = {src: format_of(src) for src in sources}
    first = sources[0]
    for src, fmt in formats.items():
        if fmt != formats[first]:
            raise InputError(f"is {fmt} but {first} is {formats[first]}; import one format at a time",
                             where=str(src))
    return formats[first]
