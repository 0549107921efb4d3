"""The dataset folder a user brings (docs/format.md, "Dataset folder"): load, validate, select.

Every problem is an InputError naming the manifest line and field, so the CLI can print
one clear line and exit 2. Images are opened lazily and defensively (size checked from the
header before any decoding); audio clips likewise (file size and duration checked from the
header before any sample is read).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import wave
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image

from audit.adapters.base import Audio
from audit.errors import InputError

__all__ = ["Example", "Dataset", "FrozenAttributes", "SPLITS", "IMAGE_EXTENSIONS", "AUDIO_EXTENSIONS",
           "MAX_AUDIO_SECONDS", "MAX_AUDIO_BYTES"]

MANIFEST = "manifest.jsonl"
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_EXTENSIONS = (".wav", ".flac")
# Limits checked before any sample is decoded: 30 s is Qwen2-Audio's whole window, and no
# clip that fits it needs more than 64 MiB even at 192 kHz stereo 32-bit.
MAX_AUDIO_SECONDS = 30.0
MAX_AUDIO_BYTES = 64 * 2**20
_PIL_FORMATS = ("PNG", "JPEG", "WEBP")  # never let another PIL plugin parse user files
FIELDS = ("id", "image", "prompt", "answer", "choices", "attributes", "pair_id", "varies",
          "tags", "split", "audio")
CACHE_SIZE = 256
AUDIO_CACHE_SIZE = 64

ERR_NO_MANIFEST = "no manifest.jsonl here (expected the dataset folder or its manifest.jsonl)"
ERR_BAD_ON_ERROR = "on_error must be 'stop' or 'skip', got {value!r}"
ERR_MAX_PIXELS = "must be a positive integer, got {value!r}"
ERR_NOT_UTF8 = "not valid UTF-8 ({detail})"
ERR_JSON = "not valid JSON ({detail})"
ERR_NOT_OBJECT = "expected a JSON object, got {kind}"
ERR_UNKNOWN_FIELD = "unknown field {field!r} (known: {known}; put extra data in 'attributes')"
ERR_REQUIRED = "field {field!r} is required and must be a non-empty string"
ERR_TYPE = "field {field!r} must be {expected}, got {kind}"
ERR_SPLIT = "field 'split' must be one of {allowed}, got {value!r}"
ERR_CHOICES = "field 'choices' must be a non-empty list of distinct strings"
ERR_ANSWER = "field 'answer' {answer!r} is not one of 'choices' {choices}"
ERR_VARIES = "field 'varies' is set but 'pair_id' is not"
ERR_DUPLICATE = "field 'id' {id!r} is a duplicate (first on line {first}, again on line {line})"
ERR_IMAGE_ABSOLUTE = "field 'image' {path!r} must be a path relative to the dataset folder"
ERR_IMAGE_ESCAPES = "field 'image' {path!r} points outside the dataset folder"
ERR_IMAGE_EXT = "field 'image' {path!r} has extension {ext!r}; expected one of png, jpg, jpeg, webp"
ERR_IMAGE_MISSING = "field 'image' {path!r}: no such file"
ERR_NO_ID = "no example with id {id!r}"
ERR_IMAGE_BOMB = ("image {path} (example {id!r}) is too large: {width}x{height} = {pixels} "
                  "pixels, over the limit of {limit}")
ERR_IMAGE_TOO_BIG = "image {path} (example {id!r}) is too large to open safely ({detail})"
ERR_IMAGE_BAD = "image {path} (example {id!r}) is truncated or corrupt ({detail})"
ERR_AUDIO_ABSOLUTE = "field 'audio' {path!r} must be a path relative to the dataset folder"
ERR_AUDIO_ESCAPES = "field 'audio' {path!r} points outside the dataset folder"
ERR_AUDIO_EXT = "field 'audio' {path!r} has extension {ext!r}; expected one of wav, flac"
ERR_AUDIO_MISSING = "field 'audio' {path!r}: no such file"
ERR_AUDIO_BYTES = "audio {path} (example {id!r}) is {size} bytes, over the limit of {limit}"
ERR_AUDIO_LONG = "audio {path} (example {id!r}) is {seconds:.2f} s long, over the limit of {limit:g} s"
ERR_AUDIO_BAD = "audio {path} (example {id!r}) is truncated, corrupt or not PCM ({detail})"
ERR_AUDIO_FLAC = ("audio {path} (example {id!r}) is FLAC, which needs the soundfile package: "
                  "pip install soundfile (or convert the file to WAV)")

# PIL's own guard is a process global; we lower it only while opening, under this lock.
_PIL_GUARD_LOCK = threading.Lock()


class FrozenAttributes(Mapping):
    """A read-only, picklable mapping (examples travel to other processes inside work units)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenAttributes({self._data!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __reduce__(self):
        return (FrozenAttributes, (self._data,))


@dataclass(frozen=True)
class Example:
    """One manifest line. `attributes` is read-only; `line` is its 1-based manifest line."""

    id: str
    prompt: str
    image: str | None = None
    answer: str | None = None
    choices: tuple[str, ...] | None = None
    attributes: Mapping[str, Any] = field(default_factory=FrozenAttributes, hash=False)
    pair_id: str | None = None
    varies: str | None = None
    tags: tuple[str, ...] = ()
    split: str | None = None
    line: int = 0
    audio: str | None = None  # audio clip path (after `line`: positional construction is unchanged)


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string",
                                         bool: "a boolean"}.get(type(value), "a number")


_IMAGE_ERRORS = (ERR_IMAGE_ABSOLUTE, ERR_IMAGE_ESCAPES, ERR_IMAGE_EXT, ERR_IMAGE_MISSING)
_AUDIO_ERRORS = (ERR_AUDIO_ABSOLUTE, ERR_AUDIO_ESCAPES, ERR_AUDIO_EXT, ERR_AUDIO_MISSING)


def _check_image_path(raw: str, root: Path) -> str:
    return _check_path(raw, root, field="image", extensions=IMAGE_EXTENSIONS, errors=_IMAGE_ERRORS)


def _check_audio_path(raw: str, root: Path) -> str:
    return _check_path(raw, root, field="audio", extensions=AUDIO_EXTENSIONS, errors=_AUDIO_ERRORS)


def _check_path(raw: str, root: Path, *, field: str, extensions: tuple[str, ...], errors: tuple[str, ...]) -> str:
    """Reject absolute paths, `..` escapes (also through symlinks), odd extensions, missing files."""
    absolute, escapes, bad_ext, missing = errors
    if not raw:
        raise ValueError(ERR_TYPE.format(field=field, expected="a non-empty string or null",
                                         kind="an empty string"))
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute() or raw.startswith("\\"):
        raise ValueError(absolute.format(path=raw))
    parts = PurePosixPath(raw.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(escapes.format(path=raw))
    ext = os.path.splitext(raw)[1].lower()
    if ext not in extensions:
        raise ValueError(bad_ext.format(path=raw, ext=ext))
    full = root.joinpath(*parts)
    if not full.is_file():
        raise ValueError(missing.format(path=raw))
    if not full.resolve().is_relative_to(root.resolve()):
        raise ValueError(escapes.format(path=raw))
    return "/".join(parts)


def _pcm_to_float(frames: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM -> mono float32 in [-1, 1] (channels averaged)."""
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: sign-extend three bytes into an int32
        b = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    elif width in (2, 4):
        x = np.frombuffer(frames, dtype=f"<i{width}").astype(np.float32) / float(1 << (8 * width - 1))
    else:
        raise ValueError(f"{8 * width}-bit samples are not supported")
    return x.reshape(-1, channels).mean(axis=1)


def _parse(obj: Any, line: int, root: Path) -> Example:
    """Turn one decoded JSON value into an Example; raise ValueError(message) if invalid."""
    if not isinstance(obj, dict):
        raise ValueError(ERR_NOT_OBJECT.format(kind=_kind(obj)))
    for key in obj:
        if key not in FIELDS:
            raise ValueError(ERR_UNKNOWN_FIELD.format(field=key, known=", ".join(FIELDS)))
    for key in ("id", "prompt"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise ValueError(ERR_REQUIRED.format(field=key))
    for key in ("image", "answer", "pair_id", "varies", "split"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise ValueError(ERR_TYPE.format(field=key, expected="a string or null",
                                             kind=_kind(obj[key])))
    if obj.get("split") is not None and obj["split"] not in SPLITS:
        raise ValueError(ERR_SPLIT.format(allowed=", ".join(SPLITS), value=obj["split"]))
    attributes = obj.get("attributes")
    if attributes is not None and not isinstance(attributes, dict):
        raise ValueError(ERR_TYPE.format(field="attributes", expected="an object or null",
                                         kind=_kind(attributes)))
    tags = obj.get("tags")
    if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
        raise ValueError(ERR_TYPE.format(field="tags", expected="a list of strings or null",
                                         kind=_kind(tags)))
    choices = obj.get("choices")
    if choices is not None:
        if (not isinstance(choices, list) or not choices or len(set(map(str, choices))) != len(choices)
                or not all(isinstance(c, str) for c in choices)):
            raise ValueError(ERR_CHOICES)
        if obj.get("answer") is not None and obj["answer"] not in choices:
            raise ValueError(ERR_ANSWER.format(answer=obj["answer"], choices=choices))
    if obj.get("varies") is not None and obj.get("pair_id") is None:
        raise ValueError(ERR_VARIES)
    image = _check_image_path(obj["image"], root) if obj.get("image") is not None else None
    if obj.get("audio") is not None and not isinstance(obj["audio"], str):
        raise ValueError(ERR_TYPE.format(field="audio", expected="a string or null", kind=_kind(obj["audio"])))
    audio = _check_audio_path(obj["audio"], root) if obj.get("audio") is not None else None
    return Example(id=obj["id"], prompt=obj["prompt"], image=image, audio=audio, answer=obj.get("answer"),
                   choices=tuple(choices) if choices is not None else None,
                   attributes=FrozenAttributes(attributes),
                   pair_id=obj.get("pair_id"), varies=obj.get("varies"),
                   tags=tuple(tags or ()), split=obj.get("split"), line=line)


class _Shared:
    """State shared by a loaded Dataset and every subset selected from it."""

    def __init__(self, root: Path, manifest_bytes: bytes, image_paths: list[str],
                 max_image_pixels: int) -> None:
        self.root = root
        self.manifest_bytes = manifest_bytes
        self.image_paths = sorted(set(image_paths))
        self.max_image_pixels = max_image_pixels
        self.cache: OrderedDict[str, Image.Image] = OrderedDict()
        self.audio_cache: OrderedDict[str, Audio] = OrderedDict()
        self.lock = threading.Lock()
        self.sha256: str | None = None


# Per-process shared state of dataset views (work units rebuilt in another process), so
# every unit of a run that reads one folder shares one image cache.
_VIEWS: dict[tuple[str, int], _Shared] = {}
_VIEWS_LOCK = threading.Lock()


class Dataset:
    """A validated manifest. Build with Dataset.load(); subsets via select()."""

    def __init__(self, shared: _Shared, examples: tuple[Example, ...],
                 skipped: tuple[tuple[int, str], ...] = ()) -> None:
        self._shared = shared
        self.examples = examples
        self.skipped = list(skipped)
        self._by_id = {ex.id: ex for ex in examples}

    @classmethod
    def load(cls, data_dir: str | os.PathLike, *, on_error: str = "stop",
             max_image_pixels: int = 4096 * 4096) -> Dataset:
        """Read DATA_DIR/manifest.jsonl (or a manifest path). on_error="skip" records bad
        lines in `skipped` as (line, reason) instead of raising on the first one."""
        if on_error not in ("stop", "skip"):
            raise InputError(ERR_BAD_ON_ERROR.format(value=on_error), where="on_error")
        if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) \
                or max_image_pixels < 1:
            raise InputError(ERR_MAX_PIXELS.format(value=max_image_pixels), where="max_image_pixels")
        path = Path(data_dir).absolute()
        manifest = path / MANIFEST if path.is_dir() or path.suffix != ".jsonl" else path
        root = manifest.parent
        if not manifest.is_file():
            raise InputError(ERR_NO_MANIFEST, where=str(manifest))
        data = manifest.read_bytes()
        examples: list[Example] = []
        skipped: list[tuple[int, str]] = []
        first_line: dict[str, int] = {}
        for number, raw in enumerate(data.split(b"\n"), start=1):
            try:
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(ERR_NOT_UTF8.format(detail=exc.reason)) from None
                if not text.strip():
                    continue  # blank lines (e.g. the trailing newline) are not examples
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise ValueError(ERR_JSON.format(detail=f"{exc.msg} at column {exc.colno}")) from None
                except RecursionError:
                    raise ValueError(ERR_JSON.format(detail="nested too deeply")) from None
                ex = _parse(obj, number, root)
                if ex.id in first_line:
                    raise ValueError(ERR_DUPLICATE.format(id=ex.id, first=first_line[ex.id],
                                                          line=number))
            except ValueError as exc:
                if on_error == "stop":
                    raise InputError(str(exc), where=f"{manifest} line {number}") from None
                skipped.append((number, str(exc)))
                continue
            first_line[ex.id] = number
            examples.append(ex)
        # audio files join the hashed files (a folder without audio hashes exactly as before)
        media = [ex.image for ex in examples if ex.image] + [ex.audio for ex in examples if ex.audio]
        shared = _Shared(root, data, media, max_image_pixels)
        return cls(shared, tuple(examples), tuple(skipped))

    # -- container protocol ------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The dataset folder (image paths are relative to it)."""
        return self._shared.root

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __getitem__(self, index: int | slice) -> Example | Dataset:
        if isinstance(index, slice):
            return Dataset(self._shared, self.examples[index])
        return self.examples[index]

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, n={len(self)}, skipped={len(self.skipped)})"

    def by_id(self, example_id: str) -> Example:
        try:
            return self._by_id[example_id]
        except KeyError:
            raise KeyError(ERR_NO_ID.format(id=example_id)) from None

    # -- subsets -----------------------------------------------------------------------
    def select(self, *, split: str | Collection[str] | None = None,
               tags: Collection[str] | None = None, exclude_tags: Collection[str] | None = None,
               predicate: Callable[[Example], bool] | None = None) -> Dataset:
        """Examples matching every given filter; `tags` keeps those having any of them."""
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        want = {tags} if isinstance(tags, str) else set(tags) if tags is not None else None
        drop = {exclude_tags} if isinstance(exclude_tags, str) else set(exclude_tags or ())
        kept = tuple(
            ex for ex in self.examples
            if (splits is None or ex.split in splits)
            and (want is None or want.intersection(ex.tags))
            and not drop.intersection(ex.tags)
            and (predicate is None or predicate(ex)))
        return Dataset(self._shared, kept)

    @classmethod
    def view(cls, root: str | os.PathLike, examples: Iterable[Example], *,
             max_image_pixels: int = 4096 * 4096) -> Dataset:
        """Already-validated examples of the folder `root` (a work unit in any process).
        Views of one folder share an image cache; they have no manifest hash."""
        key = (str(Path(root).absolute()), int(max_image_pixels))
        with _VIEWS_LOCK:
            shared = _VIEWS.get(key)
            if shared is None:
                shared = _VIEWS[key] = _Shared(Path(key[0]), b"", [], max_image_pixels)
        return cls(shared, tuple(examples))

    @property
    def max_image_pixels(self) -> int:
        return self._shared.max_image_pixels

    def subset(self, examples: Iterable[Example]) -> Dataset:
        """These examples, in the order given, sharing this dataset's folder, cache and hash."""
        return Dataset(self._shared, tuple(examples))

    def audit_split(self) -> Dataset:
        """The test split when there is one, else everything (CONTRACT: audits use test)."""
        if any(ex.split == "test" for ex in self.examples):
            return self.select(split="test")
        return self

    def counterfactual_sets(self) -> dict[str, tuple[Example, ...]]:
        """pair_id -> members in manifest order (insertion order of first member)."""
        sets: dict[str, list[Example]] = {}
        for ex in self.examples:
            if ex.pair_id is not None:
                sets.setdefault(ex.pair_id, []).append(ex)
        return {key: tuple(members) for key, members in sets.items()}

    # -- integrity ---------------------------------------------------------------------
    @property
    def sha256(self) -> str:
        """Hash of the manifest bytes and every image and audio file the loaded manifest references
        (sorted by path). Subsets share their parent's hash: it identifies the folder."""
        shared = self._shared
        with shared.lock:
            if shared.sha256 is None:
                digest = hashlib.sha256()
                # Length-prefix every part so no two different folders hash alike; stream each
                # file (a multi-gigabyte image must not be read into memory to be hashed).
                digest.update(f"{MANIFEST}\0{len(shared.manifest_bytes)}\0".encode())
                digest.update(shared.manifest_bytes)
                for p in shared.image_paths:
                    full = shared.root / p
                    digest.update(f"{p}\0{full.stat().st_size}\0".encode())
                    with open(full, "rb") as fh:
                        for block in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(block)
                shared.sha256 = digest.hexdigest()
            return shared.sha256

    # -- images ------------------------------------------------------------------------
    def _open(self, example: Example) -> Image.Image:
        """Open the header only, refusing oversized images before any pixel is decoded."""
        shared = self._shared
        full = shared.root / example.image
        limit = shared.max_image_pixels
        try:
            with _PIL_GUARD_LOCK, warnings.catch_warnings():
                # PIL warns above its limit and raises above twice it; the exact check is ours,
                # below, so the warning is only noise.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
                try:
                    img = Image.open(full, formats=_PIL_FORMATS)
                finally:
                    Image.MAX_IMAGE_PIXELS = saved
        except Image.DecompressionBombError as exc:
            raise InputError(ERR_IMAGE_TOO_BIG.format(path=full, id=example.id, detail=exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
            raise InputError(ERR_IMAGE_BAD.format(path=full, id=example.id, detail=exc)) from None
        width, height = img.size
        if width * height > limit:
            img.close()
            raise InputError(ERR_IMAGE_BOMB.format(path=full, id=example.id, width=width,
                                                   height=height, pixels=width * height,
                                                   limit=limit))
        return img

    def image(self, example: Example) -> Image.Image | None:
        """The example's image as RGB (alpha composited on white), or None if it has none.
        A small LRU cache keeps recent images; callers get a copy they may modify."""
        if example.image is None:
            return None
        shared = self._shared
        with shared.lock:
            cached = shared.cache.get(example.image)
            if cached is not None:
                shared.cache.move_to_end(example.image)
                return cached.copy()
        img = self._open(example)
        try:
            with img:
                img.load()
                has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
                if has_alpha:
                    rgba = img.convert("RGBA")
                    rgb = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    rgb.alpha_composite(rgba)
                    rgb = rgb.convert("RGB")
                else:
                    rgb = img.convert("RGB")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InputError(ERR_IMAGE_BAD.format(path=shared.root / example.image, id=example.id,
                                                  detail=exc)) from None
        with shared.lock:
            shared.cache[example.image] = rgb
            shared.cache.move_to_end(example.image)
            while len(shared.cache) > CACHE_SIZE:
                shared.cache.popitem(last=False)
        return rgb.copy()

    def check_images(self) -> list[tuple[str, str]]:
        """(example id, problem) for every image whose header or data is bad; each file once."""
        problems: list[tuple[str, str]] = []
        verdict: dict[str, str | None] = {}  # each file is checked once, even if shared
        for ex in self.examples:
            if ex.image is None:
                continue
            if ex.image not in verdict:
                verdict[ex.image] = None
                try:
                    with self._open(ex) as img:
                        img.verify()  # walks the structure/CRCs without decoding pixels
                except InputError as exc:
                    verdict[ex.image] = str(exc)
                except (OSError, SyntaxError, ValueError, EOFError) as exc:
                    verdict[ex.image] = ERR_IMAGE_BAD.format(path=self.path / ex.image,
                                                             id=ex.id, detail=exc)
            if verdict[ex.image] is not None:
                problems.append((ex.id, verdict[ex.image]))
        return problems

    # -- audio -------------------------------------------------------------------------
    def audio(self, example: Example) -> Audio | None:
        """The example's clip as a mono float32 `Audio`, or None if it has none. Size and
        duration are checked from the file and its header before any sample is decoded."""
        if example.audio is None:
            return None
        shared = self._shared
        with shared.lock:
            cached = shared.audio_cache.get(example.audio)
            if cached is not None:
                shared.audio_cache.move_to_end(example.audio)
                return cached  # immutable (read-only waveform): no copy needed
        clip = _read_audio(shared.root / example.audio, example.id)
        with shared.lock:
            shared.audio_cache[example.audio] = clip
            while len(shared.audio_cache) > AUDIO_CACHE_SIZE:
                shared.audio_cache.popitem(last=False)
        return clip

    def check_audio(self) -> list[tuple[str, str]]:
        """(example id, problem) for every audio clip that is oversized, too long or unreadable."""
        problems: list[tuple[str, str]] = []
        for ex in self.examples:
            if ex.audio is not None:
                try:
                    self.audio(ex)
                except InputError as exc:
                    problems.append((ex.id, str(exc)))
        return problems


def _read_audio(full: Path, example_id: str) -> Audio:
    size = full.stat().st_size
    if size > MAX_AUDIO_BYTES:
        raise InputError(ERR_AUDIO_BYTES.format(path=full, id=example_id, size=size, limit=MAX_AUDIO_BYTES))
    if full.suffix.lower() == ".flac":
        return _read_flac(full, example_id)
    try:
        with wave.open(str(full), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if rate < 1 or channels < 1:
                raise ValueError(f"sample rate {rate}, {channels} channels")
            if n / rate > MAX_AUDIO_SECONDS:
                raise InputError(ERR_AUDIO_LONG.format(path=full, id=example_id, seconds=n / rate,
                                                       limit=MAX_AUDIO_SECONDS))
            frames = w.readframes(n)
        if n == 0 or len(frames) != n * channels * width:  # the header promises more than the file holds
            raise ValueError(f"{len(frames)} bytes of samples, header promises {n * channels * width}")
        return Audio(_pcm_to_float(frames, width, channels), rate)
    except InputError:
        raise
    except (wave.Error, EOFError, OSError, ValueError) as exc:
        raise InputError(ERR_AUDIO_BAD.format(path=full, id=example_id, detail=exc)) from None


def _read_flac(full: Path, example_id: str) -> Audio:
    try:
        import soundfile
    except ImportError:
        raise InputError(ERR_AUDIO_FLAC.format(path=full, id=example_id)) from None
    try:
        info = soundfile.info(str(full))
        if info.frames / info.samplerate > MAX_AUDIO_SECONDS:
            raise InputError(ERR_AUDIO_LONG.format(path=full, id=example_id, seconds=info.frames / info.samplerate,
                                                   limit=MAX_AUDIO_SECONDS))
        data, rate = soundfile.read(str(full), dtype="float32", always_2d=True)
        return Audio(data.mean(axis=1), rate)
    except InputError:
        raise
    except (RuntimeError, OSError, ValueError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise InputError(ERR_AUDIO_BAD.format(path=full, id=example_id, detail=exc)) from None
