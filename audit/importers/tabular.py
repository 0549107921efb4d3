"""Rows of named columns -> manifest examples (shared by the hf and imagefolder importers).

A column goes where `--map COL=TARGET` says; otherwise a column named like a manifest
field fills it (`question` fills `prompt` too) and every other scalar column becomes
`attributes.<column>`. Non-scalar columns nobody mapped are left out and listed in the
datacard. `--prompt` templates, `--choices`, `--pair-by` and `--varies` apply per row.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from audit.errors import InputError
from audit.importers.options import ImportOptions, attribute_name, check_target, render, template_fields

__all__ = ["resolve_mapping", "RowBuilder", "normal_split", "DEFAULT_FIELDS"]

# Column names that fill a manifest field without a --map, in precedence order.
DEFAULT_FIELDS = (("id", "id"), ("prompt", "prompt"), ("question", "prompt"), ("answer", "answer"),
                  ("image", "image"), ("choices", "choices"), ("split", "split"), ("pair_id", "pair_id"),
                  ("varies", "varies"), ("tags", "tags"))
_SPLITS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
           "dev": "val", "test": "test", "testing": "test"}


def normal_split(name: Any) -> str | None:
    """A source's split name as a manifest split (validation/dev -> val), None if unknown."""
    return _SPLITS.get(str(name).strip().lower()) if name is not None else None


def resolve_mapping(columns: Sequence[str], *, opts: ImportOptions, scalar: Callable[[str], bool],
                    where: str, defaults: Sequence[tuple[str, str]] = DEFAULT_FIELDS) -> tuple[dict[str, str], list[str]]:
    """(column -> target, ignored columns). Raises for a --map column the source lacks."""
    missing = [c for c, _ in opts.mapping if c not in columns]
    if missing:
        raise InputError(f"column {missing[0]!r} named by --map is not in the source (columns: "
                         f"{', '.join(columns)})", where=where)
    for flag, col in (("--pair-by", opts.pair_by), ("--varies", opts.varies)):
        if col is not None and col not in columns:
            raise InputError(f"column {col!r} is not in the source (columns: {', '.join(columns)})",
                             where=f"{where} ({flag})")
    for name in template_fields(opts.prompt or ""):
        if name not in columns:
            raise InputError(f"template field {{{name}}} is not a column (columns: {', '.join(columns)})",
                             where=f"{where} (--prompt)")
    mapping = {c: check_target(t) for c, t in opts.mapping}
    taken = {t for t in mapping.values() if attribute_name(t) is None}
    if opts.prompt is not None:
        if "prompt" in taken:
            raise InputError("give --prompt or map a column to prompt, not both", where="--prompt")
        taken.add("prompt")  # the template replaces any default prompt column
    if opts.choices is not None:
        if "choices" in taken:
            raise InputError("give --choices or map a column to choices, not both", where="--choices")
        taken.add("choices")
    for col, target in defaults:
        if col in columns and col not in mapping and target not in taken:
            mapping[col] = target
            taken.add(target)
    targets = list(mapping.values())
    dup = [t for t in targets if targets.count(t) > 1]
    if dup:
        raise InputError(f"two columns are mapped to {dup[0]!r}", where="--map")
    ignored = []
    for col in columns:
        if col not in mapping:
            if scalar(col):
                mapping[col] = f"attributes.{col}"
            else:
                ignored.append(col)
    if opts.varies is not None and attribute_name(mapping.get(opts.varies, "")) is None:
        raise InputError(f"--varies {opts.varies} must be a column that becomes an attribute (it is mapped to "
                         f"{mapping.get(opts.varies)!r})", where="--varies")
    return mapping, ignored


class RowBuilder:
    """Builds examples of one table; `image_cell(value, where)` stores an image cell, returning its path."""

    def __init__(self, *, mapping: Mapping[str, str], opts: ImportOptions,
                 image_cell: Callable[[Any, str], str | None],
                 label_names: Mapping[str, Sequence[str]] | None = None) -> None:
        self.mapping = dict(mapping)
        self.opts = opts
        self.image_cell = image_cell
        self.labels = dict(label_names or {})
        answer_cols = [c for c, t in self.mapping.items() if t == "answer"]
        self.answer_col = answer_cols[0] if answer_cols else None
        # A class-label answer column gives the closed set of answers when nothing else does.
        self.label_choices = (tuple(self.labels[self.answer_col]) if self.answer_col in self.labels
                              and "choices" not in self.mapping.values() and opts.choices is None else None)

    def _value(self, col: str, raw: Any) -> Any:
        names = self.labels.get(col)
        if names is not None and isinstance(raw, int) and not isinstance(raw, bool):
            return names[raw] if 0 <= raw < len(names) else None  # -1: HF's "no label"
        return raw

    def build(self, row: Mapping[str, Any], *, default_id: str, where: str,
              split: str | None = None, attributes: Mapping[str, Any] | None = None) -> dict[str, Any]:
        values = {c: self._value(c, v) for c, v in row.items()}
        ex: dict[str, Any] = {"id": default_id, "split": split, "attributes": dict(attributes or {})}
        raw_answer = None
        for col, target in self.mapping.items():
            value = values.get(col)
            if value is None or value == "" or value == [] or (isinstance(value, float) and math.isnan(value)):
                continue  # missing (HF writes None; pandas-made parquet writes NaN)
            at = f"{where} column {col!r}"
            name = attribute_name(target)
            if name is not None:
                ex["attributes"][name] = value
            elif target == "image":
                ex["image"] = self.image_cell(value, at)
            elif target == "choices":
                if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                    raise InputError("choices must be a list of strings", where=at)
                ex["choices"] = list(value)
            elif target == "tags":
                tags = value.split(",") if isinstance(value, str) else value
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise InputError("tags must be a list of strings or comma-separated text", where=at)
                ex["tags"] = [t.strip() for t in tags if t.strip()]
            elif target == "split":
                ex["split"] = normal_split(value)
                if ex["split"] is None:
                    raise InputError(f"split {value!r} is not train, val(idation)/dev or test", where=at)
            elif target == "answer":
                raw_answer = value
            elif isinstance(value, (list, dict, bytes)):
                raise InputError(f"{target} must be text, got a {type(value).__name__}", where=at)
            else:
                ex[target] = str(value)
        if self.opts.prompt is not None:
            ex["prompt"] = render(self.opts.prompt, values, where=where)
        if self.opts.choices is not None:
            ex["choices"] = list(self.opts.choices)
        elif self.label_choices is not None:
            ex["choices"] = list(self.label_choices)
        if raw_answer is not None:
            ex["answer"] = self._answer(raw_answer, ex, f"{where} column {self.answer_col!r}")
        if self.opts.pair_by is not None and values.get(self.opts.pair_by) not in (None, ""):
            ex["pair_id"] = f"{self.opts.pair_by}={values[self.opts.pair_by]}"
            if self.opts.varies is not None:
                ex["varies"] = attribute_name(self.mapping[self.opts.varies])
        return ex

    @staticmethod
    def _answer(raw: Any, ex: dict[str, Any], where: str) -> str:
        choices = ex.get("choices")
        if isinstance(raw, (list, dict, bytes)):
            raise InputError(f"answer must be text, got a {type(raw).__name__}", where=where)
        text = str(raw)
        if choices and text not in choices and isinstance(raw, int) and not isinstance(raw, bool) \
                and 0 <= raw < len(choices):
            ex["attributes"]["answer_index"] = raw  # e.g. ScienceQA: the answer is an index into choices
            return choices[raw]
        if choices and text not in choices:
            raise InputError(f"answer {text!r} is not one of the choices {choices}", where=where)
        return text
