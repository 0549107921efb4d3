"""RUN_DIR/samples.parquet (`mmaudit run --log-samples`): reading it safely and finding the
worst examples per probe, for the report's "Samples" section and the dashboard's viewer.

Only the file of that exact name directly inside the run folder is read (a regular file,
not a symlink, at most MAX_BYTES); never a path a summary or a store names. "Worst" is
decided from the transcript itself, the same way for every probe:
1. an answer that changed against the same example's intact input (variant "none");
2. then the lowest probability of the reference answer (the manifest's `answer`), from a
   softmax over the candidates' scores;
3. rows without a reference answer (no example id recorded, or none in the manifest) last,
   least confident prediction first.
Torch-free: the dashboard imports it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["samples_file", "read_samples", "sample_probes", "candidate_table", "rank", "worst", "why", "SAMPLES_NAME",
           "MAX_BYTES", "INTACT"]

SAMPLES_NAME = "samples.parquet"
MAX_BYTES = 4 * 2**30
INTACT = "none"  # the variant of the unmodified input (docs/format.md)
SHOWN = ["probe", "example_id", "variant", "call", "prompt", "candidates", "scores", "predicted", "generated"]


def samples_file(run_dir) -> Path | None:
    """RUN_DIR/samples.parquet when it is a regular file inside the run folder, else None."""
    if not run_dir or not isinstance(run_dir, (str, Path)):
        return None
    root = Path(run_dir)
    f = root / SAMPLES_NAME
    try:
        if not root.is_dir() or f.is_symlink() or not f.is_file() or f.stat().st_size > MAX_BYTES:
            return None
        if not f.resolve().is_relative_to(root.resolve()):
            return None
    except OSError:
        return None
    return f


def read_samples(run_dir, *, probe: str | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """The transcript rows (of one probe), or an empty frame when there is no readable file."""
    f = samples_file(run_dir)
    cols = columns or SHOWN
    if f is None:
        return pd.DataFrame(columns=cols)
    try:
        import pyarrow.parquet as pq

        have = set(pq.read_schema(f).names)
        frame = pd.read_parquet(f, columns=[c for c in cols if c in have],
                                filters=[("probe", "==", probe)] if probe is not None and "probe" in have else None)
    except Exception:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        return pd.DataFrame(columns=cols)
    return frame.reindex(columns=cols)


def sample_probes(run_dir) -> list[str]:
    frame = read_samples(run_dir, columns=["probe"])
    return sorted(str(p) for p in frame.probe.dropna().unique())


def _candidates(raw) -> list[str]:
    try:
        out = json.loads(raw) if isinstance(raw, str) else list(raw) if raw is not None else []
    except (TypeError, ValueError):
        return []
    return [str(c) for c in out] if isinstance(out, list) else []


def _scores(raw) -> list[float | None]:
    if raw is None or (isinstance(raw, float) and math.isnan(raw)):
        return []
    try:
        return [float(x) if math.isfinite(float(x)) else None for x in raw]
    except (TypeError, ValueError):
        return []


def _softmax(scores: list[float | None]) -> list[float | None]:
    if not scores or any(s is None for s in scores):
        return [None] * len(scores)
    a = np.asarray(scores, dtype=np.float64)
    e = np.exp(a - a.max())
    return (e / e.sum()).tolist()


def candidate_table(row: dict) -> pd.DataFrame:
    """One query's candidates with their scores and softmax share; the predicted one marked."""
    cands, scores = _candidates(row.get("candidates")), _scores(row.get("scores"))
    scores = scores if len(scores) == len(cands) else [None] * len(cands)
    probs = _softmax(scores)
    pred = row.get("predicted")
    return pd.DataFrame({"candidate": cands, "score": scores, "share (softmax over candidates)": probs,
                         "predicted": [c == pred for c in cands]})


def _text(v) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA else str(v)


def _column(f: pd.DataFrame, name: str, *, text: bool = False) -> list:
    """A column as a plain list, missing values as None (iterating pyarrow-backed strings is slow)."""
    values = f[name].to_numpy(dtype=object, na_value=None).tolist()
    return [None if v is None else str(v) for v in values] if text else values


