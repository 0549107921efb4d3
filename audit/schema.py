"""The shape of what a run writes: typed result rows and metric rows (schema version 2).

Version 1 packed structure into strings (`layer:3`, `head:2`, `a=x&b=y`, set ids in
`site`) that readers parsed back with regular expressions. Version 2 writes typed
columns instead; `group` stays as the human label docs/format.md and policies refer to
(e.g. `group`, `image->last`, `noise:0.05`) and is never parsed. Readers call
`upgrade_rows` / `upgrade_metrics`, which turn a version-1 frame into the version-2 form
(the only place that still parses v1 strings), so report, gate and dashboard read one
shape.

Torch-free: the dashboard and the report import it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

__all__ = ["SCHEMA_VERSION", "ROW_COLUMNS", "METRIC_COLUMNS", "DIM_COLUMNS", "ROW_DTYPES", "METRIC_DTYPES",
           "SCOPES", "rows_frame", "metrics_frame", "metric_records", "upgrade_rows", "upgrade_metrics",
           "summary_metrics_frame"]

SCHEMA_VERSION = 2

# Structured breakdowns a metric row can carry (beside CONTRACT's `group` label).
DIM_DTYPES: dict[str, str] = {
    "scope": "string",           # overall | group | intersection | comparison | breakdown
    "modality": "string",        # image | text | audio
    "variant": "string",         # ablation / condition / estimator name, e.g. "blank", "clopper_pearson"
    "layer": "Int64",            # decoder layer (first layer of a window)
    "layer_end": "Int64",        # last layer of a window (knockout)
    "head": "Int64",
    "position_group": "string",  # image | question | last | special, or a block pair "image->last"
    "attribute": "string",       # sensitive attribute name
    "attribute_value": "string",
    "attribute2": "string",      # second attribute of an intersection
    "attribute2_value": "string",
    "setting": "string",         # POPE negative-sampling setting
    "perturbation": "string",    # noise | blur | jpeg | occlusion | pgd
    "strength": "float64",
    "query": "string",           # retrieval query
}
DIM_COLUMNS = list(DIM_DTYPES)
SCOPES = ("overall", "group", "intersection", "comparison", "breakdown")

# Per-example rows (results.parquet): what every metric is computed from.
ROW_DTYPES: dict[str, str] = {
    "probe": "string", "metric": "string", "value": "float64", "example_id": "string", "group": "string",
    "site": "string",        # canonical hook site (an identifier, never parsed)
    "set_id": "string",      # counterfactual set (pair_id)
    "grid_row": "Int64", "grid_col": "Int64",  # image-grid cell (heatmaps, patches)
    # a text token (index, text) or, for modality "audio", a time segment (index, span "0.09-0.18s")
    "token_index": "Int64", "token": "string",
    "choice": "string",      # a candidate answer's text (with `token_index` = its position among the choices)
    "draw": "Int64",         # which random draw (a permutation, a resample) produced the row
    **{k: v for k, v in DIM_DTYPES.items() if k != "scope"},
}
ROW_COLUMNS = list(ROW_DTYPES)

METRIC_BASE = ["probe", "metric", "value", "ci_low", "ci_high", "group", "n"]
METRIC_DTYPES: dict[str, str] = {"probe": "string", "metric": "string", "value": "float64", "ci_low": "float64",
                                 "ci_high": "float64", "group": "string", "n": "Int64", **DIM_DTYPES}
METRIC_COLUMNS = list(METRIC_DTYPES)


def _typed(frame: pd.DataFrame, dtypes: Mapping[str, str]) -> pd.DataFrame:
    frame = frame.reindex(columns=list(dtypes))
    for col, dtype in dtypes.items():
        if dtype == "float64":
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("float64")
        elif dtype == "Int64":
            frame[col] = pd.to_numeric(frame[col], errors="coerce").round().astype("Int64")
        else:
            frame[col] = frame[col].astype("object").where(frame[col].notna(), None)
            frame[col] = frame[col].map(lambda v: v if v is None else str(v)).astype("string")
    return frame


def rows_frame(records: Iterable[Mapping]) -> pd.DataFrame:
    """Result rows with every v2 column, typed; unknown keys are an error (catches typos)."""
    records = list(records)
    for r in records:
        extra = set(r) - set(ROW_DTYPES)
        if extra:
            raise KeyError(f"unknown result-row column(s) {sorted(extra)}; known: {ROW_COLUMNS}")
    return _typed(pd.DataFrame.from_records(records, columns=ROW_COLUMNS), ROW_DTYPES)


def metrics_frame(records: Iterable[Mapping | tuple]) -> pd.DataFrame:
    """Metric rows with every v2 column. Tuples are (probe, metric, value, ci_low, ci_high, group, n)."""
    out = []
    for r in records:
        if isinstance(r, tuple):
            r = dict(zip(METRIC_BASE, r))
        extra = set(r) - set(METRIC_DTYPES)
        if extra:
            raise KeyError(f"unknown metric column(s) {sorted(extra)}; known: {METRIC_COLUMNS}")
        out.append(r)
    frame = _typed(pd.DataFrame.from_records(out, columns=METRIC_COLUMNS), METRIC_DTYPES)
    frame["scope"] = frame["scope"].fillna(pd.Series(np.where(frame["group"].isna(), "overall", "breakdown"),
                                                     index=frame.index, dtype="string"))
    return frame


def _plain(v):
    if v is None or v is pd.NA or (isinstance(v, float) and not np.isfinite(v)):
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v) if np.isfinite(v) else None
    return v


def metric_records(frame: pd.DataFrame) -> list[dict]:
    """summary.json's `metrics`: CONTRACT's seven keys plus `dims` (the non-null typed columns)."""
    out = []
    for row in frame.reindex(columns=METRIC_COLUMNS).to_dict(orient="records"):
        rec = {k: _plain(row[k]) for k in METRIC_BASE}
        rec["value"] = None if rec["value"] is None else float(rec["value"])
        for k in ("ci_low", "ci_high"):
            rec[k] = None if rec[k] is None else float(rec[k])
        rec["n"] = None if rec["n"] is None else int(rec["n"])
        rec["dims"] = {k: _plain(row[k]) for k in DIM_COLUMNS if _plain(row[k]) is not None}
        out.append(rec)
    return out


def summary_metrics_frame(summary: Mapping) -> pd.DataFrame:
    """The metrics of a summary (any schema version) as a typed v2 frame."""
    recs = []
    for m in summary.get("metrics") or []:
        if not isinstance(m, Mapping):
            continue
        rec = {k: m.get(k) for k in METRIC_BASE}
        dims = m.get("dims")
        if isinstance(dims, Mapping):
            rec.update({k: v for k, v in dims.items() if k in DIM_DTYPES})
        recs.append(rec)
    frame = metrics_frame(recs)
    return frame if int(summary.get("schema_version") or 1) >= 2 else upgrade_metrics(frame)


# ----------------------------------------------------------------------------- version 1
_LAYER = re.compile(r"^layer:(\d+)$")
_HEAD = re.compile(r"^head:(\d+)$")
_CELL = re.compile(r"^(\d+),(\d+)$")
_PATCH = re.compile(r"^patch:(\d+),(\d+)$")
_WORD = re.compile(r"^word:(\d+)$")
_TOKEN = re.compile(r"^(\d+):(.*)$")
_WINDOW_SITE = re.compile(r"^language\.blocks\.(\d+)-(\d+)$")
_BLOCK_SITE = re.compile(r"^language\.blocks\.(\d+)\.")
_PERTURB = re.compile(r"^([a-z]+):([0-9.]+)(/255)?$")
_AT = re.compile(r"^(.*)@(.*)$")


def _attrs(group: str) -> dict:
    """'a=x' -> one attribute; 'a=x&b=y' -> intersection; 'a' / 'a&b' -> comparison."""
    parts = group.split("&")
    out: dict = {}
    if all("=" in p for p in parts) and len(parts) <= 2:
        (a, _, v), *rest = [p.partition("=") for p in parts]
        out.update(attribute=a, attribute_value=v, scope="group" if not rest else "intersection")
        if rest:
            out.update(attribute2=rest[0][0], attribute2_value=rest[0][2])
    elif not any("=" in p for p in parts) and len(parts) <= 2:
        out.update(attribute=parts[0], scope="comparison")
        if len(parts) == 2:
            out["attribute2"] = parts[1]
    return out


def _v1_metric_dims(probe: str, metric: str, group) -> dict:
    if group is None or pd.isna(group):
        return {"scope": "overall"}
    g = str(group)
    if probe == "group_fairness":
        return _attrs(g)
    if probe in ("counterfactual_bias",):
        return {"attribute": g, "scope": "comparison"}
    if probe == "retrieval_skew":
        attr, _, query = g.partition("|")
        return {"attribute": attr, "query": query or None, "scope": "comparison" if not query else "breakdown"}
    if probe == "hallucination":
        return {"setting": g, "scope": "breakdown"}
    if probe == "robustness":
        m = _PERTURB.match(g)
        if g == "clean":
            return {"perturbation": "clean", "scope": "breakdown"}
        if m:
            return {"perturbation": m.group(1), "strength": float(m.group(2)), "scope": "breakdown"}
    if probe == "attention_knockout":
        m = _AT.match(g)
        if m:
            w = m.group(2).split(":")[-1]
            return {"position_group": m.group(1), "layer": int(w) if w.isdigit() else None, "scope": "breakdown"}
        return {"position_group": g, "scope": "breakdown"}
    if probe == "activation_patching":
        m = _AT.match(g)
        if m:
            lm = _LAYER.match(m.group(2))
            return {"position_group": m.group(1), "layer": int(lm.group(1)) if lm else None, "scope": "breakdown"}
    lm = _LAYER.match(g)
    if lm:
        return {"layer": int(lm.group(1)), "scope": "breakdown"}
    if probe == "modality_ablation" and metric == "accuracy":
        mod, _, var = g.partition(":")
        return {"modality": mod if var else None, "variant": var or mod, "scope": "breakdown"}
    return {"variant": g, "scope": "breakdown"}


def upgrade_metrics(frame: pd.DataFrame) -> pd.DataFrame:
    """A v1 metric frame with its typed dimensions derived from the `group` labels."""
    dims = [_v1_metric_dims(p, m, g) for p, m, g in zip(frame.probe, frame.metric, frame.group)]
    extra = pd.DataFrame.from_records(dims, index=frame.index, columns=DIM_COLUMNS)
    base = frame.reindex(columns=METRIC_BASE)
    return _typed(pd.concat([base, extra], axis=1), METRIC_DTYPES)


def _v1_row(r: Mapping) -> dict:
    out = {k: r.get(k) for k in ("probe", "metric", "value", "example_id", "group", "site")}
    probe, group, site, variant = r.get("probe"), r.get("group"), r.get("site"), r.get("variant")
    group, site, variant = (None if v is None or pd.isna(v) else str(v) for v in (group, site, variant))
    if site:
        bm = _BLOCK_SITE.match(site)
        if bm:
            out["layer"] = int(bm.group(1))
        wm = _WINDOW_SITE.match(site)
        if wm:
            out["layer"], out["layer_end"] = int(wm.group(1)), int(wm.group(2))
    if probe == "attention" and variant:
        hm = _HEAD.match(variant)
        if hm:
            out["head"] = int(hm.group(1))
        if group and _LAYER.match(group):
            out["layer"] = int(_LAYER.match(group).group(1))
        cm = _CELL.match(group or "")
        if cm and variant.startswith("grid:"):
            out["grid_row"], out["grid_col"] = int(cm.group(1)), int(cm.group(2))
    elif probe == "modality_ablation" and variant:
        mod, _, var = variant.partition(":")
        if mod == "layer_blank":
            out.update(modality="image", variant="layer_blank", layer=int(var))
        elif var:
            out.update(modality=mod, variant=var)
        else:
            out["variant"] = variant
    elif probe == "mm_shap" and variant:
        pm, wm = _PATCH.match(variant), _WORD.match(variant)
        if pm:
            out.update(modality="image", grid_row=int(pm.group(1)), grid_col=int(pm.group(2)))
        elif wm:
            out.update(modality="text", token_index=int(wm.group(1)))
    elif probe == "attribution" and variant:
        pm, tm = _PATCH.match(variant), _TOKEN.match(variant)
        if pm:
            out.update(modality="image", grid_row=int(pm.group(1)), grid_col=int(pm.group(2)))
        elif variant.startswith("token:"):
            out.update(modality="image", token_index=int(variant.split(":")[1]))
        elif tm:
            out.update(modality="text", token_index=int(tm.group(1)), token=tm.group(2))
    elif probe == "attention_knockout":
        out["position_group"] = group
    elif probe == "activation_patching":
        out["position_group"] = group
        if variant and _LAYER.match(variant):
            out["layer"] = int(_LAYER.match(variant).group(1))
    elif probe == "group_fairness" and group:
        out.update({k: v for k, v in _attrs(group).items() if k != "scope"})
    elif probe == "counterfactual_bias":
        out.update(attribute=group, attribute_value=variant, set_id=site, site=None)
    elif probe == "retrieval_skew":
        out.update(attribute=group, attribute_value=variant, site=None)
        if r.get("metric") == "set_member":
            out["set_id"] = site
        else:
            out["query"] = site
    elif probe == "hallucination":
        out["setting"] = group
    elif probe == "robustness" and group:
        m = _PERTURB.match(group)
        if group == "clean":
            out["perturbation"] = "clean"
        elif m:
            out.update(perturbation=m.group(1), strength=float(m.group(2)))
    elif probe == "typographic_attack":
        out["variant"] = variant
    elif probe == "privacy_audit":
        out["variant"] = site if r.get("metric") != "score" else None
        out["site"] = None
    else:
        out["variant"] = variant
    return out


def upgrade_rows(frame: pd.DataFrame, version: int) -> pd.DataFrame:
    """Rows of a run written with `version` as a typed v2 frame."""
    if version >= 2:
        return _typed(frame, ROW_DTYPES)
    return rows_frame(_v1_row(r) for r in frame.to_dict(orient="records"))
