"""HTML text helpers of the report: every string from a run goes through `e` (or `wb`, which
also adds line-break opportunities to long tokens such as paths and hashes)."""
from __future__ import annotations

import html
import math
import re

__all__ = ["e", "wb", "fmt", "pill", "PILL_CLASS"]

_PUNCT = re.compile(r"(?<=[_/.,=&;:])")
_SPACE = re.compile(r"(\s+)")
# Badge CSS class of each status or verdict (anything else: the neutral grey badge).
PILL_CLASS = {"fail": "fail", "missing": "missing", "warnings": "warnings", "warning": "warnings",
              "partial": "partial", "complete": "complete", "pass": "pass", "skip": "skip",
              "no findings": "nofindings", "info": "info"}


def e(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def wb(x) -> str:
    """Escaped text with <wbr> break opportunities after _ / . , = & ; : and inside runs over 24 characters."""
    s = "" if x is None else str(x)
    if len(s) < 12:
        return html.escape(s, quote=True)
    out = []
    for piece in _PUNCT.split(s):
        for tok in _SPACE.split(piece):
            if len(tok) > 24 and not tok.isspace():
                out.append("<wbr>".join(html.escape(tok[i:i + 24], quote=True) for i in range(0, len(tok), 24)))
            else:
                out.append(html.escape(tok, quote=True))
        out.append("<wbr>")
    return "".join(out[:-1])


def fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "—" if not math.isfinite(x) else f"{x:.4g}"
    return str(x)


def pill(status) -> str:
    """A badge: the status in capitals on its colour (unknown statuses grey)."""
    s = str(status)
    return f'<span class="pill {PILL_CLASS.get(s.lower(), "other")}">{e(s.upper())}</span>'
