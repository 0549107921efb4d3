"""Benchmark data in: VLMEvalKit TSVs, POPE files, Hugging Face datasets, image folders.

`import_sources(sources, out=DATA_DIR, ...)` writes a dataset folder (docs/format.md) plus
datacard.json; `resolve_data(sources)` gives `mmaudit run --data` a dataset folder for any
of these sources, importing each distinct set of sources once into a cache. The `datasets`
library (hf format only) is imported when that format is used.
"""
from __future__ import annotations

from audit.importers.api import FORMATS, IMPORTERS, import_sources
from audit.importers.cache import resolve_data
from audit.importers.detect import AUTO_HELP, detect_format

__all__ = ["import_sources", "resolve_data", "FORMATS", "IMPORTERS", "AUTO_HELP", "detect_format"]
