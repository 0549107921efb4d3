"""The report's building blocks: plain JSON-able dicts that `render` turns into HTML.

A section is {"id", "title", "status", "references", "notes", "blocks"}; a block is one of
text, note, kv (key/value pairs), list, table, figure, gallery. Numbers stay numbers (None
for NaN) so the JSON report is data, and the HTML formats them.
"""
from __future__ import annotations

import math
import re

import pandas as pd

from audit.report.regulation import references_for

__all__ = ["section", "text", "note", "kv", "bullets", "table", "figure", "gallery", "num", "metric_table",
           "group_kind", "better_direction", "CATEGORY_FALLBACK"]

# Category of the probes named in CONTRACT.md, used when probe metadata cannot be loaded.
CATEGORY_FALLBACK = {
    "modality_ablation": "interpretability", "attention": "interpretability", "attention_knockout": "interpretability",
    "mm_shap": "interpretability", "attribution": "interpretability", "activation_patching": "interpretability",
    "counterfactual_bias": "fairness", "group_fairness": "fairness", "retrieval_skew": "fairness",
    "hallucination": "safety", "typographic_attack": "safety", "robustness": "safety", "privacy_audit": "privacy",
}


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


def metric_table(df: pd.DataFrame, caption: str | None = None, *, with_probe: bool = True) -> dict:
    cols = (["probe"] if with_probe else []) + ["metric", "group", "value", "95% CI low", "95% CI high", "n"]
    rows = []
    for r in df.itertuples(index=False):
        rows.append(([r.probe] if with_probe else []) + [r.metric, r.group, num(r.value), num(r.ci_low),
                                                         num(r.ci_high), None if pd.isna(r.n) else int(r.n)])
    return table(cols, rows, caption)


_SINGLE = re.compile(r"^[^&=]+=[^&]*$")


def group_kind(group) -> str:
    """overall | disaggregated (attr=value) | intersectional (a=x&b=y) | comparison (attr, a&b) | other."""
    if group is None or (isinstance(group, float) and math.isnan(group)):
        return "overall"
    g = str(group)
    if "=" in g and "&" in g:
        return "intersectional"
    if _SINGLE.match(g):
        return "disaggregated"
    return "comparison"


def better_direction(metric: str) -> int:
    """+1 higher is better, -1 lower is better, 0 no agreed direction (colours before/after deltas)."""
    m = str(metric).lower()
    if any(k in m for k in ("mia", "epsilon", "tpr_at", "difference", "flip", "gap", "bias", "success", "skew",
                            "ndkl", "incomplete")):
        return -1
    if any(k in m for k in ("accuracy", "f1", "precision", "recall", "parity_ratio", "odds_ratio")):
        return 1
    return 0
