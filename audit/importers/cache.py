"""`resolve_data`: what `mmaudit run --data` accepts, as a dataset folder.

A dataset folder (or its manifest.jsonl) is returned as it is. Any other sources are
imported once, with the default options (`--format auto`), into
`$MMAUDIT_CACHE/data/<key>` (MMAUDIT_CACHE defaults to ~/.cache/mmaudit), where the key
hashes the sources' paths and contents and the importers' versions; later calls reuse the
folder. Images read from outside the sources (POPE's image folder, CSV file columns) are
recorded by size and modification time in the entry's stamp: if one changed, the entry is
imported again. Entries are never deleted here; remove the folder to reclaim space.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from audit.errors import InputError
from audit.importers.api import IMPORTERS, import_paths, source_paths
from audit.importers.detect import is_dataset_folder
from audit.importers.options import ImportOptions
from audit.importers.sources import fingerprint, hash_source
from audit.importers.writer import STAMP

__all__ = ["resolve_data", "cache_root", "cache_key", "CACHE_ENV"]

CACHE_ENV = "MMAUDIT_CACHE"
KEY_VERSION = "1"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "mmaudit"


def cache_key(paths: Sequence[Path]) -> str:
    """Hash of the sources' paths and contents and of every importer's version."""
    digest = hashlib.sha256(f"mmaudit-import\0{KEY_VERSION}\0".encode())
    digest.update(json.dumps(sorted((k, v.version) for k, v in IMPORTERS.items())).encode())
    for p in paths:
        h = hash_source(p)
        digest.update(f"\0{p}\0{h['kind']}\0{h['sha256']}".encode())
    return digest.hexdigest()[:24]


def _stamp(dest: Path) -> dict | None:
    try:
        return json.loads((dest / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fresh(dest: Path, key: str) -> bool:
    """The entry exists, is complete, has this key, and no outside image changed since."""
    stamp = _stamp(dest)
    if stamp is None or stamp.get("key") != key or not (dest / "manifest.jsonl").is_file():
        return False
    for path, size, mtime in stamp.get("external_files", []):
        try:
            if fingerprint(Path(path)) != [path, size, mtime]:
                return False
        except OSError:
            return False
    return True


def resolve_data(src_list: str | os.PathLike | Sequence[str | os.PathLike], *,
                 cache_dir: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """A dataset folder for `src_list`: the folder itself, or the cached import of the sources.

    `cache_dir` replaces $MMAUDIT_CACHE (entries go to `<cache_dir>/data/<key>`); `log`
    receives one line when an import happens."""
    items = [src_list] if isinstance(src_list, (str, os.PathLike)) else list(src_list)
    if len(items) == 1:
        first = Path(items[0]).expanduser()
        if is_dataset_folder(first) or (first.is_file() and first.name == "manifest.jsonl"):
            return first
    paths = source_paths(items)
    for p in paths:
        if is_dataset_folder(p):
            raise InputError("a dataset folder cannot be combined with other sources", where=str(p))
    key = cache_key(paths)
    dest = cache_root(cache_dir) / "data" / key
    if _fresh(dest, key):
        return dest
    if dest.exists() and any(dest.iterdir()) and _stamp(dest) is None:
        raise InputError("is in the import cache but is not an mmaudit import; remove it", where=str(dest))
    if log is not None:
        log(f"importing {', '.join(map(str, paths))} into {dest} (once; later runs reuse it)")
    try:
        import_paths(paths, out=dest, fmt="auto", opts=ImportOptions(), replace=dest.exists(),
                     stamp={"key": key, "sources": [str(p) for p in paths]})
    except InputError:
        if _fresh(dest, key):  # another process imported the same sources meanwhile
            return dest
        raise
    return dest
