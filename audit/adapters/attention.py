"""Read or edit attention in chosen decoder layers while every other layer keeps SDPA.

`attention_plan(adapter, {layer: LayerPlan(...)})` swaps, for the listed layers only, the
attention module's config for a copy whose `_attn_implementation` names an attention
function registered here. That function computes attention explicitly (so the pattern can
be read on the device and reduced at once) and can block chosen (query, key) edges with
-inf before the softmax — an exact attention knockout. Layers not listed are untouched,
so the cost of reading one layer is one eager layer, not an eager model (measured:
eager everywhere costs 1.46x the SDPA forward on a 7B LLaVA).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["LayerPlan", "attention_plan", "IMPL_NAME"]

IMPL_NAME = "mmaudit_probe"
_PLAN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("mmaudit_attention_plan", default=None)


@dataclass(frozen=True)
class LayerPlan:
    """What to do in one layer: `read(layer, weights[B, H, Q, K])`, and/or `block[B, Q, K]`
    (True = the query position may not attend to that key position)."""

    read: Callable[[int, torch.Tensor], None] | None = None
    block: torch.Tensor | None = None


def _additive_mask(mask: torch.Tensor | None, q_len: int, k_len: int, dtype, device) -> torch.Tensor:
    """Whatever mask the model built for SDPA (None, bool or additive), as an additive mask."""
    neg = torch.finfo(dtype).min
    if mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return torch.where(causal, 0.0, neg).to(dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(dtype)
    return mask[..., :k_len].to(dtype)


def _probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    plan = (_PLAN.get() or {}).get(id(module))
    if plan is None:  # a module whose config copy outlived its plan: behave exactly like SDPA
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer, spec = plan
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)).float() * scale
    scores = scores + _additive_mask(attention_mask, query.shape[2], key.shape[2], torch.float32, query.device)
    if spec.block is not None:
        scores = scores.masked_fill(spec.block[:, None].to(scores.device), float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # a fully blocked row attends to nothing
    if spec.read is not None:
        spec.read(layer, weights)
    out = (weights.to(value.dtype) @ value).transpose(1, 2).contiguous()
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    if IMPL_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPL_NAME, _probe_attention)


@contextlib.contextmanager
def attention_plan(adapter, layers: Mapping[int, LayerPlan]) -> Iterator[None]:
    """Apply `layers` (decoder layer index -> LayerPlan) for the duration of the block."""
    _register()
    modules, saved = {}, []
    try:
        for i, spec in layers.items():
            attn = adapter.site_module(f"language.blocks.{i}.attn")
            cfg = copy.copy(attn.config)
            cfg._attn_implementation_internal = IMPL_NAME
            saved.append((attn, attn.config))
            attn.config = cfg
            modules[id(attn)] = (i, spec)
        token = _PLAN.set({**(_PLAN.get() or {}), **modules})
        try:
            yield
        finally:
            _PLAN.reset(token)
    finally:
        for attn, cfg in saved:
            attn.config = cfg
