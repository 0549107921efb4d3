"""`attribution`: captum Integrated Gradients split into text and image parts, plus captum
FeatureAblation over image patches.

IG runs at the two layers where the modalities enter the language model: the token
embeddings and the projector that emits image features (`LayerIntegratedGradients` with
both layers; the two parts together satisfy completeness, tested at 512 steps). f is the answer's
log-probability from `adapter.sequence_logprobs` with `input_ids` and `pixel_values`
overridden. The baseline is the pad token for text (BOS, the last context token and the
answer kept) and a mid-grey image. Text scores are the embedding attributions at
non-image context positions, summed over hidden units (with their position group:
question, special or last); image scores are the projector-output attributions, summed per
image token. `completeness_delta` is captum's convergence delta
|sum of attributions - (f(x) - f(baseline))|, relative to |f(x) - f(baseline)|.

FeatureAblation greys one cell of an `ablation_grid` x `ablation_grid` grid of the pixels
at a time; a cell's score is f(x) - f(x with that cell grey). The grid is fixed (4 x 4 by
default) rather than sized like MM-SHAP's: there are no text players to balance, and the
cost is one forward per cell.

A silent all-zero result (what captum's multimodal LLM path returns when pixel values are
dropped during input preparation) is caught: when f(x) != f(baseline) but every
attribution is 0 the probe raises instead of reporting zeros.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import Encoded, GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Example
from audit.errors import UnsupportedError
from audit.stats import mean_ci, seed_for
from probes._positions import answer_continuations, answer_scoring_cost, position_groups
from probes.base import Probe, Unit, metrics_frame, register, rows_frame

IG_STEPS = 128  # relative completeness error measured on tiny LLaVA: 0.05 median at 128 steps, <0.02 at 512
ABLATION_GRID = 4
GREY = (128, 128, 128)
ZERO_ATTRIBUTION = "every attribution is 0 although f(x) - f(baseline) = {gap:.3g}: the attribution path is broken"
_OVERRIDDEN = ("input_ids", "pixel_values")


def _batched(enc: Encoded, size: int) -> Encoded:
    """`enc` (one row) repeated `size` times, so a forward can take `size` overridden rows."""
    inputs = {k: (v.expand(size, *v.shape[1:]) if torch.is_tensor(v) and v.dim() and v.shape[0] == 1
                  and k not in _OVERRIDDEN else v) for k, v in enc.inputs.items()}
    return Encoded(inputs=inputs, context_lengths=enc.context_lengths * size, continuations=enc.continuations * size,
                   texts=enc.texts * size, prompts=enc.prompts * size)


def patch_mask(hw, grid: int, *, device) -> torch.Tensor:
    """[1, 1, H, W] cell index (row-major) of every pixel in a grid x grid partition."""
    h, w = hw
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None, :])[None, None]


@register
class Attribution(Probe):
    spec = CATALOG["attribution"]
    unit_size = 8

    def __init__(self, *, batch_size: int = 16, ig_steps: int = IG_STEPS, ablation_grid: int = ABLATION_GRID) -> None:
        super().__init__(batch_size=batch_size)
        if ig_steps < 1 or ablation_grid < 1:
            raise ValueError("ig_steps and ablation_grid must be >= 1")
        self.ig_steps = ig_steps
        self.ablation_grid = ablation_grid

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        # IG: a forward and a backward (~2 forwards) per step, 4 end-point forwards for captum's
        # baseline activations and delta, 2 for the independent gap; FeatureAblation: 1 + cells.
        per_example = 3 * self.ig_steps + 4 + 2 + 1 + self.ablation_grid ** 2
        return float(per_example * len(examples) + answer_scoring_cost(examples))

    def run(self, adapter: GenerativeWhiteBox, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        queries = [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))) for e in examples]
        conts = answer_continuations(adapter, examples, queries, batch_size=self.batch_size)
        records: list[dict] = []
        for e, q, cont in zip(examples, queries, conts):
            records += self._example(adapter, e, q, cont)
        return rows_frame(records)

    def _example(self, adapter, e: Example, q: Query, cont: list[int]) -> list[dict]:
        from captum.attr import FeatureAblation, LayerIntegratedGradients

        enc = adapter.encode([q], [cont])
        base_enc = adapter.encode([Query(q.prompt, Image.new("RGB", q.image.size, GREY), q.candidates)], [cont])
        ids, px, base_px = enc.input_ids, enc.inputs["pixel_values"], base_enc.inputs["pixel_values"]
        groups = position_groups(adapter, enc)
        image_pos = ids[0] == adapter.image_token_id
        n_ctx = enc.context_lengths[0]
        pad = adapter.tokenizer.pad_token_id or 0
        keep = image_pos | (torch.arange(ids.shape[1], device=ids.device) >= n_ctx - 1)
        base_ids = torch.where(keep, ids, torch.full_like(ids, pad))
        base_ids[0, 0] = ids[0, 0]  # keep BOS: the baseline is "no content", not "no sequence"

        def f(input_ids, pixel_values):
            return adapter.sequence_logprobs(_batched(enc, input_ids.shape[0]), input_ids=input_ids,
                                             pixel_values=pixel_values)

        with warnings.catch_warnings():
            # captum warns for any multi-layer use; the two layers here are independent inputs
            warnings.simplefilter("ignore", UserWarning)
            lig = LayerIntegratedGradients(f, [adapter.site_module("language.embed"), adapter.site_module("projector")])
        (a_txt, a_img), delta = lig.attribute((ids, px), baselines=(base_ids, base_px), n_steps=self.ig_steps,
                                              return_convergence_delta=True, internal_batch_size=self.batch_size)
        with torch.no_grad():
            gap = float(f(ids, px) - f(base_ids, base_px))
        txt = a_txt[0].sum(-1).detach()
        txt[image_pos] = 0.0  # image-token embeddings are overwritten by projector features
        img_scores = a_img.reshape(-1, a_img.shape[-1]).sum(-1).detach()
        total = float(txt.abs().sum() + img_scores.abs().sum())
        if total == 0.0 and abs(gap) > 1e-6:
            raise UnsupportedError(ZERO_ATTRIBUTION.format(gap=gap), where=f"attribution, example {e.id}")
        name = self.name
        records = [
            dict(probe=name, metric="completeness_delta", value=abs(float(delta.item())) / max(abs(gap), 1e-12),
                 example_id=e.id),
            dict(probe=name, metric="ig_gap", value=gap, example_id=e.id),
            dict(probe=name, metric="image_attribution_share", modality="image", example_id=e.id,
                 value=float(img_scores.abs().sum()) / total if total else float("nan")),
        ]
        tokens = adapter.tokenizer.convert_ids_to_tokens(ids[0].tolist())
        group_of = {k: g for g in ("question", "special", "last") for k in groups[g][0].nonzero().flatten().tolist()}
        records += [dict(probe=name, metric="ig_token", value=float(txt[k]), example_id=e.id, site="language.embed",
                         modality="text", token_index=k, token=tokens[k], position_group=group_of.get(k))
                    for k in range(n_ctx) if not image_pos[k]]
        records += [dict(probe=name, metric="ig_image_token", value=v, example_id=e.id, site="projector",
                         modality="image", token_index=k, **cell)
                    for k, (v, cell) in enumerate(zip(img_scores.tolist(), _cells(adapter, ids, img_scores.numel())))]
        records += [dict(probe=name, metric="ablation_patch", value=v, example_id=e.id, modality="image",
                         variant="grey", grid_row=k // self.ablation_grid, grid_col=k % self.ablation_grid)
                    for k, v in enumerate(self._ablation(FeatureAblation, f, ids, px, base_px))]
        return records

    def _ablation(self, feature_ablation, f, ids, px, base_px) -> list[float]:
        """captum FeatureAblation over grid cells of the pixels (grey = ablated): f(x) - f(x, cell grey)."""
        g = self.ablation_grid
        mask = patch_mask(px.shape[-2:], g, device=px.device).expand_as(px)
        fa = feature_ablation(lambda p: f(ids.expand(p.shape[0], -1), p))
        with torch.no_grad():
            attr = fa.attribute(px, baselines=base_px, feature_mask=mask,
                                perturbations_per_eval=min(self.batch_size, g * g))
        flat_mask, flat_attr = mask[0].reshape(-1), attr[0].reshape(-1)
        first = [int((flat_mask == k).nonzero()[0]) for k in range(g * g)]  # a cell's elements share one score
        return [float(flat_attr[i]) for i in first]

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        for metric, bounds in (("completeness_delta", (0.0, float("inf"))), ("image_attribution_share", (0.0, 1.0))):
            v = rows[rows.metric == metric].sort_values("example_id").value.dropna()
            if v.empty:
                continue
            lo, hi = mean_ci(v.values, seed=seed_for(seed, name, metric), bounds=bounds)
            out.append(dict(probe=name, metric=metric, value=float(v.mean()), ci_low=lo, ci_high=hi, n=int(v.size),
                            modality="image" if metric == "image_attribution_share" else None, scope="overall"))
        return metrics_frame(out)


def _cells(adapter, ids, n_features: int) -> list[dict]:
    """Grid cell of each projector output token, when the features map one-to-one onto the
    image tokens of gridded spans (otherwise no cell is claimed)."""
    spans = adapter.image_spans(ids)[0]
    if sum(len(sp) for sp in spans) != n_features or not all(sp.grid for sp in spans):
        return [{} for _ in range(n_features)]
    out = []
    for sp in spans:
        cols = sp.grid[1]
        out += [dict(grid_row=j // cols, grid_col=j % cols) for j in range(len(sp))]
    return out
