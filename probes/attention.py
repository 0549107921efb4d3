"""`attention`: where the answer position looks — the share of attention mass on image
tokens per layer and head, heatmaps over the image grid, and attention rollout.

Only the layers being read switch to explicit attention (audit.adapters.attention); each
layer's pattern is reduced on the device, while the forward runs, to the answer position's
row and one step of the rollout product, so no layer's T × T matrix outlives its layer.
Rollout follows Abnar & Zuidema (2020): Â_l = ½(mean_h A_l) + ½I, row-normalised, and
R = Â_L ⋯ Â_1 (accumulated layer by layer as the layers run, earliest first); the rollout
share is R's answer-position mass on image tokens.
"""
from __future__ import annotations

import pandas as pd
import torch

from audit.adapters.attention import LayerPlan, attention_plan
from audit.adapters.base import GenerativeWhiteBox, Query
from audit.catalog import CATALOG
from audit.stats import mean_ci, seed_for
from probes.base import Probe, Unit, metrics_frame, register, rows_frame


def rollout_step(a: torch.Tensor, product: torch.Tensor | None) -> torch.Tensor:
    """Â @ product for one layer's head-mean matrix `a` [T, T] (product None: the identity)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    a_hat = 0.5 * a + 0.5 * eye
    a_hat = a_hat / a_hat.sum(-1, keepdim=True)
    return a_hat @ (eye if product is None else product)


def rollout(mats: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout over per-layer head-mean matrices [T, T] (earliest layer first)."""
    out = None
    for a in mats:
        out = rollout_step(a, out)
    return out


@register
class AttentionProbe(Probe):
    spec = CATALOG["attention"]

    def run(self, adapter: GenerativeWhiteBox, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        records: list[dict] = []
        examples = list(unit.examples)
        for s in range(0, len(examples), self.batch_size):
            records += self._batch(adapter, data, examples[s:s + self.batch_size])
        return rows_frame(records)

    def _batch(self, adapter, data, batch) -> list[dict]:
        queries = [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))) for e in batch]
        enc = adapter.encode(queries)
        spans = adapter.image_spans(enc.input_ids)
        last = torch.tensor([n - 1 for n in enc.context_lengths], device=enc.input_ids.device)
        rows_at_answer: dict[int, torch.Tensor] = {}
        products: list[torch.Tensor | None] = [None] * len(batch)  # rollout so far, per example [n, n]

        def read(layer: int, w: torch.Tensor) -> None:
            if rows_at_answer and layer <= max(rows_at_answer):
                raise RuntimeError("attention layers were read out of order; rollout needs the earliest first")
            rows_at_answer[layer] = w[torch.arange(w.shape[0]), :, last].float()  # [B, H, K]
            mean = w.mean(1).float()  # [B, T, T], released after this layer
            for b, n in enumerate(enc.context_lengths):
                products[b] = rollout_step(mean[b][:n, :n], products[b])

        with torch.no_grad(), attention_plan(adapter, {i: LayerPlan(read=read) for i in range(adapter.n_layers)}):
            adapter.forward(enc)
        records = []
        name = self.name
        for b, e in enumerate(batch):
            if not spans[b]:
                continue
            n = enc.context_lengths[b]
            img = torch.zeros(n, dtype=torch.bool, device=last.device)
            for sp in spans[b]:
                img[sp.start:sp.end] = True
            frac = float(img.float().mean())
            records.append(dict(probe=name, metric="image_token_fraction", value=frac, example_id=e.id))
            for layer in sorted(rows_at_answer):
                share = rows_at_answer[layer][b][:, :n][:, img].sum(-1)  # [H]
                for h, v in enumerate(share.tolist()):
                    records.append(dict(probe=name, metric="image_attention_share", value=v, example_id=e.id,
                                        site=f"language.blocks.{layer}.attn", layer=layer, head=h))
            roll = products[b]
            records.append(dict(probe=name, metric="rollout_image_share", value=float(roll[n - 1][img].sum()),
                                example_id=e.id))
            sp = spans[b][0]
            if sp.grid:
                heat = torch.stack([rows_at_answer[layer][b][:, sp.start:sp.end].mean(0)
                                    for layer in sorted(rows_at_answer)]).mean(0)
                _, cols = sp.grid
                for k, v in enumerate(heat.tolist()):
                    records.append(dict(probe=name, metric="attention_heatmap", value=v, example_id=e.id,
                                        variant="layer_head_mean", grid_row=k // cols, grid_col=k % cols))
        return records

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        share = rows[rows.metric == "image_attention_share"]
        if share.empty:
            return metrics_frame(out)
        per_ex = share.groupby("example_id", sort=True).value.mean()
        frac = rows[rows.metric == "image_token_fraction"].set_index("example_id").value.sort_index()
        roll = rows[rows.metric == "rollout_image_share"].set_index("example_id").value.sort_index()
        for metric, values, bounds in (("image_attention_share", per_ex, (0.0, 1.0)),
                                       ("image_attention_ratio", per_ex / frac.reindex(per_ex.index), None),
                                       ("rollout_image_share", roll, (0.0, 1.0))):
            lo, hi = mean_ci(values.values, seed=seed_for(seed, name, metric), bounds=bounds)
            out.append(dict(probe=name, metric=metric, value=float(values.mean()), ci_low=lo, ci_high=hi,
                            n=int(values.size), scope="overall"))
        for layer, g in share.groupby("layer", sort=True):
            v = g.groupby("example_id", sort=True).value.mean()
            lo, hi = mean_ci(v.values, seed=seed_for(seed, name, "layer", str(layer)), bounds=(0.0, 1.0))
            out.append(dict(probe=name, metric="image_attention_share", value=float(v.mean()), ci_low=lo, ci_high=hi,
                            group=f"layer:{int(layer)}", n=int(v.size), layer=int(layer), scope="breakdown"))
        return metrics_frame(out)
