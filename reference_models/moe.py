"""The `moe` reference model: a LLaVA whose language model is a Mixtral mixture-of-experts
decoder, with expert routing known by construction.

Two coordinates of the residual stream are reserved and exact at every layer:
  MARKER  (0): -1 on every text token (a frozen column of the token embeddings) and +1 on
               every image token (a frozen output unit of the projector: zero weights, bias 1);
  CHANNEL (1): +1 on every token, text and image alike (the same mechanism).
Nothing else writes to them: the rows of every attention output projection and expert down
projection into them are zero and stay zero, so they survive the residual stream unchanged
into every block. The post-attention RMSNorm the router reads scales them by a frozen
weight of 1 and a positive 1/rms, which keeps their sign. The router weights are frozen
and read one of them only:
  specialised  the router reads MARKER with weights (2, 1, -1, -2) over the 4 experts:
               image tokens go to experts {0, 1} (top-1: 0), text tokens to {3, 2} (top-1: 3),
               at every layer. Modality and top-1 expert determine each other: normalised
               mutual information 1 exactly.
  shared       the router reads CHANNEL, which carries no modality information: at layer l
               every token goes to experts {l, l+1} mod 4 (top-1: l mod 4), whatever its
               modality, so the mutual information is 0 exactly (routing independent of
               modality; not load-balanced, which the known answer does not need).
Everything else (projector, attention, experts, norms) trains as the other reference models.
"Frozen" slices of trained tensors are kept by gradient masks; their parameters get no
weight decay (`no_decay`), so AdamW leaves them bit-identical (a zero gradient moves nothing).
"""
from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, MixtralConfig

__all__ = ["MOE_VARIANTS", "N_EXPERTS", "TOP_K", "MARKER", "CHANNEL", "build_moe", "construct_routing",
           "expected_top1"]

MOE_VARIANTS = ("specialised", "shared")
N_EXPERTS = 4
TOP_K = 2
MARKER, CHANNEL = 0, 1
_PROTECTED = (MARKER, CHANNEL)
_SPECIALISED = (2.0, 1.0, -1.0, -2.0)  # router weight on MARKER per expert


def build_moe(p, words: list[str], *, tokenizer_builder, vision_config, image_processor):
    """Fresh LLaVA + Mixtral `(model, processor)` at preset `p` (as `_build_llava`, MoE decoder)."""
    tok = tokenizer_builder(words, image_token="<image>")
    n_patches = (p.image_size // p.patch_size) ** 2
    text = MixtralConfig(
        vocab_size=len(tok), hidden_size=p.text_hidden, intermediate_size=p.mlp_ratio * p.text_hidden,
        num_hidden_layers=p.text_layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
        num_local_experts=N_EXPERTS, num_experts_per_tok=TOP_K, router_jitter_noise=0.0,
        max_position_embeddings=n_patches + 128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=vision_config, text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_patches,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    proc = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=p.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return LlavaForConditionalGeneration(cfg), proc


def expected_top1(variant: str, layer: int, modality: str) -> int:
    """The top-1 expert a token of `modality` gets at `layer`, by construction."""
    if variant == "specialised":
        return 0 if modality == "image" else N_EXPERTS - 1
    return layer % N_EXPERTS


def _router_weight(variant: str, layer: int, hidden: int) -> torch.Tensor:
    w = torch.zeros(N_EXPERTS, hidden)
    if variant == "specialised":
        w[:, MARKER] = torch.tensor(_SPECIALISED)
    else:  # expert l gets the largest weight, l+1 the next, ... (all on the constant channel)
        w[:, CHANNEL] = torch.tensor([float(N_EXPERTS - (e - layer) % N_EXPERTS) for e in range(N_EXPERTS)])
    return w


def _keep(param: torch.nn.Parameter, mask: torch.Tensor) -> None:
    """Zero the gradient where `mask` is True (those entries keep their value)."""
    keep = mask.to(param.device)
    param.register_hook(lambda g: g.masked_fill(keep, 0.0))


def construct_routing(model, variant: str) -> set[str]:
    """Write the reserved coordinates and the frozen routers into a fresh `build_moe` model
    (see the module doc); returns the names of parameters that must get no weight decay."""
    if variant not in MOE_VARIANTS:
        raise ValueError(f"unknown MoE variant {variant!r}")
    lm = model.model.language_model
    proj = model.model.multi_modal_projector
    hidden = lm.config.hidden_size
    rows = torch.zeros(hidden, dtype=torch.bool)
    rows[list(_PROTECTED)] = True
    with torch.no_grad():
        emb = lm.embed_tokens.weight
        emb[:, MARKER], emb[:, CHANNEL] = -1.0, 1.0
        _keep(emb, rows[None, :].expand_as(emb))
        w2, b2 = proj.linear_2.weight, proj.linear_2.bias
        w2[rows] = 0.0
        b2[MARKER], b2[CHANNEL] = 1.0, 1.0
        _keep(w2, rows[:, None].expand_as(w2))
        _keep(b2, rows)
        for i, layer in enumerate(lm.layers):
            o = layer.self_attn.o_proj.weight  # [hidden, heads * head_dim]
            o[rows] = 0.0
            _keep(o, rows[:, None].expand_as(o))
            down = layer.mlp.experts.down_proj  # [experts, hidden, intermediate]
            down[:, rows] = 0.0
            _keep(down, rows[None, :, None].expand_as(down))
            norm = layer.post_attention_layernorm.weight
            norm[rows] = 1.0
            _keep(norm, rows)
            gate = layer.mlp.gate.weight
            gate.copy_(_router_weight(variant, i, hidden))
            gate.requires_grad_(False)
    undecayed = {id(emb), id(b2), *(id(layer.post_attention_layernorm.weight) for layer in lm.layers)}
    return {n for n, p in model.named_parameters() if id(p) in undecayed}
