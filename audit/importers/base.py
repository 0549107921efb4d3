"""What every format importer provides to `audit.importers.import_sources`."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from audit.importers.options import ImportOptions
from audit.importers.writer import DatasetWriter

__all__ = ["Importer"]


class Importer(ABC):
    """One format. The constructor checks options and reads only headers; `run` writes."""

    name: str
    version: str

    def __init__(self, sources: list[Path], *, opts: ImportOptions) -> None:
        self.sources = sources
        self.opts = opts
        self.mapping: dict[str, dict[str, str]] = {}  # source -> {source field: target}, for the datacard
        self.ignored: dict[str, list[str]] = {}  # source -> columns not imported
        self.image_dirs: list[Path] = []  # folders images are read from, besides the sources (datacard)

    def inputs(self) -> list[tuple[str, Path]]:
        """(label, path) the output may not overlap: the sources and an explicit --images folder.
        A default image folder (a source file's own folder) is not one: writing a new folder
        beside the files read changes none of them."""
        return [("source", s) for s in self.sources] + [("--images", self.opts.images)]

    @abstractmethod
    def run(self, writer: DatasetWriter) -> None:
        """Add every example of every source to `writer`."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "module": type(self).__module__, "version": self.version}
