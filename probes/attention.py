"""`attention`: where the answer position looks — the share of attention mass on image
tokens per layer and head, heatmaps over the image grid, and attention rollout.

Only the layers being read switch to explicit attention (audit.adapters.attention); each
layer's pattern is reduced on the device to the answer position's row and the head-mean
matrix that rollout needs, so nothing of size layers × heads × T × T leaves the device.
Rollout follows Abnar & Zuidema (2020): Â_l = ½(mean_h A_l) + ½I, row-normalised, and
R = Â_L ⋯ Â_1; the rollout share is R's answer-position mass on image tokens.
"""
from __future__ import annotations

import pandas as pd
import torch

from audit.adapters.attention import LayerPlan, attention_plan
from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from probes.base import METRIC_COLUMNS, Probe, ProbeInfo, bootstrap_ci, register, rows_frame

BATCH = 8


def rollout(mats: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over per-layer head-mean matrices [T, T] (earliest layer first)."""
    t = mats[0].shape[-1]
    eye = torch.eye(t, dtype=mats[0].dtype, device=mats[0].device)
    out = eye
    for a in mats:
        a_hat = 0.5 * a + 0.5 * eye
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
        out = a_hat @ out
    return out


@register
class AttentionProbe(Probe):
    info = ProbeInfo(
        name="attention",
        category="interpretability",
        description="Share of attention mass from the answer position onto image tokens, per layer and head; "
                    "heatmaps over the image grid; attention rollout.",
        citation="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (ACL)",
        cost_per_example=1.0,
        needs_white_box=True,
        kinds=("generative",),
        metrics=("image_attention_share", "image_attention_ratio", "rollout_image_share"),
    )

    def check(self, adapter: ModelAdapter) -> list[str]:
        problems = super().check(adapter)
        if not problems and adapter.capabilities.fusion != "early":
            problems.append("attention share needs image tokens in the sequence; this model fuses the image by "
                            f"{adapter.capabilities.fusion.replace('_', '-')}, so self-attention never sees them")
        return problems

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        records: list[dict] = []
        examples = list(data)
        for s in range(0, len(examples), BATCH):
            records += self._batch(adapter, data, examples[s:s + BATCH])
        return rows_frame(records)

    def _batch(self, adapter, data, batch) -> list[dict]:
        queries = [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))) for e in batch]
        enc = adapter.encode(queries)
        spans = adapter.image_spans(enc.input_ids)
        last = torch.tensor([n - 1 for n in enc.context_lengths], device=enc.input_ids.device)
        rows_at_answer: dict[int, torch.Tensor] = {}
        head_means: dict[int, torch.Tensor] = {}

        def read(layer: int, w: torch.Tensor) -> None:
            rows_at_answer[layer] = w[torch.arange(w.shape[0]), :, last].float()  # [B, H, K]
            head_means[layer] = w.mean(1).float()  # [B, T, T]

        with torch.no_grad(), attention_plan(adapter, {i: LayerPlan(read=read) for i in range(adapter.n_layers)}):
            adapter.forward(enc)
        records = []
        name = self.info.name
        for b, e in enumerate(batch):
            if not spans[b]:
                continue
            n = enc.context_lengths[b]
            img = torch.zeros(n, dtype=torch.bool, device=last.device)
            for sp in spans[b]:
                img[sp.start:sp.end] = True
            frac = float(img.float().mean())
            records.append(dict(probe=name, metric="image_token_fraction", value=frac, example_id=e.id,
                                group=None, site=None, variant=None))
            for layer in sorted(rows_at_answer):
                share = rows_at_answer[layer][b][:, :n][:, img].sum(-1)  # [H]
                for h, v in enumerate(share.tolist()):
                    records.append(dict(probe=name, metric="image_attention_share", value=v, example_id=e.id,
                                        group=f"layer:{layer}", site=f"language.blocks.{layer}.attn", variant=f"head:{h}"))
            roll = rollout([head_means[layer][b][:n, :n] for layer in sorted(head_means)])
            records.append(dict(probe=name, metric="rollout_image_share", value=float(roll[n - 1][img].sum()),
                                example_id=e.id, group=None, site=None, variant=None))
            sp = spans[b][0]
            if sp.grid:
                heat = torch.stack([rows_at_answer[layer][b][:, sp.start:sp.end].mean(0) for layer in sorted(rows_at_answer)]).mean(0)
                rows_, cols = sp.grid
                for k, v in enumerate(heat.tolist()):
                    records.append(dict(probe=name, metric="attention_heatmap", value=v, example_id=e.id,
                                        group=f"{k // cols},{k % cols}", site="mean", variant=f"grid:{rows_}x{cols}"))
        return records

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        share = rows[rows.metric == "image_attention_share"]
        if share.empty:
            return pd.DataFrame(out, columns=METRIC_COLUMNS)
        per_ex = share.groupby("example_id", sort=True).value.mean()
        frac = rows[rows.metric == "image_token_fraction"].set_index("example_id").value.sort_index()
        for metric, values in (("image_attention_share", per_ex),
                               ("image_attention_ratio", per_ex / frac.reindex(per_ex.index)),
                               ("rollout_image_share", rows[rows.metric == "rollout_image_share"].set_index("example_id").value.sort_index())):
            lo, hi = bootstrap_ci(values.values, seed=seed)
            out.append((self.info.name, metric, float(values.mean()), lo, hi, None, int(values.size)))
        for layer, g in share.groupby("group", sort=True):
            v = g.groupby("example_id", sort=True).value.mean()
            lo, hi = bootstrap_ci(v.values, seed=seed)
            out.append((self.info.name, "image_attention_share", float(v.mean()), lo, hi, layer, int(v.size)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)
