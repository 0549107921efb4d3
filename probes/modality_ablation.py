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

White-box early-fusion models also get the layer curve (`image_layer_curve`, group
`layer:l`): the TV after the image tokens' residual stream at the output of decoder layer
l is replaced by its value on a blank image, i.e. image content removed from layer l on;
what earlier layers already moved out of the image positions survives it, so the curve
shows where image information has left the image tokens. An image-blind model reads 0. The
perceptual score (Gat et al. 2021) is the relative accuracy drop when a modality is
permuted across examples: (acc − acc_shuffled) / acc.
"""
from __future__ import annotations

import numpy as np
import torch
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
        cost_per_example=1 + len(IMAGE_ABLATIONS) + len(TEXT_ABLATIONS),  # + one per decoder layer (curve)
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
        if _has_layer_curve(adapter):
            base = [q for _, v, q in queries if v == "none"]
            for layer, layer_scores in enumerate(_layer_curve_scores(adapter, base, adapter.n_layers)):
                for i, s in enumerate(layer_scores):
                    queries.append((i, f"layer_blank:{layer}", base[i]))
                    scores.append(s)
        dist = {(i, v): adapter.choice_distribution(s) for (i, v, _), s in zip(queries, scores)}
        records = []
        for (i, variant, _), s in zip(queries, scores):
            e = examples[i]
            if variant != "none":
                layer = variant.startswith("layer_blank:")
                records.append(dict(probe=self.info.name, metric="tv", value=total_variation(dist[(i, "none")], dist[(i, variant)]),
                                    example_id=e.id, group="image_layer" if layer else variant.split(":")[0],
                                    site=f"language.blocks.{variant.split(':')[1]}.resid" if layer else None,
                                    variant=variant))
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
        curve = tv[tv.group == "image_layer"]
        for variant, g in curve.groupby("variant", sort=False):
            lo, hi = bootstrap_ci(g.value.values, seed=seed)
            out.append((self.info.name, "image_layer_curve", float(g.value.mean()), lo, hi,
                        f"layer:{variant.split(':')[1]}", int(len(g))))
        correct = rows[rows.metric == "correct"]
        acc = {}
        for variant, g in correct.groupby("variant", sort=True):
            lo, hi = bootstrap_ci(g.value.values, seed=seed)
            acc[variant] = float(g.value.mean())
            out.append((self.info.name, "accuracy", acc[variant], lo, hi, variant, int(len(g))))
        for modality in ("image", "text"):
            shuffled = acc.get(f"{modality}:shuffled")
            if shuffled is not None and acc.get("none"):
                out.append((self.info.name, f"perceptual_score_{modality}", (acc["none"] - shuffled) / acc["none"],
                            None, None, None, int((correct.variant == "none").sum())))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)


def _has_layer_curve(adapter: ModelAdapter) -> bool:
    caps = adapter.capabilities
    return caps.hooks and caps.kind == "generative" and caps.fusion == "early"


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _layer_curve_scores(adapter, queries, n_layers: int) -> list[list]:
    """Per layer l, scores with the image positions of layer l's output replaced by the
    same positions of a run on a blank image: image content removed from layer l on.

    Both passes score identical shapes in identical batches, so the k-th forward of the
    blank pass supplies the k-th forward of each replaced pass.
    """
    blank = [Query(q.prompt, Image.new("RGB", q.image.size, (128, 128, 128)), q.candidates) for q in queries]
    cache: dict[int, list] = {layer: [] for layer in range(n_layers)}

    def keep(layer):
        return lambda m, i, o: cache[layer].append(_hidden(o).detach())

    with adapter.hooks({f"language.blocks.{layer}.resid": keep(layer) for layer in cache}):
        adapter.score(blank)
    out = []
    for layer in range(n_layers):
        state = {"k": 0}

        def remember_ids(module, inputs, output):
            state["image"] = (inputs[0] == adapter.image_token_id)[..., None]

        def replace(module, inputs, output, layer=layer):
            src = cache[layer][state["k"]]
            state["k"] += 1
            new = torch.where(state["image"], src, _hidden(output))
            return (new, *output[1:]) if isinstance(output, tuple) else new

        with adapter.hooks({"language.embed": remember_ids, f"language.blocks.{layer}.resid": replace}):
            out.append(adapter.score(queries))
    return out
