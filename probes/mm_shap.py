"""`mm_shap`: each modality's share of the Shapley attribution (Parcalabescu & Frank 2023).

Players are the prompt's words and a g×g grid of image patch groups. A coalition keeps its
players and masks the rest (words become "_", patches become mid-grey). The value of a
coalition is the log-probability of the answer the model gives on the intact input
(generative) or its matching score (dual encoder). Shapley values are estimated by
antithetic permutation sampling (each permutation and its reverse); every coalition of a
permutation is one batched forward. MM-SHAP's shares are
    v_shap = Σ|φ_image| / (Σ|φ_image| + Σ|φ_text|),  t_shap = 1 − v_shap,
and the sampling error reported with each value is the standard error of v_shap over the
sampled permutation pairs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import zlib

import numpy as np
import pandas as pd
from PIL import Image

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, bootstrap_ci, register, rows_frame

GRID = 4
PERMUTATION_PAIRS = 4
MASK_WORD = "_"


def shapley_permutations(value: Callable[[Sequence[np.ndarray]], np.ndarray], n_players: int, *,
                         pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Per-permutation Shapley estimates, shape [2·pairs, n_players].

    `value` maps a list of boolean coalition masks to their values (one batched call per
    permutation). Averaging the rows gives the estimate; with 2 players and one antithetic
    pair it is exact.
    """
    out = []
    for _ in range(pairs):
        order = rng.permutation(n_players)
        for perm in (order, order[::-1]):
            masks = [np.zeros(n_players, dtype=bool)]
            for p in perm:
                m = masks[-1].copy()
                m[p] = True
                masks.append(m)
            v = np.asarray(value(masks), dtype=np.float64)
            phi = np.empty(n_players)
            phi[perm] = np.diff(v)
            out.append(phi)
    return np.array(out)


def modality_shares(phi: np.ndarray, n_text: int) -> tuple[float, float]:
    t, v = np.abs(phi[..., :n_text]).sum(-1), np.abs(phi[..., n_text:]).sum(-1)
    total = t + v
    with np.errstate(invalid="ignore", divide="ignore"):
        return v / total, t / total


def mask_image(img: Image.Image, keep: np.ndarray, grid: int) -> Image.Image:
    arr = np.asarray(img).copy()
    h, w = arr.shape[:2]
    for k, kept in enumerate(keep):
        if not kept:
            r, c = divmod(k, grid)
            arr[r * h // grid:(r + 1) * h // grid, c * w // grid:(c + 1) * w // grid] = 128
    return Image.fromarray(arr)


@register
class MMShap(Probe):
    info = ProbeInfo(
        name="mm_shap",
        category="interpretability",
        description="Shares of Shapley attribution carried by the image (v_shap) and the text (t_shap); "
                    "they sum to 1.",
        citation="Parcalabescu & Frank 2023, MM-SHAP: A Performance-agnostic Metric for Measuring Multimodal "
                 "Contributions in Vision and Language Models & Tasks (ACL)",
        cost_per_example=2 * PERMUTATION_PAIRS * (GRID * GRID + 10),
        metrics=("v_shap", "t_shap"),
    )
    unit_size = 8

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        records = []
        for e in data:
            # per-example stream: an example's estimate does not depend on its neighbours
            rng = np.random.default_rng([seed, zlib.crc32(e.id.encode())])
            img = data.image(e)
            cands = tuple(e.choices or (e.answer,))
            base = adapter.score([Query(e.prompt, img, cands)])[0]
            target = int(np.argmax(base)) if e.answer is None or e.answer not in cands else cands.index(e.answer)
            words = e.prompt.split()
            n_text = len(words)

            def value(masks, words=words, img=img, cands=cands, target=target, n_text=n_text):
                qs = [Query(" ".join(w if m else MASK_WORD for w, m in zip(words, mask[:n_text])),
                            mask_image(img, mask[n_text:], GRID), cands) for mask in masks]
                return [s[target] for s in adapter.score(qs, batch_size=len(qs))]

            phi = shapley_permutations(value, n_text + GRID * GRID, pairs=PERMUTATION_PAIRS, rng=rng)
            v, t = modality_shares(phi, n_text)
            est = phi.mean(0)
            v_hat, t_hat = modality_shares(est, n_text)
            if not np.isfinite(v_hat):
                continue  # the answer's value does not depend on any player: shares undefined
            pair_v = np.nanmean(v.reshape(PERMUTATION_PAIRS, 2), axis=1)
            se = float(np.nanstd(pair_v, ddof=1) / np.sqrt(PERMUTATION_PAIRS)) if PERMUTATION_PAIRS > 1 else float("nan")
            name = self.info.name
            records += [dict(probe=name, metric="v_shap", value=float(v_hat), example_id=e.id, group=None, site=None, variant=None),
                        dict(probe=name, metric="t_shap", value=float(t_hat), example_id=e.id, group=None, site=None, variant=None),
                        dict(probe=name, metric="v_shap_se", value=se, example_id=e.id, group=None, site=None, variant=None)]
            records += [dict(probe=name, metric="shapley", value=float(x), example_id=e.id,
                             group="text" if k < n_text else "image", site=None,
                             variant=f"word:{k}" if k < n_text else f"patch:{(k - n_text) // GRID},{(k - n_text) % GRID}")
                        for k, x in enumerate(est)]
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        for metric in ("v_shap", "t_shap"):
            v = rows[rows.metric == metric].sort_values("example_id").value
            if v.empty:
                continue
            lo, hi = bootstrap_ci(v.values, seed=seed)
            out.append((self.info.name, metric, float(v.mean()), lo, hi, None, int(v.size)))
        se = rows[rows.metric == "v_shap_se"].value.dropna()
        if not se.empty:  # sampling error of the mean share: per-example errors combined
            out.append((self.info.name, "v_shap_sampling_se", float(np.sqrt((se ** 2).sum()) / len(se)),
                        None, None, None, int(se.size)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)
