"""POPE's own question files (github.com/AoiDragon/POPE, output/<dataset>/<dataset>_pope_<setting>.json).

One JSON object per line: {"question_id", "image", "text", "label"} (upstream adds
"image_id"; other scalar keys become attributes). One file per negative-sampling setting;
the setting comes from the file name (random / popular / adversarial) or `--map
setting=NAME`, and is `attributes.pope_setting` on every question, "yes" and "no" alike,
so per-setting metrics use exactly that file's questions. The same positive questions
appear in every setting's file: each stays a separate example (ids `<file stem>-<question_id>`);
the hallucination probe deduplicates them for its overall numbers. Images are read from
`--images DIR`, by default the file's folder or its `images/` subfolder.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from audit.errors import InputError
from audit.importers.base import Importer
from audit.importers.options import ImportOptions
from audit.importers.sources import safe_path
from audit.importers.writer import DatasetWriter

__all__ = ["PopeImporter", "SETTINGS", "REQUIRED"]

SETTINGS = ("random", "popular", "adversarial")
REQUIRED = ("question_id", "image", "text", "label")
MAX_LINE = 1 << 20  # a POPE line is ~150 bytes; anything huge is not a POPE file


def setting_of(path: Path) -> str | None:
    found = [s for s in SETTINGS if s in re.split(r"[^a-z0-9]+", path.stem.lower())]
    return found[0] if len(found) == 1 else None


def read_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded JSON value) of a JSON-lines file; a JSON array is read whole."""
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if head.startswith(b"["):
        try:
            items = json.loads(path.read_text(encoding="utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"not valid JSON ({exc})", where=str(path)) from None
        yield from ((i, item) for i, item in enumerate(items, start=1))
        return
    with open(path, "rb") as fh:
        for number, raw in enumerate(iter(lambda: fh.readline(MAX_LINE + 1), b""), start=1):
            if len(raw) > MAX_LINE:
                raise InputError("line too long for a POPE question", where=f"{path} line {number}")
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if text.strip():
                    yield number, json.loads(text)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"not valid JSON ({exc})", where=f"{path} line {number}") from None


class PopeImporter(Importer):
    name = "pope"
    version = "1"

    def __init__(self, sources: list[Path], *, opts: ImportOptions) -> None:
        super().__init__(sources, opts=opts)
        opts.refuse(self.name, "prompt", "choices", "pair_by", "varies")
        mapping = dict(opts.mapping)
        if set(mapping) - {"setting"}:
            raise InputError("POPE files take only --map setting=NAME (the negative-sampling setting)",
                             where="--map")
        self.settings, self.folders = {}, {}
        for path in sources:
            setting = mapping.get("setting") or setting_of(path)
            if not setting:
                raise InputError(f"cannot tell the POPE setting from the file name (expected one of "
                                 f"{', '.join(SETTINGS)} in it); pass --map setting=NAME", where=str(path))
            self.settings[path] = setting
            own = path.parent / "images"
            folder = opts.images or (own if own.is_dir() else path.parent)
            self.folders[path] = folder.absolute()
            if self.folders[path] not in self.image_dirs:
                self.image_dirs.append(self.folders[path])

    def run(self, writer: DatasetWriter) -> None:
        for path in self.sources:
            self.mapping[str(path)] = {"question_id": "id (<file stem>-<question_id>)", "text": "prompt",
                                       "label": "answer (choices yes/no)", "image": "image",
                                       "(file name or --map)": f"attributes.pope_setting = {self.settings[path]}"}
            for count, (line, obj) in enumerate(read_lines(path)):
                if self.opts.limit is not None and count >= self.opts.limit:
                    break
                writer.add(self._example(path, line, obj, writer), where=f"{path} line {line}", source=str(path))

    def _example(self, path: Path, line: int, obj: Any, writer: DatasetWriter) -> dict[str, Any]:
        at = f"{path} line {line}"
        if not isinstance(obj, dict):
            raise InputError("expected a JSON object with question_id, image, text and label", where=at)
        for key in REQUIRED:
            if obj.get(key) in (None, ""):
                raise InputError(f"field {key!r} is missing", where=at)
        label = str(obj["label"]).strip().lower()
        if label not in ("yes", "no"):
            raise InputError(f"field 'label' must be yes or no, got {obj['label']!r}", where=at)
        for key in ("image", "text"):
            if not isinstance(obj[key], str):
                raise InputError(f"field {key!r} must be a string", where=at)
        where = f"{at} field 'image'"
        image = writer.images.add_file(safe_path(self.folders[path], obj["image"], where=where), where=where,
                                       external=True)
        attributes = {k: v for k, v in obj.items() if k not in ("image", "text", "label")
                      and isinstance(v, (str, int, float, bool))}
        attributes["pope_setting"] = self.settings[path]
        return {"id": f"{path.stem}-{obj['question_id']}", "image": image, "prompt": obj["text"],
                "answer": label, "choices": ["yes", "no"], "tags": ["pope"], "attributes": attributes}
