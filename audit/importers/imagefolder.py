"""A folder of face (or other) images with attributes: FairFace / UTKFace style.

- A CSV source: one row per image, a file column (`file`, `filename`, `image`, `path`, ...
  or `--map COLUMN=image`) holding a path inside `--images DIR` (default: the CSV's
  folder), and attribute columns (FairFace: age, gender, race). Every column not mapped
  elsewhere becomes an attribute.
- A folder source: UTKFace file names `[age]_[gender]_[race]_[date&time].jpg` (searched
  recursively), decoded as the UTKFace page documents: gender 0 male / 1 female, race
  0-4 White, Black, Asian, Indian, Others; `age` is FairFace's age bin, `age_years` the
  number.

The prompt is `--prompt TEMPLATE` with `{column}` fields (or a column mapped to prompt);
`--choices` gives the closed answer set, `--pair-by COLUMN` makes the rows sharing a value
one counterfactual set (pair_id `COLUMN=value`) and `--varies COLUMN` names the attribute
that differs inside it (group_fairness, counterfactual_bias, retrieval_skew).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from audit.dataset import IMAGE_EXTENSIONS
from audit.errors import InputError
from audit.importers.base import Importer
from audit.importers.options import ImportOptions
from audit.importers.sources import Delimited, hidden, safe_path
from audit.importers.tabular import DEFAULT_FIELDS, RowBuilder, resolve_mapping
from audit.importers.writer import DatasetWriter

__all__ = ["ImageFolderImporter", "FILE_COLUMNS", "utk_attributes", "fairface_age"]

FILE_COLUMNS = ("file", "filename", "file_name", "image", "image_path", "img", "img_path", "path")
UTK_NAME = re.compile(r"^(\d{1,3})_([01])_([0-4])_\d+\..+$")
UTK_GENDER = ("Male", "Female")
UTK_RACE = ("White", "Black", "Asian", "Indian", "Others")
UTK_COLUMNS = ["file", "age", "age_years", "gender", "race"]
_AGE_BINS = ((2, "0-2"), (9, "3-9"), (19, "10-19"), (29, "20-29"), (39, "30-39"), (49, "40-49"), (59, "50-59"),
             (69, "60-69"))


def fairface_age(years: int) -> str:
    """FairFace's age label for an age in years."""
    return next((label for top, label in _AGE_BINS if years <= top), "more than 70")


def utk_attributes(name: str) -> dict[str, Any] | None:
    m = UTK_NAME.match(name)
    if m is None:
        return None
    years = int(m.group(1))
    return {"age": fairface_age(years), "age_years": years, "gender": UTK_GENDER[int(m.group(2))],
            "race": UTK_RACE[int(m.group(3))]}


class ImageFolderImporter(Importer):
    name = "imagefolder"
    version = "1"

    def __init__(self, sources: list[Path], *, opts: ImportOptions) -> None:
        super().__init__(sources, opts=opts)
        csvs = [s for s in sources if s.is_file()]
        for src in sources:
            if not (src.is_dir() or src.suffix.lower() == ".csv"):
                raise InputError("expected a CSV of attributes or a folder of UTKFace-named images", where=str(src))
        if opts.images is not None and not csvs:
            raise InputError("--images applies to CSV sources (a folder source is its own image folder)",
                             where="--images")
        for csv_path in csvs:
            folder = (opts.images or csv_path.parent).absolute()
            if folder not in self.image_dirs:
                self.image_dirs.append(folder)

    def run(self, writer: DatasetWriter) -> None:
        for src in self.sources:
            if src.is_file():
                self._csv(src, writer)
            else:
                self._utk(src, writer)

    def _mapping(self, src: Path, columns: list[str], file_col: str) -> dict[str, str]:
        defaults = [(file_col, "image")] + [d for d in DEFAULT_FIELDS if d[1] != "image"]
        mapping, ignored = resolve_mapping(columns, opts=self.opts, scalar=lambda c: True, where=str(src),
                                           defaults=defaults)
        if not any(t == "prompt" for t in mapping.values()) and self.opts.prompt is None:
            raise InputError("no prompt: give --prompt TEMPLATE (e.g. 'What is the job of this person?') or map "
                             "a column with --map COLUMN=prompt", where=str(src))
        self.mapping[str(src)], self.ignored[str(src)] = dict(mapping), ignored
        return mapping

    def _csv(self, src: Path, writer: DatasetWriter) -> None:
        with Delimited(src, delimiter=",") as table:
            self._csv_rows(src, table, writer)

    def _csv_rows(self, src: Path, table: Delimited, writer: DatasetWriter) -> None:
        header = table.header
        mapped = [c for c, t in self.opts.mapping if t == "image"]
        file_col = mapped[0] if mapped else next((c for c in FILE_COLUMNS if c in header), None)
        if file_col is None:
            raise InputError(f"no file column (expected one of {', '.join(FILE_COLUMNS)}, or --map COLUMN=image; "
                             f"columns: {', '.join(header)})", where=str(src))
        mapping = self._mapping(src, header, file_col)
        base = (self.opts.images or src.parent).absolute()
        builder = RowBuilder(mapping=mapping, opts=self.opts, image_cell=lambda value, where: writer.images.add_file(
            safe_path(base, value, where=where), where=where, external=True))
        for count, (line, fields) in enumerate(table):
            if self.opts.limit is not None and count >= self.opts.limit:
                break
            row = dict(zip(header, fields))
            at = f"{src} line {line}"
            if not row[file_col].strip():
                raise InputError("empty file name", where=f"{at} column {file_col!r}")
            ex = builder.build(row, default_id=row[file_col].strip(), where=at)
            writer.add(ex, where=at, source=str(src))

    def _utk(self, src: Path, writer: DatasetWriter) -> None:
        files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                       and not hidden(p.relative_to(src)) and p.is_file())
        if not files:
            raise InputError("no images (.png, .jpg, .jpeg, .webp) in this folder", where=str(src))
        mapping = self._mapping(src, UTK_COLUMNS, "file")
        builder = RowBuilder(mapping=mapping, opts=self.opts, image_cell=lambda value, where: writer.images.add_file(
            safe_path(src.absolute(), value, where=where), where=where))
        for count, path in enumerate(files):
            if self.opts.limit is not None and count >= self.opts.limit:
                break
            rel = path.relative_to(src).as_posix()
            attrs = utk_attributes(path.name)
            if attrs is None:
                raise InputError("file name does not follow UTKFace's [age]_[gender]_[race]_[date&time].jpg "
                                 "(gender 0-1, race 0-4); rename or remove it, or give a CSV of attributes",
                                 where=str(path))
            writer.add(builder.build({"file": rel, **attrs}, default_id=rel, where=str(path)), where=str(path),
                       source=str(src))
