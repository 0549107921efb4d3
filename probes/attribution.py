"""`attribution`: captum Integrated Gradients split into text and image parts, plus captum
FeatureAblation over image patches.

IG runs at the two layers where the modalities enter the language model — the token
embeddings and the projector that emits image features (`LayerIntegratedGradients` with
both layers; DESIGN.md shows this split sums to f(x) − f(baseline)). The baseline is the
pad token for text and a mid-grey image. Text scores are the embedding attributions at
non-image positions, summed over hidden units; image scores are the projector-output
attributions, summed per image token. `completeness_delta` is captum's convergence delta
|Σ attributions − (f(x) − f(baseline))|, relative to |f(x) − f(baseline)|.

A silent all-zero result (captum's multimodal LLM path returns zeros when pixel values are
dropped during input preparation, DESIGN.md) is caught: when f(x) ≠ f(baseline) but every
attribution is 0 the probe raises instead of reporting zeros.
"""
from __future__ import annotations

import warnings

import pandas as pd
import torch
from PIL import Image

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from audit.errors import UnsupportedError
from probes.attention_knockout import answer_ids
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, bootstrap_ci, register, rows_frame
from probes.mm_shap import GRID

IG_STEPS = 128  # relative completeness error measured on tiny LLaVA: 0.05 median at 128 steps, <0.02 at 512
ZERO_ATTRIBUTION = "every attribution is 0 although f(x) - f(baseline) = {gap:.3g}: the attribution path is broken"