def _shares(scores: list, cands: list[tuple], indices: list[np.ndarray]) -> list[np.ndarray]:
    """Per index array: the softmax share of candidate `index[i]` in row i (NaN where unknown),
    one softmax per row computed over all rows with the same number of candidates at once."""
    outs = [np.full(len(scores), np.nan) for _ in indices]
    n_cand = np.array([len(c) for c in cands], dtype=int)
    n_score = np.array([len(x) if isinstance(x, (list, tuple, np.ndarray)) else -1 for x in scores], dtype=int)
    for k in np.unique(n_cand[(n_cand == n_score) & (n_cand > 0)]):
        rows = np.where((n_cand == k) & (n_score == k))[0]
        a = np.array([np.asarray(scores[i], dtype=np.float64) for i in rows])
        a = np.where(np.isfinite(a), a, np.nan)
        e = np.exp(a - a.max(axis=1, keepdims=True))
        share = e / e.sum(axis=1, keepdims=True)
        for out, index in zip(outs, indices):
            ok = index[rows] >= 0
            out[rows[ok]] = share[np.where(ok)[0], index[rows][ok]]
    return outs


def rank(frame: pd.DataFrame, manifest: dict[str, dict]) -> pd.DataFrame:
    """Every row with `reference`, `p_reference`, `p_predicted`, `intact_answer`, `changed`, ranked worst
    first. Vectorised where it matters: a transcript holds up to 100,000 rows per work unit."""
    f = frame.reset_index(drop=True)
    parsed: dict[str, tuple] = {}
    cands = []
    for c in _column(f, "candidates"):
        if isinstance(c, str):
            if c not in parsed:  # a probe asks the same candidates again and again: parse each text once
                parsed[c] = tuple(_candidates(c))
            cands.append(parsed[c])
        else:
            cands.append(tuple(_candidates(c)))
    eids, preds, variants = (_column(f, c, text=True) for c in ("example_id", "predicted", "variant"))
    refs = []
    for e in eids:
        ans = (manifest.get(e) or {}).get("answer") if e is not None else None
        refs.append(ans if isinstance(ans, str) else None)
    ref_i = np.array([c.index(r) if r is not None and r in c else -1 for c, r in zip(cands, refs)], dtype=int)
    pred_i = np.array([c.index(p) if p is not None and p in c else -1 for c, p in zip(cands, preds)], dtype=int)
    scores = f.scores.tolist()
    p_ref, p_pred = _shares(scores, cands, [ref_i, pred_i])
    intact: dict[str, str] = {}
    for e, v, p in zip(eids, variants, preds):
        if e is not None and v == INTACT and p is not None:
            intact.setdefault(e, p)
    before = [intact.get(e) if e is not None and v != INTACT else None for e, v in zip(eids, variants)]
    changed = np.array([b is not None and p is not None and p != b for b, p in zip(before, preds)], dtype=bool)
    ranked = f.assign(reference=refs, p_reference=p_ref, p_predicted=p_pred, intact_answer=before, changed=changed)
    if ranked.empty:
        return ranked
    key = np.where(np.isnan(p_ref), np.nan_to_num(p_pred, nan=1.0), p_ref)
    order = np.lexsort((key, np.isnan(p_ref), ~changed))  # last key sorts first
    return ranked.iloc[order].reset_index(drop=True)


def why(r: dict) -> str:
    """What makes a ranked row notable, in words."""
    if r.get("changed"):
        return f"answer changed under {r.get('variant')}: {r.get('intact_answer')} -> {r.get('predicted')}"
    p = r.get("p_reference")
    if p is not None and not pd.isna(p):
        wrong = r.get("predicted") is not None and r.get("predicted") != r.get("reference")
        return ("wrong answer; " if wrong else "") + f"reference answer's share {p:.3f}"
    p = r.get("p_predicted")
    if p is not None and not pd.isna(p):
        return f"no reference answer known; predicted with share {p:.3f}"
    return "no scores recorded"


def worst(frame: pd.DataFrame, manifest: dict[str, dict], *, k: int = 5) -> pd.DataFrame:
    """The k worst rows of one probe's transcript (see the module docstring), one per example
    (rows without an example id each count as their own)."""
    ranked = rank(frame, manifest)
    if ranked.empty:
        return ranked
    seen = ranked.example_id.where(ranked.example_id.notna(), pd.Series(range(len(ranked))).astype(str) + "\0")
    return ranked[~seen.duplicated()].head(k).reset_index(drop=True)
