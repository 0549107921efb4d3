"""Image bytes into the dataset folder: checked, deduplicated, re-encoded only when needed.

PNG, JPEG and WebP bytes are kept exactly (named by their SHA-256, so a picture repeated
in many rows, or many base64 cells, is stored once). GIF, BMP and TIFF are re-encoded to
PNG. Nothing is decoded before the header's width x height is checked against the pixel
limit (a decompression bomb is refused from its header); then the image is decoded once,
so a truncated file fails here, naming its source row, and not in the middle of an audit.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from pathlib import Path

from PIL import Image

from audit.errors import InputError
from audit.importers.sources import fingerprint

__all__ = ["ImageStore", "MAX_IMAGE_BYTES", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 4096 * 4096  # audit.dataset.Dataset.load's default
MAX_IMAGE_BYTES = 100 << 20  # compressed size; far above any benchmark image
KEEP = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "WEBP": ".webp"}  # MPO: a JPEG with extra frames
REENCODE = ("GIF", "BMP", "TIFF")
_OPEN_FORMATS = ("PNG", "JPEG", "WEBP", *REENCODE)  # no other PIL plugin parses source bytes
_PNG_MODES = ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")

ERR_TOO_MANY_BYTES = "image is {size} bytes, over the limit of {limit} bytes"
ERR_BOMB = "image is {w}x{h} = {pixels} pixels, over the limit of {limit} (refused before decoding)"
ERR_NOT_IMAGE = "not a readable PNG, JPEG, WebP, GIF, BMP or TIFF image ({detail})"
ERR_BASE64 = "not valid base64 ({detail})"


class ImageStore:
    """Writes images under `root/images/`; `add_*` return the manifest path ("images/<hash>.<ext>")."""

    def __init__(self, root: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.root = root
        self.max_pixels = max_pixels
        self._by_hash: dict[str, str] = {}
        self.reencoded = 0
        self.external: dict[str, list] = {}  # files read from outside the sources (cache validity)

    @property
    def count(self) -> int:
        return len(set(self._by_hash.values()))

    def add_base64(self, text: str, *, where: str) -> str:
        text = text.strip()
        if len(text) > (MAX_IMAGE_BYTES // 3 + 1) * 4:
            raise InputError(ERR_TOO_MANY_BYTES.format(size=len(text) * 3 // 4, limit=MAX_IMAGE_BYTES), where=where)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(ERR_BASE64.format(detail=exc), where=where) from None
        return self.add_bytes(data, where=where)

    def add_file(self, path: Path, *, where: str, external: bool = False) -> str:
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise InputError(ERR_TOO_MANY_BYTES.format(size=size, limit=MAX_IMAGE_BYTES), where=f"{where} ({path})")
        if external:
            self.external[str(path)] = fingerprint(path)
        return self.add_bytes(path.read_bytes(), where=f"{where} ({path})")

    def add_bytes(self, data: bytes, *, where: str) -> str:
        if len(data) > MAX_IMAGE_BYTES:
            raise InputError(ERR_TOO_MANY_BYTES.format(size=len(data), limit=MAX_IMAGE_BYTES), where=where)
        key = hashlib.sha256(data).hexdigest()
        if key in self._by_hash:
            return self._by_hash[key]
        fmt, png = self._check(data, where)
        if png is None:
            rel = f"images/{key[:32]}{KEEP[fmt]}"
            out = data
        else:
            self.reencoded += 1
            out = png
            rel = f"images/{hashlib.sha256(png).hexdigest()[:32]}.png"
        target = self.root / rel
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            target.write_bytes(out)
        self._by_hash[key] = rel
        return rel

    def _check(self, data: bytes, where: str) -> tuple[str, bytes | None]:
        """(PIL format, PNG bytes when re-encoded else None), after the pixel check."""
        try:
            with warnings.catch_warnings():
                # PIL's own guard warns above its limit; ours, below, is the one that counts.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
        except Image.DecompressionBombError as exc:
            raise InputError(f"image too large to open safely ({exc})", where=where) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(ERR_NOT_IMAGE.format(detail=exc), where=where) from None
        with img:
            w, h = img.size
            if w * h > self.max_pixels:
                raise InputError(ERR_BOMB.format(w=w, h=h, pixels=w * h, limit=self.max_pixels), where=where)
            try:
                img.load()
            except (OSError, SyntaxError, ValueError, EOFError) as exc:
                raise InputError(ERR_NOT_IMAGE.format(detail=exc), where=where) from None
            if img.format in KEEP:
                return img.format, None
            frame = img
            if frame.mode not in _PNG_MODES:
                alpha = "A" in frame.getbands() or "transparency" in frame.info
                frame = frame.convert("RGBA" if alpha else "RGB")
            buf = io.BytesIO()
            frame.save(buf, format="PNG")
            return img.format, buf.getvalue()
