"""Plotly figures as plain JSON dicts ({"data": [...], "layout": {...}}).

Built by hand rather than through plotly.graph_objects, so the JSON report stays readable
(plain lists, no base64 typed arrays) and nothing here imports plotly. Every label that
comes from a run (groups, example ids) is HTML-escaped: plotly renders a few tags in text,
and an escaped string is shown literally. Figures carry no width: they fill their container
(the report's column, the dashboard's page), and each axis shows one metric, named by its
catalog label and unit.
"""
from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["bar_ci", "lines", "heatmap", "before_after", "scatter"]

FONT = {"family": "Helvetica, Arial, sans-serif", "size": 12, "color": "#222"}
BLUE, RED, GREEN, GREY = "#3b6ea8", "#c0392b", "#2e8b57", "#8a8a8a"


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _txt(s) -> str:
    # <, > and & are what plotly's text renderer parses; it shows the entities literally.
    return html.escape(str(s), quote=False)


def _layout(title: str, *, height: int, xaxis: dict | None = None, yaxis: dict | None = None, **extra) -> dict:
    return {"title": {"text": _txt(title), "font": {"size": 14}}, "autosize": True, "height": height,
            "font": FONT, "margin": {"l": 10, "r": 20, "t": 50, "b": 50}, "paper_bgcolor": "white",
            "plot_bgcolor": "#fafafa", "xaxis": {"gridcolor": "#e5e5e5", "zerolinecolor": "#999", **(xaxis or {})},
            "yaxis": {"gridcolor": "#e5e5e5", "automargin": True, **(yaxis or {})}, "showlegend": False, **extra}


def bar_ci(title: str, labels: Sequence[str], values: Sequence, lo: Sequence | None = None,
           hi: Sequence | None = None, *, axis: str = "value") -> dict:
    """Horizontal bars with 95% interval whiskers (labels top to bottom in the given order)."""
    labels = [_txt(x) for x in labels]
    vals = [_num(v) for v in values]
    trace = {"type": "bar", "orientation": "h", "x": vals, "y": labels, "marker": {"color": BLUE},
             "hovertemplate": "%{y}: %{x:.4g}<extra></extra>"}
    if lo is not None and hi is not None:
        plus = [(_num(h) - v) if v is not None and _num(h) is not None else None for v, h in zip(vals, hi)]
        minus = [(v - _num(low)) if v is not None and _num(low) is not None else None for v, low in zip(vals, lo)]
        trace["error_x"] = {"type": "data", "symmetric": False, "array": [max(p, 0) if p is not None else 0 for p in plus],
                            "arrayminus": [max(m, 0) if m is not None else 0 for m in minus], "color": "#333",
                            "thickness": 1.2, "width": 4}
    height = 110 + 26 * max(len(labels), 2)
    return {"data": [trace], "layout": _layout(title, height=height, xaxis={"title": {"text": _txt(axis)}},
                                               yaxis={"autorange": "reversed", "type": "category"})}


def lines(title: str, series: dict[str, list[tuple]], *, xaxis: str, yaxis: str) -> dict:
    """One line per series; points (x, value[, lo, hi]) with a shaded interval band."""
    data = []
    palette = [BLUE, RED, GREEN, "#8e44ad", "#d35400", GREY]
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts, key=lambda p: p[0])
        xs = [p[0] for p in pts]
        colour = palette[i % len(palette)]
        if pts and len(pts[0]) >= 4:
            data.append({"type": "scatter", "mode": "lines", "x": xs + xs[::-1],
                         "y": [_num(p[3]) for p in pts] + [_num(p[2]) for p in pts][::-1], "fill": "toself",
                         "fillcolor": "rgba(59,110,168,0.12)", "line": {"width": 0}, "hoverinfo": "skip",
                         "showlegend": False})
        data.append({"type": "scatter", "mode": "lines+markers", "name": _txt(name), "x": xs,
                     "y": [_num(p[1]) for p in pts], "line": {"color": colour}})
    lay = _layout(title, height=360, xaxis={"title": {"text": _txt(xaxis)}, "dtick": 1},
                  yaxis={"title": {"text": _txt(yaxis)}}, showlegend=len(series) > 1,
                  legend={"orientation": "h", "y": -0.3, "x": 0})
    lay["margin"]["b"] = 90
    return {"data": data, "layout": lay}


def heatmap(title: str, z: list[list], *, x: Sequence, y: Sequence, xaxis: str, yaxis: str,
            colorbar: str = "") -> dict:
    trace = {"type": "heatmap", "z": [[_num(v) for v in row] for row in z], "x": [_txt(v) for v in x],
             "y": [_txt(v) for v in y], "colorscale": "Viridis", "hovertemplate": "%{y} %{x}: %{z:.4g}<extra></extra>",
             "colorbar": {"title": {"text": _txt(colorbar), "side": "right"}}}
    lay = _layout(title, height=120 + 28 * max(len(y), 3), xaxis={"title": {"text": _txt(xaxis)}, "type": "category"},
                  yaxis={"title": {"text": _txt(yaxis)}, "type": "category", "autorange": "reversed"})
    return {"data": [trace], "layout": lay}


def before_after(title: str, labels: Sequence[str], before: Sequence, after: Sequence,
                 better: Sequence[bool | None], *, axis: str) -> dict:
    """One metric before and after (two bars per row): grey before; after green where the change
    is an improvement, red where worse, blue where the metric has no agreed direction."""
    labels = [_txt(x) for x in labels]
    colours = [GREEN if b is True else RED if b is False else BLUE for b in better]
    data = [{"type": "bar", "orientation": "h", "name": "before", "x": [_num(v) for v in before], "y": labels,
             "marker": {"color": "#b8bec8"}, "hovertemplate": "%{y} before: %{x:.4g}<extra></extra>"},
            {"type": "bar", "orientation": "h", "name": "after", "x": [_num(v) for v in after], "y": labels,
             "marker": {"color": colours}, "hovertemplate": "%{y} after: %{x:.4g}<extra></extra>"}]
    lay = _layout(title, height=130 + 44 * max(len(labels), 2), xaxis={"title": {"text": _txt(axis)}},
                  yaxis={"autorange": "reversed", "type": "category"}, barmode="group", showlegend=True,
                  legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"})
    return {"data": data, "layout": lay}


def _padded(values) -> list | None:
    v = [x for x in values if x is not None]
    if not v:
        return None
    lo, hi = min(v), max(v)
    pad = (hi - lo) * 0.15 or abs(hi) * 0.1 or 0.1
    return [lo - pad, hi + pad]


def scatter(title: str, points: list[tuple], *, xaxis: str, yaxis: str) -> dict:
    """Labelled points (x, y, label)."""
    xs, ys = [_num(p[0]) for p in points], [_num(p[1]) for p in points]
    trace = {"type": "scatter", "mode": "markers+text", "x": xs, "y": ys, "text": [_txt(p[2]) for p in points],
             "textposition": "top center", "cliponaxis": False, "marker": {"size": 10, "color": BLUE}}
    lay = _layout(title, height=360, xaxis={"title": {"text": _txt(xaxis)}, "range": _padded(xs)},
                  yaxis={"title": {"text": _txt(yaxis)}, "range": _padded(ys)})
    return {"data": [trace], "layout": lay}
