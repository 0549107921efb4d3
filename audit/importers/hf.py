"""Hugging Face datasets: a `save_to_disk` folder (Dataset or DatasetDict) or parquet files.

Columns go where `--map` says (see audit.importers.tabular). An `Image` feature column
fills `image` by default (stored bytes are kept as they are; an image stored only as a
path is read from `--images DIR`, never from elsewhere, and never from a URL); a
`ClassLabel` answer gives its label names, and they are the choices unless `--choices`
or a choices column says otherwise. DatasetDict splits and hub-style parquet names
(`train-00000-of-00001.parquet`) set `split` (validation/dev -> val); other split names
are kept in `attributes.source_split`. Rows are streamed in batches, never all in memory.
The `datasets` library is imported only here (extra: mmaudit[hf]).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from audit.errors import InputError
from audit.importers.base import Importer
from audit.importers.options import ImportOptions
from audit.importers.sources import safe_path
from audit.importers.tabular import DEFAULT_FIELDS, RowBuilder, normal_split, resolve_mapping
from audit.importers.writer import DatasetWriter

__all__ = ["HFImporter", "ERR_NO_DATASETS", "is_hf_folder"]

ERR_NO_DATASETS = "the hf format needs the 'datasets' library (pip install 'mmaudit[hf]')"
BATCH = 256
_SCALAR_DTYPES = ("string", "large_string", "bool") + tuple(f"{k}{n}" for k in ("int", "uint") for n in (8, 16, 32, 64)) \
    + ("float16", "float32", "float64")


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise InputError(ERR_NO_DATASETS, where="--format hf") from exc
    return datasets


def is_hf_folder(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_dict.json", "state.json")) or bool(_parquet_files(path))


def _parquet_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) + sorted(folder.glob("data/*.parquet"))


class HFImporter(Importer):
    name = "hf"
    version = "1"

    def __init__(self, sources: list[Path], *, opts: ImportOptions) -> None:
        super().__init__(sources, opts=opts)
        for src in sources:
            if not (src.suffix == ".parquet" and src.is_file()) and not (src.is_dir() and is_hf_folder(src)):
                raise InputError("not a Hugging Face dataset: expected a save_to_disk folder (dataset_dict.json or "
                                 "state.json) or parquet files", where=str(src))
        if opts.images is not None:
            self.image_dirs.append(opts.images.absolute())
        self.ds = _datasets()

    # ------------------------------------------------------------------ parts
    def _parts(self, src: Path) -> Iterator[tuple[str, str, str | None, Any, Iterator[list[dict]]]]:
        """(part name, label for messages, source split, features, batches of rows) of one source."""
        ds = self.ds
        if src.is_file() or not any((src / f).is_file() for f in ("dataset_dict.json", "state.json")):
            import pyarrow.parquet as pq

            for path in [src] if src.is_file() else _parquet_files(src):
                try:
                    pf = pq.ParquetFile(path)
                    features = ds.Features.from_arrow_schema(pf.schema_arrow)
                except Exception as exc:  # noqa: BLE001 - pyarrow raises many types for a bad file
                    raise InputError(f"not a readable parquet file ({type(exc).__name__}: {exc})",
                                     where=str(path)) from None
                prefix = path.stem.split("-")[0]
                with pf:
                    yield (path.stem, str(path), prefix if normal_split(prefix) else None, features,
                           (b.to_pylist() for b in pf.iter_batches(batch_size=BATCH)))
            return
        try:
            loaded = ds.load_from_disk(str(src))
        except (OSError, ValueError, json.JSONDecodeError, FileNotFoundError) as exc:
            raise InputError(f"not a readable save_to_disk folder ({type(exc).__name__}: {exc})",
                             where=str(src)) from None
        splits = loaded.items() if isinstance(loaded, ds.DatasetDict) else [(loaded.split, loaded)]
        for split, part in splits:
            split = str(split) if split is not None else None
            rows = (t.to_pylist() for t in part.with_format("arrow").iter(batch_size=BATCH))
            label = f"{src} [{split}]" if isinstance(loaded, ds.DatasetDict) else str(src)
            yield split or src.name, label, split, part.features, rows

    def run(self, writer: DatasetWriter) -> None:
        for src in self.sources:
            for name, label, split, features, batches in self._parts(src):
                self._part(src, name, label, split, features, batches, writer)

    def _part(self, src: Path, name: str, label: str, split: str | None, features: Any,
              batches: Iterator[list[dict]], writer: DatasetWriter) -> None:
        ds = self.ds
        columns = list(features)
        images = [c for c in columns if isinstance(features[c], ds.Image)]
        scalar = lambda c: isinstance(features[c], ds.ClassLabel) or (  # noqa: E731
            isinstance(features[c], ds.Value) and features[c].dtype in _SCALAR_DTYPES)
        defaults = list(DEFAULT_FIELDS)
        if len(images) == 1 and "image" not in columns:
            defaults.append((images[0], "image"))
        mapping, ignored = resolve_mapping(columns, opts=self.opts, scalar=scalar, where=label, defaults=defaults)
        if not any(t == "prompt" for t in mapping.values()) and self.opts.prompt is None:
            raise InputError(f"no prompt: map a column with --map COLUMN=prompt or give --prompt TEMPLATE "
                             f"(columns: {', '.join(columns)})", where=label)
        self.mapping[label] = dict(mapping)
        self.ignored[label] = ignored
        names = {c: list(features[c].names) for c in columns if isinstance(features[c], ds.ClassLabel)}
        builder = RowBuilder(mapping=mapping, opts=self.opts, label_names=names,
                             image_cell=lambda value, where: self._image(value, where, writer))
        manifest_split = normal_split(split)
        extra = {"source_split": split} if split is not None and manifest_split is None else None
        i = 0
        for batch in batches:
            for row in batch:
                if self.opts.limit is not None and i >= self.opts.limit:
                    return
                ex = builder.build(row, default_id=f"{name}-{i}", where=f"{label} row {i}", split=manifest_split,
                                   attributes=extra)
                writer.add(ex, where=f"{label} row {i}", source=str(src))
                i += 1

    def _image(self, value: Any, where: str, writer: DatasetWriter) -> str:
        """An Image cell ({"bytes", "path"}), raw bytes, or a path inside --images."""
        data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
        elif isinstance(value, str):
            path = value
        if data:
            return writer.images.add_bytes(data, where=where)
        if not path:
            raise InputError("the image cell holds neither bytes nor a path", where=where)
        if self.opts.images is None:
            raise InputError(f"the image is stored only as a path ({path!r}); give --images DIR, the folder "
                             "holding it", where=where)
        return writer.images.add_file(safe_path(self.opts.images.absolute(), path, where=where), where=where,
                                      external=True)
