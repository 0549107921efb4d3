"""`modality_ablation`: how much of each answer depends on the image and on the text.

For every example the closed-choice distribution of the intact input is compared with the
distribution after a content ablation of one modality. The distance is total variation,
TV(p, q) = ½ Σ|p − q| ∈ [0, 1]: 0 exactly when removing the modality leaves the answer
scores unchanged, 1 when the answer moves to a disjoint set of choices.
  image ablations: blank (mid-grey), mean (mean image of the work unit), noise (seeded
                   Gaussian), shuffled (another example's image, Gat et al. 2021)
  text ablations:  empty (prompt removed), shuffled (another example's different prompt)
`image_reliance` / `text_reliance` are the per-example means over each modality's
ablations, averaged over examples with a percentile bootstrap interval.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, bootstrap_ci, register, rows_frame

IMAGE_ABLATIONS = ("blank", "mean", "noise", "shuffled")
TEXT_ABLATIONS = ("empty", "shuffled")


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return float(0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum())


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation with no fixed point (a cyclic shift of a random order)."""
    order = rng.permutation(n)
    out = np.empty(n, dtype=int)
    out[order] = np.roll(order, 1)
    return out


@register
class ModalityAblation(Probe):
    info = ProbeInfo(
        name="modality_ablation",
        category="interpretability",
        description="Change of the answer distribution when the image or the text is ablated "
                    "(total variation; 0 = that modality is not used).",
        citation="Gat et al. 2021, Perceptual Score: What Data Modalities Does Your Model Perceive? (NeurIPS)",
        cost_per_example=1 + len(IMAGE_ABLATIONS) + len(TEXT_ABLATIONS),
        metrics=("image_reliance", "text_reliance", "accuracy"),
    )

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        examples = list(data)
        n = len(examples)
        rng = np.random.default_rng(seed)
        images = [data.image(e) for e in examples]
        cands = [tuple(e.choices or (e.answer,)) for e in examples]
        stack = np.stack([np.asarray(im.resize(images[0].size), dtype=np.float64) for im in images])
        mean_img = Image.fromarray(stack.mean(0).round().astype(np.uint8))
        img_partner = _derangement(n, rng) if n > 1 else None
        queries: list[tuple[int, str, Query]] = []
        for i, (e, im, c) in enumerate(zip(examples, images, cands)):
            queries.append((i, "none", Query(e.prompt, im, c)))
            queries.append((i, "image:blank", Query(e.prompt, Image.new("RGB", im.size, (128, 128, 128)), c)))
            queries.append((i, "image:mean", Query(e.prompt, mean_img.resize(im.size), c)))
            noise = rng.normal(128, 64, size=(im.size[1], im.size[0], 3)).clip(0, 255).astype(np.uint8)
            queries.append((i, "image:noise", Query(e.prompt, Image.fromarray(noise), c)))
            if img_partner is not None:
                queries.append((i, "image:shuffled", Query(e.prompt, images[img_partner[i]].resize(im.size), c)))
            queries.append((i, "text:empty", Query("", im, c)))
            others = [j for j in range(n) if examples[j].prompt != e.prompt]
            if others:
                j = others[int(rng.integers(len(others)))]
                queries.append((i, "text:shuffled", Query(examples[j].prompt, im, c)))
        scores = adapter.score([q for _, _, q in queries])
        dist = {(i, v): adapter.choice_distribution(s) for (i, v, _), s in zip(queries, scores)}
        records = []
        for (i, variant, _), s in zip(queries, scores):
            e = examples[i]
            if variant != "none":
                records.append(dict(probe=self.info.name, metric="tv", value=total_variation(dist[(i, "none")], dist[(i, variant)]),
                                    example_id=e.id, group=variant.split(":")[0], site=None, variant=variant))
            if e.answer is not None and e.choices and e.answer in e.choices:
                records.append(dict(probe=self.info.name, metric="correct", value=float(int(np.argmax(s)) == e.choices.index(e.answer)),
                                    example_id=e.id, group=None, site=None, variant=variant))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        tv = rows[rows.metric == "tv"]
        for modality, metric in (("image", "image_reliance"), ("text", "text_reliance")):
            part = tv[tv.group == modality]
            if part.empty:
                continue
            per_example = part.groupby("example_id", sort=True).value.mean()
            lo, hi = bootstrap_ci(per_example.values, seed=seed)
            out.append((self.info.name, metric, float(per_example.mean()), lo, hi, None, int(per_example.size)))
            for variant, g in part.groupby("variant", sort=True):
                lo, hi = bootstrap_ci(g.value.values, seed=seed)
                out.append((self.info.name, metric, float(g.value.mean()), lo, hi, variant.split(":")[1], int(len(g))))
        correct = rows[rows.metric == "correct"]
        for variant, g in correct.groupby("variant", sort=True):
            lo, hi = bootstrap_ci(g.value.values, seed=seed)
            out.append((self.info.name, "accuracy", float(g.value.mean()), lo, hi, variant, int(len(g))))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)
