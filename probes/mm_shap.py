"""`mm_shap`: each modality's share of the Shapley attribution (Parcalabescu & Frank 2023).

Players are the prompt's words and a g x g grid of image patches. As in the MM-SHAP
reference code, the grid balances the two modalities: g = ceil(sqrt(number of words)),
at least 2 (so an image is never a single player), i.e. about as many patches as words.
A coalition keeps its players and masks the rest (words become "_", patches mid-grey). The
value of a coalition is the model's score of the answer (the reference answer, else the
intact input's choice): its log-probability (generative) or matching score (dual encoder).

Shapley values are estimated by antithetic permutation sampling (each permutation and its
reverse); the distinct coalitions of one example are scored together, `batch_size` at a
time. MM-SHAP's shares are
    v_shap = sum|phi_image| / (sum|phi_image| + sum|phi_text|),  t_shap = 1 - v_shap.
Sampling error: the antithetic pairs are independent draws, so each player's `shapley_se`
is the standard error of its per-pair estimates, and `v_shap_se` is the jackknife (leave
one pair out) standard error of v_shap, the ratio the probe reports. An example whose
answer score depends on no player has no shares (0/0) and writes no rows.

Audio: on a model that reads audio (`capabilities.modalities`), an example's clip is cut
into as many equal time segments as the image would have patches (g x g, the same balance);
a masked segment is silence (zeros, the clip keeps its length). Then
    a_shap = sum|phi_audio| / sum|phi|,  with v_shap and t_shap the image and text shares,
all three summing to 1; segment rows have modality "audio", `token_index` = the segment
and `token` = its time span ("0.00-0.10s"). Examples without audio take the image-only path
above unchanged.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from audit.adapters.base import Audio, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Example
from audit.stats import mean_ci, seed_for
from probes.base import Plan, Probe, Unit, metrics_frame, register, rows_frame
from probes.modality_ablation import plan_readable, readable_examples

PERMUTATION_PAIRS = 4
MASK_WORD = "_"
MIN_GRID = 2


def grid_side(n_text: int) -> int:
    """Patches per side: ceil(sqrt(words)), at least MIN_GRID (MM-SHAP's balance of players)."""
    return max(MIN_GRID, math.ceil(math.sqrt(n_text)))


def permutation_chains(n_players: int, *, pairs: int, rng: np.random.Generator):
    """The 2·pairs antithetic permutations, their distinct prefix coalitions, and per
    permutation the indices of its n_players + 1 coalitions in that list."""
    perms = []
    for _ in range(pairs):
        order = rng.permutation(n_players)
        perms += [order, order[::-1]]
    masks: list[np.ndarray] = []
    index: dict[bytes, int] = {}
    chains = []
    for perm in perms:
        m = np.zeros(n_players, dtype=bool)
        chain = []
        for step in range(n_players + 1):
            if step:
                m = m.copy()
                m[perm[step - 1]] = True
            key = m.tobytes()
            if key not in index:
                index[key] = len(masks)
                masks.append(m)
            chain.append(index[key])
        chains.append(chain)
    return perms, masks, chains


def shapley_permutations(value: Callable[[Sequence[np.ndarray]], Sequence[float]], n_players: int, *,
                         pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Per-permutation Shapley estimates, shape [2·pairs, n_players] (rows 2k, 2k+1: pair k).

    `value` maps a list of boolean coalition masks to their values; it is called once with
    every distinct coalition. Averaging the rows gives the estimate; with 2 players and one
    antithetic pair it is exact.
    """
    perms, masks, chains = permutation_chains(n_players, pairs=pairs, rng=rng)
    v = np.asarray(value(masks), dtype=np.float64)
    out = np.empty((len(perms), n_players))
    for r, (perm, chain) in enumerate(zip(perms, chains)):
        out[r, perm] = np.diff(v[chain])
    return out


def distinct_coalitions_bound(n_players: int, pairs: int) -> int:
    """At most the empty and full coalitions plus n_players - 1 new ones per permutation."""
    return 2 + 2 * pairs * max(n_players - 1, 0)


def modality_shares(phi: np.ndarray, n_text: int) -> tuple[float, float]:
    t, v = np.abs(phi[..., :n_text]).sum(-1), np.abs(phi[..., n_text:]).sum(-1)
    total = t + v
    with np.errstate(invalid="ignore", divide="ignore"):
        return v / total, t / total


def sampling_errors(phi: np.ndarray, n_text: int) -> tuple[np.ndarray, float]:
    """(standard error per player, jackknife standard error of v_shap) over antithetic pairs."""
    pairs = phi.shape[0] // 2
    if pairs < 2:
        return np.full(phi.shape[1], np.nan), float("nan")
    per_pair = phi.reshape(pairs, 2, -1).mean(1)
    se_player = per_pair.std(axis=0, ddof=1) / np.sqrt(pairs)
    loo = (per_pair.sum(0)[None] - per_pair) / (pairs - 1)  # estimate without pair j
    v_loo = modality_shares(loo, n_text)[0]
    if not np.all(np.isfinite(v_loo)):
        return se_player, float("nan")
    se_v = float(np.sqrt((pairs - 1) / pairs * ((v_loo - v_loo.mean()) ** 2).sum()))
    return se_player, se_v


def mask_image(img: Image.Image, keep: np.ndarray, grid: int) -> Image.Image:
    arr = np.asarray(img).copy()
    h, w = arr.shape[:2]
    for k, kept in enumerate(keep):
        if not kept:
            r, c = divmod(k, grid)
            arr[r * h // grid:(r + 1) * h // grid, c * w // grid:(c + 1) * w // grid] = 128
    return Image.fromarray(arr)


def mask_audio(clip: Audio, keep: np.ndarray) -> Audio:
    """The clip with every segment not kept silenced (len(keep) equal segments; length unchanged)."""
    w = np.array(clip.waveform)
    n, k = w.size, len(keep)
    for s, kept in enumerate(keep):
        if not kept:
            w[s * n // k:(s + 1) * n // k] = 0.0
    return Audio(w, clip.sample_rate)


def group_shares(phi: np.ndarray, sizes: Sequence[int]) -> list:
    """Share of sum|phi| carried by each consecutive block of players (`sizes` players each)."""
    edges = np.cumsum([0, *sizes])
    parts = [np.abs(phi[..., a:b]).sum(-1) for a, b in zip(edges[:-1], edges[1:])]
    total = sum(parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return [p / total for p in parts]


def group_sampling_errors(phi: np.ndarray, sizes: Sequence[int]) -> tuple[np.ndarray, list[float]]:
    """`sampling_errors` for any number of player blocks: per-player SE, jackknife SE of each share."""
    pairs = phi.shape[0] // 2
    if pairs < 2:
        return np.full(phi.shape[1], np.nan), [float("nan")] * len(sizes)
    per_pair = phi.reshape(pairs, 2, -1).mean(1)
    se_player = per_pair.std(axis=0, ddof=1) / np.sqrt(pairs)
    loo = (per_pair.sum(0)[None] - per_pair) / (pairs - 1)
    out = []
    for share in group_shares(loo, sizes):
        ok = np.all(np.isfinite(share))
        out.append(float(np.sqrt((pairs - 1) / pairs * ((share - share.mean()) ** 2).sum())) if ok else float("nan"))
    return se_player, out


def _target(example: Example, cands: tuple[str, ...]) -> int | None:
    """Index of the reference answer among the candidates (None: take the model's choice)."""
    return cands.index(example.answer) if example.answer in cands else None


@register
class MMShap(Probe):
    spec = CATALOG["mm_shap"]
    unit_size = 8

    def __init__(self, *, batch_size: int = 16, pairs: int = PERMUTATION_PAIRS) -> None:
        """`pairs`: antithetic permutation pairs per example (>= 2, to estimate the sampling error)."""
        super().__init__(batch_size=batch_size)
        if pairs < 2:
            raise ValueError("pairs must be >= 2 (one pair leaves no sampling error)")
        self.pairs = pairs

    def select(self, data):
        return readable_examples(data)

    def plan(self, adapter: ModelAdapter, data, *, max_examples: int | None = None) -> Plan:
        return plan_readable(self, adapter, data, max_examples=max_examples)

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        total = 0
        reads = adapter.capabilities.modalities
        for e in examples:
            n_text = len(e.prompt.split())
            blocks = (e.image is not None and "image" in reads) + (e.audio is not None and "audio" in reads)
            total += distinct_coalitions_bound(n_text + blocks * grid_side(n_text) ** 2, self.pairs)
            total += _target(e, tuple(e.choices or (e.answer,))) is None  # the intact input, scored once
        return float(total)

    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        records: list[dict] = []
        for e in unit.examples:
            # per-example stream: an example's estimate does not depend on its neighbours
            rng = np.random.default_rng([seed, zlib.crc32(e.id.encode())])
            clip = data.audio(e) if "audio" in adapter.capabilities.modalities else None
            img = data.image(e) if "image" in adapter.capabilities.modalities else None
            if clip is None:
                records += self._example(adapter, e, img, rng)
            else:
                records += self._audio_example(adapter, e, img, clip, rng)
        return rows_frame(records)

    def _audio_example(self, adapter, e: Example, img: Image.Image | None, clip: Audio, rng) -> list[dict]:
        """Players: words, image patches (when the model also sees the image), audio segments."""
        cands = tuple(e.choices or (e.answer,))
        target = _target(e, cands)
        if target is None:
            target = int(np.argmax(adapter.score([Query(e.prompt, img, cands, audio=clip)],
                                                 batch_size=self.batch_size)[0]))
        words = e.prompt.split()
        n_text, grid = len(words), grid_side(len(words))
        n_img = grid * grid if img is not None else 0
        n_seg = grid * grid
        sizes = (n_text, n_img, n_seg)

        def value(masks):
            qs = [Query(" ".join(w if m else MASK_WORD for w, m in zip(words, mask[:n_text])),
                        mask_image(img, mask[n_text:n_text + n_img], grid) if img is not None else None, cands,
                        audio=mask_audio(clip, mask[n_text + n_img:])) for mask in masks]
            return [s[target] for s in adapter.score(qs, batch_size=self.batch_size)]

        phi = shapley_permutations(value, sum(sizes), pairs=self.pairs, rng=rng)
        est = phi.mean(0)
        t_hat, v_hat, a_hat = group_shares(est, sizes)
        if not np.isfinite(a_hat):
            return []  # the answer's score depends on no player: shares undefined
        se_player, (_, se_v, se_a) = group_sampling_errors(phi, sizes)
        name = self.name
        records = [dict(probe=name, metric="t_shap", value=float(t_hat), example_id=e.id, modality="text"),
                   dict(probe=name, metric="a_shap", value=float(a_hat), example_id=e.id, modality="audio"),
                   dict(probe=name, metric="a_shap_se", value=se_a, example_id=e.id, modality="audio")]
        if img is not None:
            records += [dict(probe=name, metric="v_shap", value=float(v_hat), example_id=e.id, modality="image"),
                        dict(probe=name, metric="v_shap_se", value=se_v, example_id=e.id, modality="image")]
        n, rate = clip.waveform.size, clip.sample_rate  # segment s is samples [s*n//K, (s+1)*n//K), as masked
        for k, (x, se) in enumerate(zip(est, se_player)):
            if k < n_text:
                where = dict(modality="text", token_index=k, token=words[k])
            elif k < n_text + n_img:
                where = dict(modality="image", grid_row=(k - n_text) // grid, grid_col=(k - n_text) % grid)
            else:
                s = k - n_text - n_img
                where = dict(modality="audio", token_index=s,
                             token=f"{s * n // n_seg / rate:.2f}-{(s + 1) * n // n_seg / rate:.2f}s")
            records += [dict(probe=name, metric="shapley", value=float(x), example_id=e.id, **where),
                        dict(probe=name, metric="shapley_se", value=float(se), example_id=e.id, **where)]
        return records

    def _example(self, adapter, e: Example, img: Image.Image, rng) -> list[dict]:
        cands = tuple(e.choices or (e.answer,))
        target = _target(e, cands)
        if target is None:
            target = int(np.argmax(adapter.score([Query(e.prompt, img, cands)], batch_size=self.batch_size)[0]))
        words = e.prompt.split()
        n_text, grid = len(words), grid_side(len(words))

        def value(masks):
            qs = [Query(" ".join(w if m else MASK_WORD for w, m in zip(words, mask[:n_text])),
                        mask_image(img, mask[n_text:], grid), cands) for mask in masks]
            return [s[target] for s in adapter.score(qs, batch_size=self.batch_size)]

        phi = shapley_permutations(value, n_text + grid * grid, pairs=self.pairs, rng=rng)
        est = phi.mean(0)
        v_hat, t_hat = modality_shares(est, n_text)
        if not np.isfinite(v_hat):
            return []  # the answer's score depends on no player: shares undefined
        se_player, se_v = sampling_errors(phi, n_text)
        name = self.name
        records = [dict(probe=name, metric="v_shap", value=float(v_hat), example_id=e.id, modality="image"),
                   dict(probe=name, metric="t_shap", value=float(t_hat), example_id=e.id, modality="text"),
                   dict(probe=name, metric="v_shap_se", value=se_v, example_id=e.id, modality="image")]
        for k, (x, se) in enumerate(zip(est, se_player)):
            where = (dict(modality="text", token_index=k, token=words[k]) if k < n_text else
                     dict(modality="image", grid_row=(k - n_text) // grid, grid_col=(k - n_text) % grid))
            records += [dict(probe=name, metric="shapley", value=float(x), example_id=e.id, **where),
                        dict(probe=name, metric="shapley_se", value=float(se), example_id=e.id, **where)]
        return records

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        for metric, modality in (("v_shap", "image"), ("t_shap", "text"), ("a_shap", "audio")):
            v = rows[rows.metric == metric].sort_values("example_id").value
            if v.empty:
                continue
            lo, hi = mean_ci(v.values, seed=seed_for(seed, name, metric), bounds=(0.0, 1.0))
            out.append(dict(probe=name, metric=metric, value=float(v.mean()), ci_low=lo, ci_high=hi,
                            n=int(v.size), modality=modality, scope="overall"))
        se = rows[rows.metric == "v_shap_se"].value
        if not se.empty and se.notna().all():  # the mean over examples: independent errors combine
            out.append(dict(probe=name, metric="v_shap_sampling_se", value=float(np.sqrt((se ** 2).sum()) / len(se)),
                            n=int(se.size), modality="image", scope="overall"))
        se = rows[rows.metric == "a_shap_se"].value
        if not se.empty and se.notna().all():
            out.append(dict(probe=name, metric="a_shap_sampling_se", value=float(np.sqrt((se ** 2).sum()) / len(se)),
                            n=int(se.size), modality="audio", scope="overall"))
        return metrics_frame(out)
