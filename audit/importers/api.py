"""`import_sources`: sources -> a new dataset folder with its datacard (one importer per format)."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from audit import __version__
from audit.errors import InputError
from audit.importers.base import Importer
from audit.importers.detect import detect_format, is_dataset_folder
from audit.importers.hf import HFImporter
from audit.importers.imagefolder import ImageFolderImporter
from audit.importers.images import DEFAULT_MAX_PIXELS
from audit.importers.options import ImportOptions, parse_choices, parse_map
from audit.importers.pope import PopeImporter
from audit.importers.sources import hash_source
from audit.importers.vlmevalkit import VLMEvalKitImporter
from audit.importers.writer import DatasetWriter, check_destination

__all__ = ["import_sources", "import_paths", "source_paths", "FORMATS", "IMPORTERS"]

IMPORTERS: dict[str, type[Importer]] = {"vlmevalkit": VLMEvalKitImporter, "pope": PopeImporter, "hf": HFImporter,
                                         "imagefolder": ImageFolderImporter}
FORMATS = ("auto", *IMPORTERS)


def source_paths(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    items = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    if not items:
        raise InputError("no sources given", where="mmaudit data import")
    paths = [Path(s).expanduser().absolute() for s in items]
    for p in paths:
        if not p.exists():
            raise InputError("no such file or folder", where=str(p))
    if len(set(paths)) != len(paths):
        raise InputError("a source is given twice", where=str(next(p for p in paths if paths.count(p) > 1)))
    return paths


def _options(*, images, mapping, prompt, choices, pair_by, varies, licence, limit, max_image_pixels) -> ImportOptions:
    if images is not None:
        images = Path(images).expanduser().absolute()
        if not images.is_dir():
            raise InputError("not a folder", where=f"--images {images}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"must be a positive integer, got {limit!r}", where="--limit")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise InputError(f"must be a positive integer, got {max_image_pixels!r}", where="max_image_pixels")
    if prompt is not None and not str(prompt).strip():
        raise InputError("empty template", where="--prompt")
    if varies is not None and pair_by is None:
        raise InputError("--varies needs --pair-by (the attribute varies inside a counterfactual set)",
                         where="--varies")
    return ImportOptions(images=images, mapping=parse_map(mapping), prompt=prompt, choices=parse_choices(choices),
                         pair_by=pair_by, varies=varies, licence=licence, limit=limit,
                         max_image_pixels=max_image_pixels)


def import_paths(paths: list[Path], *, out: str | os.PathLike, fmt: str, opts: ImportOptions,
                 replace: bool = False, stamp: dict[str, Any] | None = None) -> dict[str, Any]:
    """Import checked source paths; `replace` and `stamp` serve the cache (resolve_data)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})", where="--format")
    for p in paths:
        if is_dataset_folder(p):
            raise InputError("is already an mmaudit dataset folder (manifest.jsonl); use it as it is", where=str(p))
    resolved = detect_format(paths) if fmt == "auto" else fmt
    importer = IMPORTERS[resolved](paths, opts=opts)
    check_destination(out, inputs=importer.inputs(), replace=replace)  # before hashing gigabytes
    hashes = [hash_source(p) for p in paths]
    with DatasetWriter(out, inputs=importer.inputs(), max_pixels=opts.max_image_pixels, replace=replace) as writer:
        importer.run(writer)
        card = {"datacard": "mmaudit import", "mmaudit_version": __version__,
                "importer": {**importer.describe(), "format": resolved, "requested_format": fmt},
                "sources": hashes, "image_folders": [str(d) for d in importer.image_dirs],
                "mapping": importer.mapping,
                "ignored_columns": {k: v for k, v in importer.ignored.items() if v},
                "options": {"images": str(opts.images) if opts.images else None, "map": dict(opts.mapping),
                            "prompt": opts.prompt, "choices": list(opts.choices) if opts.choices else None,
                            "pair_by": opts.pair_by, "varies": opts.varies, "limit": opts.limit,
                            "max_image_pixels": opts.max_image_pixels},
                "licence": opts.licence, "counts": writer.summary()}
        if stamp is not None:
            stamp = {**stamp, "external_files": sorted(writer.images.external.values())}
        writer.commit(card, stamp=stamp)
    return card


def import_sources(sources: str | os.PathLike | Sequence[str | os.PathLike], *, out: str | os.PathLike,
                   format: str = "auto", images: str | os.PathLike | None = None,
                   mapping: Sequence[str] | Mapping[str, str] | None = None, prompt: str | None = None,
                   choices: str | Sequence[str] | None = None, pair_by: str | None = None, varies: str | None = None,
                   licence: str | None = None, limit: int | None = None,
                   max_image_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, Any]:
    """Import `sources` into the new dataset folder `out`; returns the datacard it wrote.

    `mapping`: ["COLUMN=TARGET", ...] or {COLUMN: TARGET}; `choices`: "a,b" or a list.
    Raises InputError (naming file, line or row and column) for bad input; then nothing
    is left at `out`."""
    opts = _options(images=images, mapping=mapping, prompt=prompt, choices=choices, pair_by=pair_by, varies=varies,
                    licence=licence, limit=limit, max_image_pixels=max_image_pixels)
    return import_paths(source_paths(sources), out=out, fmt=format, opts=opts)

