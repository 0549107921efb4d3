"""Manifest lines, example images and attention overlays, for the report and the dashboard.

Every string a run carries (example ids, prompts, image paths from a manifest) is untrusted.
An image path is resolved inside the run's data folder only: absolute paths, `..` parts,
symlinks that lead outside, and extensions other than PNG/JPEG/WebP are refused with
`UnsafePath`. Images are opened header-first and refused above `MAX_PIXELS`.
Nothing here imports torch (the dashboard uses this module).
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image

__all__ = ["UnsafePath", "resolve_image", "read_manifest", "manifest_record", "open_image", "heatmap_grid",
           "overlay_heatmap", "png_base64", "example_image", "predicted_answer", "MAX_PIXELS", "MAX_MANIFEST_BYTES"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
PIL_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 40_000_000
MAX_MANIFEST_LINES = 2_000_000
MAX_MANIFEST_BYTES = 512 * 2**20  # a larger (or sparse) file is not read: the reader must not hang
MAX_GRID = 1024  # rows or columns of an image grid (patches, attention cells)
ERR_ABSOLUTE = "image path {path!r} is absolute; only paths inside the data folder are read"
ERR_ESCAPES = "image path {path!r} points outside the data folder"
ERR_EXT = "image path {path!r} is not a PNG, JPEG or WebP file"
ERR_MISSING = "image path {path!r}: no such file in the data folder"

# A perceptual sequential colour map (viridis anchors), interpolated linearly.
_STOPS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


class UnsafePath(ValueError):
    """An image path that would leave the data folder (or is not an image file there)."""


def resolve_image(data_dir: str | os.PathLike, rel: str) -> Path:
    """The file `rel` names inside `data_dir`, or UnsafePath."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafePath(ERR_MISSING.format(path=rel))
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or rel.startswith(("\\", "/")):
        raise UnsafePath(ERR_ABSOLUTE.format(path=rel))
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafePath(ERR_ESCAPES.format(path=rel))
    if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
        raise UnsafePath(ERR_EXT.format(path=rel))
    root = Path(data_dir).resolve()
    full = root.joinpath(*parts).resolve()
    if not full.is_relative_to(root):
        raise UnsafePath(ERR_ESCAPES.format(path=rel))
    if not full.is_file():
        raise UnsafePath(ERR_MISSING.format(path=rel))
    return full


def read_manifest(data_dir: str | os.PathLike | None, ids: Iterable[str] | None = None) -> dict[str, dict]:
    """{example id: manifest object} from DATA_DIR/manifest.jsonl ({} when it is gone).

    Lines that are not JSON objects with a string id are skipped: the audit already
    validated the manifest; this reader only has to be safe, not strict. A manifest over
    MAX_MANIFEST_BYTES reads as {} (the caller says the data folder is not available).
    `ids` keeps only those examples (saves memory on large manifests).
    """
    if not data_dir:
        return {}
    path = Path(data_dir) / "manifest.jsonl"
    try:
        if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
            return {}
    except OSError:
        return {}
    keep = set(ids) if ids is not None else None
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh):
            if i >= MAX_MANIFEST_LINES:
                break
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and isinstance(obj.get("id"), str) and (keep is None or obj["id"] in keep):
                out[obj["id"]] = obj
    return out


def manifest_record(manifest: dict[str, dict], example_id) -> tuple[dict | None, bool]:
    """(record, exact) of an example id. Version-1 rows named a prompt-rewritten counterfactual
    member "<source id>~<value>"; such an id maps to its source example with exact=False
    (version 2 keeps the source id and marks the member with variant "rewritten")."""
    eid = str(example_id)
    if eid in manifest:
        return manifest[eid], True
    source = eid.rsplit("~", 1)[0] if "~" in eid else None
    return (manifest.get(source), False) if source else (None, False)


def open_image(path: Path) -> Image.Image:
    """RGB image, size checked from the header before any pixel is decoded."""
    with Image.open(path, formats=PIL_FORMATS) as im:
        if im.width * im.height > MAX_PIXELS:
            raise UnsafePath(f"image {path.name} is too large ({im.width}x{im.height})")
        return im.convert("RGB")


def example_image(data_dir: str | os.PathLike | None, record: dict | None) -> Image.Image | None:
    """The image of one manifest record, or None (no data folder, no image, refused, unreadable)."""
    if not data_dir or not record or not isinstance(record.get("image"), str):
        return None
    try:
        return open_image(resolve_image(data_dir, record["image"]))
    except (UnsafePath, OSError, ValueError, Image.DecompressionBombError):
        return None


def heatmap_grid(cells: Iterable[tuple[int, int, float]]) -> np.ndarray | None:
    """[R, C] array from typed (grid_row, grid_col, value) cells, sized by the largest
    indices; cells not given are NaN. None when no cell is valid."""
    good = []
    for r, c, v in cells:
        try:
            r, c, v = int(r), int(c), float(v)
        except (TypeError, ValueError):
            continue
        if 0 <= r < MAX_GRID and 0 <= c < MAX_GRID and math.isfinite(v):
            good.append((r, c, v))
    if not good:
        return None
    heat = np.full((max(r for r, _, _ in good) + 1, max(c for _, c, _ in good) + 1), np.nan)
    for r, c, v in good:
        heat[r, c] = v
    return heat


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis anchors)."""
    x = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
    t = (x - lo)[..., None]
    return (_STOPS[lo] * (1 - t) + _STOPS[lo + 1] * t).round().astype(np.uint8)


def overlay_heatmap(image: Image.Image | None, heat: np.ndarray, *, size: int = 192, alpha: float = 0.55) -> Image.Image:
    """The heatmap (min-max normalised) blended over the image, both at `size` px.

    Without an image the heatmap is drawn alone."""
    finite = heat[np.isfinite(heat)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    colour = Image.fromarray(colormap(norm)).resize((size, size), Image.Resampling.BILINEAR)
    if image is None:
        return colour
    base = image.convert("RGB").resize((size, size), Image.Resampling.NEAREST if image.width < size
                                       else Image.Resampling.LANCZOS)
    return Image.blend(base, colour, alpha)


def png_base64(image: Image.Image, *, max_side: int = 192) -> str:
    """A PNG thumbnail as base64 text (for data: URLs)."""
    im = image.convert("RGB")
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    elif max(im.size) < max_side // 2:  # tiny synthetic images: enlarge without blurring
        k = max(1, max_side // max(im.size))
        im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def predicted_answer(record: dict | None, pred_first: float | None) -> str | None:
    """The answer a `pred_first` row implies: the first choice, the other of two, or 'not <first>'."""
    if not record or pred_first is None or not math.isfinite(pred_first):
        return None
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        return None
    if pred_first >= 0.5:
        return choices[0]
    return choices[1] if len(choices) == 2 else f"not {choices[0]}"
