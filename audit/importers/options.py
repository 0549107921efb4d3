"""Import options shared by every format, parsed and checked once (CLI and API alike)."""
from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audit.errors import InputError
from audit.importers.images import DEFAULT_MAX_PIXELS

__all__ = ["ImportOptions", "parse_map", "parse_choices", "template_fields", "render", "FIELD_TARGETS",
           "check_target", "attribute_name"]

# Manifest fields a source column may fill (docs/format.md); anything else goes to attributes.NAME.
FIELD_TARGETS = ("id", "prompt", "answer", "image", "choices", "split", "pair_id", "varies", "tags")


@dataclass(frozen=True, kw_only=True)
class ImportOptions:
    """What the user asked for; `mapping` is (source field, target) pairs in the order given."""

    images: Path | None = None
    mapping: tuple[tuple[str, str], ...] = ()
    prompt: str | None = None
    choices: tuple[str, ...] | None = None
    pair_by: str | None = None
    varies: str | None = None
    licence: str | None = None
    limit: int | None = None
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    def refuse(self, fmt: str, *names: str) -> None:
        """InputError for options given that format `fmt` has no use for (never ignored silently)."""
        flags = {"images": "--images", "mapping": "--map", "prompt": "--prompt", "choices": "--choices",
                 "pair_by": "--pair-by", "varies": "--varies"}
        for name in names:
            if getattr(self, name) not in (None, ()):
                raise InputError(f"{flags[name]} does not apply to --format {fmt}", where=flags[name])


def check_target(target: str, *, where: str = "--map") -> str:
    if target in FIELD_TARGETS or (target.startswith("attributes.") and len(target) > len("attributes.")):
        return target
    raise InputError(f"unknown target {target!r}; expected one of {', '.join(FIELD_TARGETS)} or "
                     "attributes.NAME", where=where)


def attribute_name(target: str) -> str | None:
    return target[len("attributes."):] if target.startswith("attributes.") else None


def parse_map(items: Sequence[str] | Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """["question=prompt", ...] or {"question": "prompt"} -> (("question", "prompt"), ...)."""
    if not items:
        return ()
    pairs = list(items.items()) if isinstance(items, Mapping) else []
    if not isinstance(items, Mapping):
        for item in items:
            field, sep, target = str(item).partition("=")
            if not sep or not field.strip() or not target.strip():
                raise InputError(f"expected FIELD=TARGET, got {item!r}", where="--map")
            pairs.append((field.strip(), target.strip()))
    seen: set[str] = set()
    for field, _ in pairs:
        if field in seen:
            raise InputError(f"field {field!r} is mapped twice", where="--map")
        seen.add(field)
    return tuple((str(f), str(t)) for f, t in pairs)


def parse_choices(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    raw = value.split(",") if isinstance(value, str) else list(value)
    choices = tuple(str(c).strip() for c in raw)
    if len(choices) < 2 or not all(choices) or len(set(choices)) != len(choices):
        raise InputError(f"expected at least two distinct, non-empty choices separated by commas, got {value!r}",
                         where="--choices")
    return choices


def template_fields(template: str) -> list[str]:
    """The {NAME} fields of a --prompt template. Only plain names: no attribute access,
    indexing, conversion or format spec (str.format on user text could reach objects)."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InputError(f"invalid template {template!r} ({exc}); write {{{{ and }}}} for braces",
                         where="--prompt") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            raise InputError(f"template field {{{name}}} must be a plain column name", where="--prompt")
        names.append(name)
    return names


def render(template: str, values: Mapping[str, Any], *, where: str) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(literal)
        if name is not None:
            value = values.get(name)
            if value is None or value == "":
                raise InputError(f"--prompt needs {{{name}}} but this row has no value for it", where=where)
            out.append(str(value))
    return "".join(out)
