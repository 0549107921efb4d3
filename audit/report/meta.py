"""What the report and the dashboard know about probes and metric rows, all from the catalog.

Section and page membership, titles, metric labels, units, meanings and directions come
from `audit.catalog`; breakdowns come from the typed columns of `audit.schema` (never from
parsing `group` labels). Adding a probe to the catalog is enough for it to appear in its
report section and dashboard page. Torch-free: the dashboard imports this module.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import pandas as pd

from audit import catalog
from audit.catalog import ProbeSpec

__all__ = ["specs", "spec_of", "probes_where", "expected_probes", "metric_label", "metric_meaning", "metric_unit",
           "direction", "direction_text", "axis_title", "unit_text", "dims_label", "row_labels", "meanings",
           "is_missing", "ordered_metrics", "SCOPE_TITLES", "SCOPE_SHORT"]

# What a metric row's `scope` says about it (table captions in both readers).
SCOPE_TITLES = {
    "overall": "Overall",
    "group": "Per group (one row per value of a sensitive attribute)",
    "intersection": "Per intersection (groups defined by two attributes at once)",
    "comparison": "Comparisons between groups (differences, ratios, tests per attribute)",
    "breakdown": "Breakdowns (per condition, ablation, layer or position group)",
}
SCOPE_SHORT = {"overall": "overall", "group": "per group", "intersection": "per intersection",
               "comparison": "per attribute", "breakdown": "by condition"}
# How each catalog unit reads on an axis.
UNITS = {"share": "share, 0 to 1", "probability": "probability, 0 to 1", "ratio": "ratio", "nats": "nats",
         "count": "count", "epsilon": "epsilon", "p-value": "p-value, 0 to 1", "score": "score"}


def is_missing(v) -> bool:
    if v is None or v is pd.NA:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def specs(*, plugins: bool = False) -> dict[str, ProbeSpec]:
    """Every catalog spec; with `plugins`, also installed plugin probes (may import their code)."""
    if plugins:
        try:
            from probes.base import available

            return dict(available())
        except Exception:  # noqa: BLE001 - a broken plugin must not stop a report
            pass
    return catalog.all_specs()


def spec_of(probe: str) -> ProbeSpec | None:
    return catalog.spec_of(str(probe))


def _catalog_order(names: Iterable[str]) -> list[str]:
    order = {n: i for i, n in enumerate(catalog.all_specs())}
    return sorted(set(names), key=lambda n: (order.get(n, len(order)), n))


def probes_where(probes: Iterable[str], *, section: str | None = None, page: str | None = None) -> list[str]:
    """The probes among `probes` whose catalog spec puts them in `section` / on `page`."""
    out = []
    for p in probes:
        s = spec_of(p)
        if s is None:
            continue
        if (section is None or s.section == section) and (page is None or s.page == page):
            out.append(p)
    return _catalog_order(out)


def expected_probes(*, section: str | None = None, page: str | None = None) -> list[str]:
    """Every probe the catalog puts in `section` / on `page`."""
    return probes_where(catalog.all_specs(), section=section, page=page)


def metric_label(probe: str, metric: str) -> str:
    m = catalog.metric_spec(str(probe), str(metric))
    return m.label if m else str(metric)


def metric_meaning(probe: str, metric: str) -> str | None:
    m = catalog.metric_spec(str(probe), str(metric))
    return m.meaning if m else None


def metric_unit(probe: str, metric: str) -> str | None:
    m = catalog.metric_spec(str(probe), str(metric))
    return m.unit if m else None


def unit_text(probe: str, metric: str) -> str | None:
    unit = metric_unit(probe, metric)
    return UNITS.get(unit, unit) if unit else None


def axis_title(probe: str, metric: str) -> str:
    """"Label (unit)" of one metric: what an axis that shows it is called."""
    unit = unit_text(probe, metric)
    return metric_label(probe, metric) + (f" ({unit})" if unit else "")


def direction_text(probe: str, metric: str) -> str:
    """Which way is better, in words (with the catalog's target when it has one)."""
    m = catalog.metric_spec(str(probe), str(metric))
    if m is None:
        return "not in this mmaudit's catalog"
    if m.target is not None:
        return f"closer to {m.target:g} is better"
    return {"higher": "higher is better", "lower": "lower is better"}.get(m.direction, "no agreed direction")


def direction(probe: str, metric: str) -> int:
    """+1 higher is better, -1 lower is better, 0 no agreed direction (audit.catalog.direction)."""
    return catalog.direction(str(probe), str(metric))


def ordered_metrics(probe: str, metrics: Iterable[str]) -> list[str]:
    """`metrics` in the order the probe's spec declares them, unknown ones last."""
    s = spec_of(probe)
    order = {m: i for i, m in enumerate(s.metric_names)} if s else {}
    return sorted(set(metrics), key=lambda m: (order.get(m, len(order)), m))


def meanings(frame: pd.DataFrame) -> list[str]:
    """"label (unit): meaning" for each (probe, metric) of a metric frame, in first-seen order."""
    out, seen = [], set()
    for p, m in zip(frame.probe, frame.metric):
        if (p, m) in seen:
            continue
        seen.add((p, m))
        meaning = metric_meaning(p, m)
        if meaning:
            unit = metric_unit(p, m)
            out.append(f"{metric_label(p, m)} ({m}, {unit}): {meaning}")
    return out


def _num(v) -> str:
    f = float(v)
    return str(int(f)) if math.isfinite(f) and f.is_integer() else f"{f:g}"


def dims_label(row: Mapping) -> str:
    """A short human label of a row's typed breakdown ("group = a", "layer 3", "noise 0.05")."""
    def get(k):
        v = row.get(k)
        return None if is_missing(v) else v

    parts = []
    attr = get("attribute")
    if attr is not None:
        first = f"{attr} = {get('attribute_value')}" if get("attribute_value") is not None else str(attr)
        if get("attribute2") is not None:
            second = (f"{get('attribute2')} = {get('attribute2_value')}" if get("attribute2_value") is not None
                      else str(get("attribute2")))
            first = f"{first} & {second}"
        parts.append(first)
    if get("query") is not None:
        parts.append(f"query: {get('query')}")
    if get("setting") is not None:
        parts.append(str(get("setting")))
    if get("perturbation") is not None:
        strength = get("strength")
        parts.append(str(get("perturbation")) + (f" {_num(strength)}" if strength is not None else ""))
    if get("position_group") is not None:
        parts.append(str(get("position_group")))
    if get("layer") is not None:
        end = get("layer_end")
        parts.append(f"layers {int(get('layer'))}-{int(end)}" if end is not None else f"layer {int(get('layer'))}")
    if get("head") is not None:
        parts.append(f"head {int(get('head'))}")
    if get("modality") is not None and get("variant") is not None:
        parts.append(f"{get('modality')} · {get('variant')}")
    elif get("variant") is not None:
        parts.append(str(get("variant")))
    return " · ".join(parts) if parts else "overall"


def row_labels(frame: pd.DataFrame) -> list[str]:
    return [dims_label(r) for r in frame.to_dict(orient="records")]

