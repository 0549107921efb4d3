"""Where a model comes from and what it is: a local folder or a Hub id, its identity.

- `resolve_source(model, revision=...)`: a local folder is used as is; an `org/name` id is
  resolved through `huggingface_hub.snapshot_download` (only weights in safetensors, the
  config, tokenizer and processor files). With `HF_HUB_OFFLINE=1` it resolves from the
  local cache only and a missing id or revision is one clear error.
- `model_identity(source)`: the Hub commit hash when there is one; otherwise a SHA-256
  over the folder's config/tokenizer/processor files and the per-file SHA-256 of each
  weight file, the latter cached by (path, size, mtime, inode) in
  `$MMAUDIT_CACHE/file-hashes.json` (default `~/.cache/mmaudit`), so a 70B checkpoint is
  read once, not at every start and resume. A fine-tune with the same architecture gets
  a different identity (headers and sizes alone would collide).
- `check_safetensors(path)`: the header is read and checked (length, JSON, every tensor's
  byte range inside the file) before any loader touches the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from audit.errors import InputError

__all__ = ["ModelSource", "resolve_source", "model_identity", "source_of_folder", "check_safetensors", "file_sha256",
           "HUB_ID", "MAX_HEADER"]

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_META_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
_ALLOW = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the local folder the model loads from
    hub_id: str | None = None
    revision: str | None = None  # what the user asked for (a branch, tag or commit)
    commit: str | None = None  # the commit it resolved to


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_dir():
        if revision:
            raise InputError("--revision applies to Hub ids, not to a local folder", where=str(path))
        return ModelSource(path=path.resolve())
    if not HUB_ID.match(model):
        raise InputError("no such model folder, and not a Hub id of the form org/name", where=model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    allow = _ALLOW if trust_remote_code else [p for p in _ALLOW if p != "*.py"]
    try:
        local = snapshot_download(model, revision=revision, allow_patterns=allow, local_files_only=_offline())
    except (LocalEntryNotFoundError, FileNotFoundError) as exc:
        what = f"revision {revision!r} of {model}" if revision else model
        hint = "; HF_HUB_OFFLINE is set, so only the local Hugging Face cache is searched" if _offline() else ""
        raise InputError(f"{what} is not in the local cache{hint} (cache: {_cache_dir()})", where="--model") from exc
    except RevisionNotFoundError as exc:
        raise InputError(f"revision {revision!r} does not exist", where=f"--model {model}") from exc
    except RepositoryNotFoundError as exc:
        raise InputError("no such model on the Hub (or it needs a token: set HF_TOKEN)", where=model) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise InputError(f"cannot resolve the model ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                         where=model) from exc
    local = Path(local)
    return ModelSource(path=local, hub_id=model, revision=revision, commit=local.name)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def check_safetensors(path: Path) -> dict:
    """The parsed header of a safetensors file, or InputError naming what is wrong."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InputError("truncated safetensors file (no header)", where=str(path))
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise InputError(f"safetensors header of {n} bytes does not fit the file ({size} bytes): truncated or "
                             "not a safetensors file", where=str(path))
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError("safetensors header is not valid JSON", where=str(path)) from exc
    if not isinstance(header, dict):
        raise InputError("safetensors header is not a JSON object", where=str(path))
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data):
            raise InputError(f"tensor {name!r} lies outside the file (truncated download?)", where=str(path))
    return header


def _hash_cache_path() -> Path:
    root = Path(os.environ.get("MMAUDIT_CACHE") or Path.home() / ".cache" / "mmaudit")
    return root / "file-hashes.json"


def file_sha256(path: Path, *, cache: bool = True) -> str:
    """SHA-256 of a file, streamed; cached by (path, size, mtime, inode) for large files."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    store = _hash_cache_path()
    if cache:
        with _LOCK:
            try:
                known = json.loads(store.read_text())
            except (OSError, ValueError):
                known = {}
        if isinstance(known, dict) and isinstance(known.get(key), str):
            return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if cache:
        with _LOCK:
            try:
                known = json.loads(store.read_text())
                known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                known = {}
            known[key] = digest
            try:
                store.parent.mkdir(parents=True, exist_ok=True)
                tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(known))
                os.replace(tmp, store)
            except OSError:
                pass  # a read-only home: identity still correct, only slower next time
    return digest


def source_of_folder(path: Path) -> ModelSource:
    """A folder as a ModelSource; a Hugging Face cache snapshot keeps its Hub id and commit."""
    path = Path(path).resolve()
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--") and re.fullmatch(r"[0-9a-f]{40}", path.name):
        return ModelSource(path=path, hub_id=repo[len("models--"):].replace("--", "/"), commit=path.name)
    return ModelSource(path=path)


def model_identity(source: ModelSource) -> str:
    """Hub commit when known; else a content fingerprint of the folder (see module docstring)."""
    if source.commit:
        return f"hub:{source.hub_id}@{source.commit}"
    h = hashlib.sha256()
    for f in sorted(p for p in source.path.iterdir() if p.is_file()):
        if f.suffix == ".safetensors":
            part = file_sha256(f).encode()
        elif f.suffix in _META_SUFFIXES and f.stat().st_size <= 64 * 1024 * 1024:
            part = f.read_bytes()
        else:
            continue
        h.update(f"{f.name}\0{len(part)}\0".encode())
        h.update(part)
    return h.hexdigest()