@register
class Attribution(Probe):
    info = ProbeInfo(
        name="attribution",
        category="interpretability",
        description="Integrated Gradients at the text-embedding and image-projector layers (text vs image share, "
                    "per-token and per-patch scores) and FeatureAblation over image patches.",
        citation="Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks (ICML); captum (Kokhlikyan et al. 2020)",
        cost_per_example=2 * IG_STEPS + GRID * GRID + 2,
        needs_white_box=True,
        kinds=("generative",),
        metrics=("completeness_delta", "image_attribution_share"),
    )
    unit_size = 8

    def __init__(self, *, ig_steps: int = IG_STEPS) -> None:
        self.ig_steps = ig_steps

    def check(self, adapter: ModelAdapter) -> list[str]:
        problems = super().check(adapter)
        if not problems and adapter.capabilities.fusion != "early":
            problems.append("IG at the projector needs image features in the token sequence (early fusion)")
        return problems

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        from captum.attr import FeatureAblation, LayerIntegratedGradients

        records = []
        embed, proj = adapter.site_module("language.embed"), adapter.site_module("projector")
        pad = adapter.tokenizer.pad_token_id or 0
        for e in data:
            img = data.image(e)
            q = Query(e.prompt, img, tuple(e.choices or (e.answer,)))
            cont = answer_ids(adapter, e, adapter.score([q])[0])
            enc = adapter.encode([q], [cont])
            base_enc = adapter.encode([Query(e.prompt, Image.new("RGB", img.size, (128, 128, 128)), q.candidates)], [cont])
            ids, px = enc.inputs["input_ids"], enc.inputs["pixel_values"]
            image_pos = ids[0] == adapter.image_token_id
            n_ctx = enc.context_lengths[0]
            base_ids = torch.where(image_pos | (torch.arange(ids.shape[1]) >= n_ctx - 1), ids, torch.full_like(ids, pad))
            base_ids[0, 0] = ids[0, 0]  # keep BOS: the baseline is "no content", not "no sequence"
            extra = {k: v for k, v in enc.inputs.items() if k not in ("input_ids", "pixel_values")}

            def f(input_ids, pixel_values):
                batch = {**extra, "input_ids": input_ids, "pixel_values": pixel_values}
                batch = {k: (v.expand(input_ids.shape[0], *v.shape[1:]) if torch.is_tensor(v) and v.shape[0] == 1
                             and k != "pixel_values" else v) for k, v in batch.items()}
                logits = adapter.model(**batch, use_cache=False).logits
                enc_b = type(enc)(inputs=batch, context_lengths=enc.context_lengths * input_ids.shape[0],
                                  continuations=enc.continuations * input_ids.shape[0])
                return adapter.continuation_logprobs(logits, enc_b)

            with warnings.catch_warnings():
                # captum warns for any multi-layer use; the two layers here are independent inputs
                warnings.simplefilter("ignore", UserWarning)
                lig = LayerIntegratedGradients(f, [embed, proj])
            (a_txt, a_img), delta = lig.attribute((ids, px), baselines=(base_ids, base_enc.inputs["pixel_values"]),
                                                  n_steps=self.ig_steps, return_convergence_delta=True,
                                                  internal_batch_size=min(self.ig_steps, 64))
            with torch.no_grad():
                gap = float(f(ids, px) - f(base_ids, base_enc.inputs["pixel_values"]))
            txt = a_txt[0].sum(-1).detach()
            txt[image_pos] = 0.0  # image-token embeddings are overwritten by projector features
            img_scores = a_img.reshape(-1, a_img.shape[-1]).sum(-1).detach()
            total = float(txt.abs().sum() + img_scores.abs().sum())
            if total == 0.0 and abs(gap) > 1e-6:
                raise UnsupportedError(ZERO_ATTRIBUTION.format(gap=gap), where=f"attribution, example {e.id}")
            name = self.info.name
            rel = float(abs(delta.item()) / max(abs(gap), 1e-12))
            records += [
                dict(probe=name, metric="completeness_delta", value=rel, example_id=e.id, group=None, site=None, variant=None),
                dict(probe=name, metric="ig_gap", value=gap, example_id=e.id, group=None, site=None, variant=None),
                dict(probe=name, metric="image_attribution_share",
                     value=float(img_scores.abs().sum()) / total if total else float("nan"),
                     example_id=e.id, group=None, site=None, variant=None),
            ]
            tokens = adapter.tokenizer.convert_ids_to_tokens(ids[0].tolist())
            records += [dict(probe=name, metric="ig_token", value=float(v), example_id=e.id, group="text",
                             site="language.embed", variant=f"{k}:{tokens[k]}")
                        for k, v in enumerate(txt.tolist()) if not image_pos[k] and k < n_ctx]
            records += [dict(probe=name, metric="ig_image_token", value=float(v), example_id=e.id, group="image",
                             site="projector", variant=f"token:{k}") for k, v in enumerate(img_scores.tolist())]
            # captum FeatureAblation over a GRID x GRID patch mask of the pixels (grey = ablated)
            mask = _patch_mask(px.shape[-2:], GRID, device=px.device)
            fa = FeatureAblation(lambda p: f(ids.expand(p.shape[0], -1), p))
            base_px = base_enc.inputs["pixel_values"]
            attr = fa.attribute(px, baselines=base_px, feature_mask=mask.expand_as(px), perturbations_per_eval=GRID * GRID)
            per_patch = [float(attr[0][..., mask[0, 0] == k].mean() * (mask[0, 0] == k).sum()) / px.shape[1]
                         for k in range(GRID * GRID)]
            records += [dict(probe=name, metric="ablation_patch", value=v, example_id=e.id, group="image",
                             site="pixels", variant=f"patch:{k // GRID},{k % GRID}") for k, v in enumerate(per_patch)]
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        for metric in ("completeness_delta", "image_attribution_share"):
            v = rows[rows.metric == metric].sort_values("example_id").value.dropna()
            if v.empty:
                continue
            lo, hi = bootstrap_ci(v.values, seed=seed)
            out.append((self.info.name, metric, float(v.mean()), lo, hi, None, int(v.size)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)


def _patch_mask(hw, grid: int, *, device) -> torch.Tensor:
    h, w = hw
    rows = torch.arange(h, device=device) * grid // h
    cols = torch.arange(w, device=device) * grid // w
    return (rows[:, None] * grid + cols[None, :])[None, None]
