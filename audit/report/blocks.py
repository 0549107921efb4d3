"""The report's building blocks: plain JSON-able dicts that `render` turns into HTML.

A section is {"id", "title", "status", "references", "notes", "blocks"}; a block is one of
heading, text, note, kv (key/value pairs), list, table, figure, gallery. Numbers stay
numbers (None for NaN) so the JSON report is data, and the HTML formats them.
"""
from __future__ import annotations

import math

import pandas as pd

from audit.report import meta
from audit.report.regulation import references_for

__all__ = ["section", "heading", "text", "note", "kv", "bullets", "table", "figure", "gallery", "num",
           "metric_table", "what_this_means"]


def num(x):
    """A finite float or None."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _cell(x):
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, (int, float)) or hasattr(x, "item"):
        v = x.item() if hasattr(x, "item") else x
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        return v
    if x is pd.NA or x is pd.NaT:
        return None
    return str(x)


def section(sid: str, title: str, blocks: list, *, status: str = "complete", notes: list | None = None) -> dict:
    return {"id": sid, "title": title, "status": status, "references": references_for(sid),
            "notes": list(notes or []), "blocks": [b for b in blocks if b]}


def text(s: str) -> dict:
    return {"type": "text", "text": str(s)}


def note(s: str, level: str = "info") -> dict:
    return {"type": "note", "level": level, "text": str(s)}


def kv(items, caption: str | None = None) -> dict:
    return {"type": "kv", "caption": caption, "items": [[str(k), _cell(v)] for k, v in items]}


def bullets(items, caption: str | None = None) -> dict | None:
    items = [str(i) for i in items]
    return {"type": "list", "caption": caption, "items": items} if items else None


def table(columns, rows, caption: str | None = None, *, status_col: str | None = None, limit: int = 400) -> dict:
    rows = [[_cell(c) for c in r] for r in rows]
    out = {"type": "table", "caption": caption, "columns": [str(c) for c in columns], "rows": rows[:limit],
           "status_col": status_col}
    if len(rows) > limit:
        out["truncated"] = len(rows) - limit
    return out


def figure(fig: dict, caption: str | None = None) -> dict:
    return {"type": "figure", "caption": caption, "figure": fig}


def gallery(groups: list[dict], caption: str | None = None) -> dict | None:
    """groups: [{"title", "items": [{"title", "png" (base64) | None, "lines": [str]}]}]."""
    return {"type": "gallery", "caption": caption, "groups": groups} if groups else None


def heading(s: str) -> dict:
    return {"type": "heading", "text": str(s)}


def what_this_means(frame: pd.DataFrame) -> dict | None:
    """The catalog's one-line meaning of every metric in `frame` (shown under its table or chart)."""
    return bullets(meta.meanings(frame), "What this means")


def metric_table(df: pd.DataFrame, caption: str | None = None, *, with_probe: bool = True) -> dict:
    """Typed metric rows: the catalog label, the breakdown from typed columns, and the
    CONTRACT `group` label a policy names."""
    cols = (["probe"] if with_probe else []) + ["metric", "measure", "breakdown", "group", "value", "95% CI low",
                                                "95% CI high", "n", "unit"]
    rows = []
    for r in df.to_dict(orient="records"):
        n = r.get("n")
        rows.append(([r["probe"]] if with_probe else []) + [
            r["metric"], meta.metric_label(r["probe"], r["metric"]), meta.dims_label(r),
            None if meta.is_missing(r.get("group")) else r["group"], num(r["value"]), num(r["ci_low"]),
            num(r["ci_high"]), None if meta.is_missing(n) else int(n), meta.metric_unit(r["probe"], r["metric"])])
    return table(cols, rows, caption)
