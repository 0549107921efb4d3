"""Score several prompts on one image while computing the shared prefix only once.

Counterfactual text probes ask the same image many near-identical questions. The prefix
they share (chat-template opening plus every image token) is run once with a KV cache;
only the differing suffixes are run, as one batch on a copy of that cache expanded to the
batch. Valid for decoder models whose image enters as tokens (early fusion).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from audit.adapters.base import Query

__all__ = ["score_prompt_variants"]


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows):
            return k
    return n


@torch.no_grad()
def score_prompt_variants(adapter, image, prompts: Sequence[str], candidates: Sequence[str]) -> list[np.ndarray]:
    """Log-probabilities of single-token `candidates` after each prompt, on one image."""
    from transformers import DynamicCache

    cand = [adapter.continuation_ids(c) for c in candidates]
    if any(len(c) != 1 for c in cand) or adapter.capabilities.fusion != "early":
        return adapter.score([Query(p, image, tuple(candidates)) for p in prompts])
    enc = adapter.encode([Query(p, image, tuple(candidates)) for p in prompts])
    ids = [enc.input_ids[r, :n].tolist() for r, n in enumerate(enc.context_lengths)]
    # keep at least one token per row outside the prefix: its logits score the candidates
    k = min(_common_prefix(ids), min(len(r) for r in ids) - 1)
    prefix = {key: v[:1, :k] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == enc.input_ids.shape else v[:1]
              for key, v in enc.inputs.items() if torch.is_tensor(v)}
    cache = DynamicCache()
    adapter.model(**prefix, past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(len(prompts))
    width = max(len(r) for r in ids) - k
    pad = adapter.tokenizer.pad_token_id or 0
    suffix = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), k + width), dtype=torch.long)
    for r, row in enumerate(ids):
        suffix[r, :len(row) - k] = torch.tensor(row[k:])
        mask[r, :len(row)] = 1
    out = adapter.model(input_ids=suffix.to(adapter.device), attention_mask=mask.to(adapter.device),
                        past_key_values=cache, use_cache=True)
    results = []
    for r, row in enumerate(ids):
        lp = torch.log_softmax(out.logits[r, len(row) - k - 1].float(), dim=-1)
        results.append(lp[[c[0] for c in cand]].cpu().numpy().astype(np.float64))
    return results
