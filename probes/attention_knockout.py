"""`attention_knockout`: cross-modal information flow by blocking attention edges.

After Zhang et al. (CVPR 2025): in a window of consecutive decoder layers, the attention
edges from one position group to another are set to -inf before the softmax (exact
knockout, audit.adapters.attention). Block pairs (source->target = target may not attend
to source): image->question, image->last, question->last. The effect per window is the
relative change of the answer probability, (p_blocked - p) / p, averaged over examples;
`max_effect` per pair is the effect of largest magnitude over windows (signed).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from audit.adapters.attention import LayerPlan, attention_plan
from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset
from probes._positions import position_groups
from probes.attention import AttentionProbe
from probes.base import METRIC_COLUMNS, ProbeInfo, bootstrap_ci, register, rows_frame

PAIRS = (("image", "question"), ("image", "last"), ("question", "last"))
BATCH = 8


def window_size(n_layers: int) -> int:
    # Zhang et al. use a window of 9 layers in 32-layer models; keep the same ratio.
    return max(1, round(n_layers * 9 / 32))


def answer_ids(adapter, example, scores) -> list[int]:
    """Token ids of the reference answer, or of the intact input's predicted choice."""
    text = example.answer if example.answer is not None else example.choices[int(np.argmax(scores))]
    return adapter.continuation_ids(text)


@register
class AttentionKnockout(AttentionProbe):
    info = ProbeInfo(
        name="attention_knockout",
        category="interpretability",
        description="Relative change of the answer probability when attention edges between image, question "
                    "and last positions are blocked in a window of layers.",
        citation="Zhang et al. 2025, Cross-modal Information Flow in Multimodal Large Language Models (CVPR)",
        cost_per_example=1 + 3 * 4,
        needs_white_box=True,
        kinds=("generative",),
        metrics=("max_effect", "effect"),
    )

    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        examples = list(data)
        records = []
        n_layers, w = adapter.n_layers, window_size(adapter.n_layers)
        for s in range(0, len(examples), BATCH):
            batch = examples[s:s + BATCH]
            queries = [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))) for e in batch]
            scores = adapter.score(queries)
            enc = adapter.encode(queries, [answer_ids(adapter, e, sc) for e, sc in zip(batch, scores)])
            groups = position_groups(adapter, enc)
            with torch.no_grad():
                clean = adapter.continuation_logprobs(adapter.forward(enc).logits, enc)
                for src, dst in PAIRS:
                    block = torch.stack([g[dst][:, None] & g[src][None, :] for g in groups])
                    for start in range(0, n_layers - w + 1):
                        plan = {i: LayerPlan(block=block) for i in range(start, start + w)}
                        with attention_plan(adapter, plan):
                            lp = adapter.continuation_logprobs(adapter.forward(enc).logits, enc)
                        rel = torch.expm1(lp - clean)  # (p_blocked - p) / p
                        for e, v in zip(batch, rel.tolist()):
                            records.append(dict(probe=self.info.name, metric="effect", value=v, example_id=e.id,
                                                group=f"{src}->{dst}", site=f"language.blocks.{start}-{start + w - 1}",
                                                variant=f"window:{start}"))
        return rows_frame(records)

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out = []
        for pair, g in rows.groupby("group", sort=True):
            by_window = g.groupby("variant", sort=False).value
            means = by_window.mean()
            best = means.abs().idxmax()
            vals = g[g.variant == best].value.values
            lo, hi = bootstrap_ci(vals, seed=seed)
            out.append((self.info.name, "max_effect", float(means[best]), lo, hi, pair, int(vals.size)))
            for window, v in by_window:
                lo, hi = bootstrap_ci(v.values, seed=seed)
                out.append((self.info.name, "effect", float(v.mean()), lo, hi, f"{pair}@{window}", int(v.size)))
        return pd.DataFrame(out, columns=METRIC_COLUMNS)
