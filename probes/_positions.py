"""What the white-box interpretability probes score, and where it sits in the sequence.

Position groups of an encoded batch (each a boolean mask [B, T], pairwise disjoint):
  image     image tokens
  question  the user's prompt tokens only (`adapter.question_mask`)
  last      the positions whose outputs predict the scored continuation: the last context
            position, plus every continuation position but the final one
  special   the other context positions: BOS, chat roles, image-boundary tokens. They
            are kept apart because attention sinks live there; folding them into
            "question" made question->last knockout also cut the sink.
Padding and the final continuation token belong to no group.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from audit.adapters.base import GenerativeWhiteBox, Query
from audit.dataset import Example

__all__ = ["GROUPS", "position_groups", "answer_text", "answer_continuations", "answer_scoring_cost"]

GROUPS = ("image", "question", "special", "last")


def position_groups(adapter: GenerativeWhiteBox, enc) -> dict[str, torch.Tensor]:
    """Masks [B, T] for every group in GROUPS (see the module docstring)."""
    ids = enc.input_ids
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)[None, :]
    n = torch.tensor(enc.context_lengths, device=ids.device)[:, None]
    k = torch.tensor([max(len(c), 1) for c in enc.continuations], device=ids.device)[:, None]
    context = pos < n
    last = (pos >= n - 1) & (pos < n - 1 + k)
    image = torch.zeros((b, t), dtype=torch.bool, device=ids.device)
    for row, spans in enumerate(adapter.image_spans(ids)):
        for sp in spans:
            image[row, sp.start:sp.end] = True
    image &= context
    question = adapter.question_mask(enc).to(ids.device) & context & ~image & ~last
    special = context & ~image & ~question & ~last
    return {"image": image, "question": question, "special": special, "last": last}


def answer_text(example: Example, scores: np.ndarray | None) -> str:
    """The reference answer, or the intact input's highest-scoring choice when there is none."""
    if example.answer is not None:
        return example.answer
    if scores is None:
        raise ValueError(f"example {example.id} has no reference answer and was not scored")
    return example.choices[int(np.argmax(scores))]


def answer_continuations(adapter: GenerativeWhiteBox, examples: Sequence[Example], queries: Sequence[Query], *,
                         batch_size: int) -> list[list[int]]:
    """Token ids of each example's answer; only examples without a reference answer are scored."""
    need = [i for i, e in enumerate(examples) if e.answer is None]
    scores: list = [None] * len(examples)
    for i, s in zip(need, adapter.score([queries[i] for i in need], batch_size=batch_size) if need else []):
        scores[i] = s
    return [adapter.continuation_ids(answer_text(e, s)) for e, s in zip(examples, scores)]


def answer_scoring_cost(examples: Sequence[Example]) -> int:
    """Forward passes `answer_continuations` spends: one per example without a reference answer."""
    return sum(1 for e in examples if e.answer is None)
