"""`attention_knockout`: cross-modal information flow by blocking attention edges.

After Zhang et al. (CVPR 2025): in a window of consecutive decoder layers the attention
edges from one position group to another are set to -inf before the softmax (an exact
knockout, audit.adapters.attention). A pair src->dst means dst may not attend to src.
Groups come from probes._positions: image, question (the user's prompt only), special
(BOS, roles, image boundaries) and last (the answer positions). Pairs:
  image->question, image->last, question->last, and special->last (the attention sink,
  reported on its own so that question->last no longer cuts it too).
The effect per window is the relative change of the answer probability,
(p_blocked - p) / p = exp(log p_blocked - log p) - 1, per example; a pair whose source or
target group is empty in an example (an empty prompt) has no edges there and no row.
`max_effect` per pair is the window mean of largest magnitude (signed); its interval is
that window's interval, not adjusted for choosing the window.

The unblocked reference runs through the same explicit attention as the blocked runs
(every layer planned, only the window's layers blocked), so the effect measures the
cut edges alone: with the block ignored it is exactly 0.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch

from audit.adapters.attention import LayerPlan, attention_plan
from audit.adapters.base import GenerativeWhiteBox, ModelAdapter, Query
from audit.catalog import CATALOG
from audit.dataset import Example
from audit.stats import mean_ci, seed_for
from probes._positions import answer_continuations, answer_scoring_cost, position_groups
from probes.base import Probe, Unit, metrics_frame, register, rows_frame

PAIRS = (("image", "question"), ("image", "last"), ("question", "last"), ("special", "last"))
EFFECT_BOUNDS = (-1.0, float("inf"))  # a relative change of a probability


def window_size(n_layers: int) -> int:
    # Zhang et al. use a window of 9 layers in 32-layer models; keep the same ratio.
    return max(1, round(n_layers * 9 / 32))


def pair_label(src: str, dst: str) -> str:
    return f"{src}->{dst}"


def knockout_mask(groups: Mapping[str, torch.Tensor], pairs: Iterable[tuple[str, str]]) -> torch.Tensor:
    """block [B, Q, K]: True where a query in a pair's target group would read a key in its source."""
    block = None
    for src, dst in pairs:
        m = groups[dst][:, :, None] & groups[src][:, None, :]
        block = m if block is None else block | m
    return block


@register
class AttentionKnockout(Probe):
    spec = CATALOG["attention_knockout"]
    unit_size = 16

    def __init__(self, *, batch_size: int = 16, window: int | None = None) -> None:
        """`window`: layers per knockout window (default: 9/32 of the decoder, as Zhang et al.)."""
        super().__init__(batch_size=batch_size)
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        self.window = window

    def _windows(self, n_layers: int) -> list[tuple[int, int]]:
        w = min(self.window or window_size(n_layers), n_layers)
        return [(s, s + w - 1) for s in range(n_layers - w + 1)]

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        per_example = 1 + len(PAIRS) * len(self._windows(adapter.n_layers))  # reference + one per knockout
        return float(per_example * len(examples) + answer_scoring_cost(examples))

    def run(self, adapter: GenerativeWhiteBox, unit: Unit, *, seed: int) -> pd.DataFrame:
        data = unit.dataset()
        examples = list(unit.examples)
        queries = [Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))) for e in examples]
        conts = answer_continuations(adapter, examples, queries, batch_size=self.batch_size)
        records: list[dict] = []
        for s in range(0, len(examples), self.batch_size):
            sl = slice(s, s + self.batch_size)
            records += self._batch(adapter, examples[sl], queries[sl], conts[sl])
        return rows_frame(records)

    def _batch(self, adapter, batch, queries, conts) -> list[dict]:
        enc = adapter.encode(queries, conts)
        groups = position_groups(adapter, enc)
        n_layers = adapter.n_layers
        records = []
        with torch.no_grad():
            with attention_plan(adapter, {i: LayerPlan() for i in range(n_layers)}):
                clean = adapter.sequence_logprobs(enc)
            for src, dst in PAIRS:
                present = (groups[src].any(1) & groups[dst].any(1)).tolist()
                block = knockout_mask(groups, [(src, dst)])
                for start, end in self._windows(n_layers):
                    plan = {i: LayerPlan(block=block if start <= i <= end else None) for i in range(n_layers)}
                    with attention_plan(adapter, plan):
                        lp = adapter.sequence_logprobs(enc)
                    rel = torch.expm1(lp - clean)  # (p_blocked - p) / p
                    records += [dict(probe=self.name, metric="effect", value=v, example_id=e.id,
                                     position_group=pair_label(src, dst), layer=start, layer_end=end)
                                for e, v, ok in zip(batch, rel.tolist(), present) if ok]
        return records

    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        out: list[dict] = []
        name = self.name
        effect = rows[rows.metric == "effect"].sort_values(["position_group", "layer", "example_id"])
        for pair, g in effect.groupby("position_group", sort=True):
            windows = []
            for (start, end), w in g.groupby(["layer", "layer_end"], sort=True):
                lo, hi = mean_ci(w.value.values, seed=seed_for(seed, name, pair, str(start)), bounds=EFFECT_BOUNDS)
                rec = dict(probe=name, metric="effect", value=float(w.value.mean()), ci_low=lo, ci_high=hi,
                           group=f"{pair}@window:{int(start)}", n=int(len(w)), position_group=pair,
                           layer=int(start), layer_end=int(end), scope="breakdown")
                windows.append(rec)
            out += windows
            best = max(windows, key=lambda r: abs(r["value"]))  # first window wins a tie
            out.append(dict(best, metric="max_effect", group=pair))
        return metrics_frame(out)
