"""Declarative maps from canonical hook sites to module paths, one per model family.

Canonical sites (what probes ask for):
    language.embed              token embeddings entering the language model
    language.blocks.{i}.resid   output of decoder block i (residual stream)
    language.blocks.{i}.attn    self-attention module of decoder block i
    language.blocks.{i}.router  router of decoder block i's mixture of experts (MoE families;
                                a dense block has none); `router_logits` reads its output
    projector                   module whose output are the image features the LM reads
    vision.blocks.{i}           vision encoder block i
Like TransformerLens' `component_mapping`, but for the HF module tree as it is, so hooks
run on the unmodified model with its SDPA kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["FamilySites", "GENERATIVE_FAMILIES", "DUAL_FAMILIES", "resolve", "resolve_router", "router_logits"]


@dataclass(frozen=True)
class FamilySites:
    language_layers: str
    embed: str
    projector: str
    vision_layers: str
    image_token_attr: str  # config attribute holding the image placeholder token id
    fusion: str = "early"
    cross_attention_layers_attr: str | None = None
    router: str | None = None  # path of the MoE router inside a decoder block (`a|b` alternatives)


_LLAVA = FamilySites(
    language_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    projector="model.multi_modal_projector",
    vision_layers="model.vision_tower.encoder.layers",
    image_token_attr="image_token_id",
)
_QWEN = FamilySites(
    language_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    projector="model.visual.merger",
    vision_layers="model.visual.blocks",
    image_token_attr="image_token_id",
)
_IDEFICS3 = FamilySites(
    language_layers="model.text_model.layers",
    embed="model.text_model.embed_tokens",
    projector="model.connector",
    vision_layers="model.vision_model.encoder.layers",
    image_token_attr="image_token_id",
)

# transformers' MoE decoders (Mixtral, Qwen2/3-MoE, OLMoE, Qwen3-VL-MoE) keep the router at
# `mlp.gate`; releases before 5.0 named Mixtral's block `block_sparse_moe`.
_MOE_ROUTER = "mlp.gate|block_sparse_moe.gate"

GENERATIVE_FAMILIES: dict[str, FamilySites] = {
    # Pixtral-12B is a `llava` checkpoint whose vision tower is Pixtral's, not CLIP's. A LLaVA
    # whose language model is a mixture of experts (the `moe` reference model) has routers.
    "llava": replace(_LLAVA, vision_layers=f"{_LLAVA.vision_layers}|model.vision_tower.transformer.layers",
                     router=_MOE_ROUTER),
    "llava_next": _LLAVA,
    "vipllava": _LLAVA,  # walkthrough: LLaVA's module tree with multi-layer vision features
    "llava_onevision": _LLAVA,
    "gemma3": _LLAVA,
    "paligemma": _LLAVA,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": replace(_QWEN, router=_MOE_ROUTER),
    "internvl": replace(_LLAVA, vision_layers="model.vision_tower.encoder.layer"),
    "mistral3": replace(_LLAVA, vision_layers="model.vision_tower.transformer.layers"),  # Pixtral tower
    "llama4": FamilySites(  # no `model.` wrapper: the language model is a whole Llama4ForCausalLM
        language_layers="language_model.model.layers",
        embed="language_model.model.embed_tokens",
        projector="multi_modal_projector",
        vision_layers="vision_model.model.layers",
        image_token_attr="image_token_id",  # the <|patch|> token the features replace
        router="feed_forward.router",  # only in its MoE blocks (`moe_layers`)
    ),
    "idefics3": _IDEFICS3,
    "smolvlm": _IDEFICS3,
    "mllama": FamilySites(
        language_layers="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        projector="model.multi_modal_projector",
        vision_layers="model.vision_model.transformer.layers",
        image_token_attr="image_token_index",
        fusion="cross_attention",
        cross_attention_layers_attr="cross_attention_layers",
    ),
    # Audio tokens in the sequence (audit/adapters/audio.py declares this map and its adapter;
    # tests/test_audio.py keeps the two equal): `vision_layers` are the audio encoder's blocks
    # and `image_token_attr` names the audio placeholder, which Qwen2AudioAdapter reads as audio.
    "qwen2_audio": FamilySites(
        language_layers="model.language_model.layers",
        embed="model.language_model.embed_tokens",
        projector="model.multi_modal_projector",
        vision_layers="model.audio_tower.layers",
        image_token_attr="audio_token_index",
    ),
}

# Dual encoders: image and text meet only in the final similarity (late fusion).
DUAL_FAMILIES = ("clip", "siglip", "siglip2", "vision-text-dual-encoder")


def resolve(root, path: str):
    """The submodule at dotted `path` (ModuleList indices included); in `a|b` the first
    alternative that exists (one model_type, several possible towers)."""
    *alternatives, last = path.split("|")
    for alt in alternatives:
        try:
            return _walk(root, alt)
        except AttributeError:
            continue
    return _walk(root, last)


# Routers return a tuple; the router logits [tokens, experts] are its first element except
# where named here (Llama 4's router returns (scores, logits)). Older routers are a plain
# nn.Linear whose output is the logits.
_LOGITS_AT = {"Llama4Router": 1}


def resolve_router(block, sites: FamilySites):
    """The router module of one decoder block; AttributeError when the family has no router
    map or the block is dense (its MLP has no router)."""
    if sites.router is None:
        raise AttributeError("this family's decoder has no mixture-of-experts router")
    router = resolve(block, sites.router)
    if not hasattr(router, "weight") or router.weight.dim() != 2:  # e.g. a dense MLP's `gate` activation
        raise AttributeError(f"{type(router).__name__} at {sites.router!r} is not a router")
    return router


def router_logits(module, output):
    """The router logits [tokens, experts] in a router's forward output (see `_LOGITS_AT`)."""
    if isinstance(output, (tuple, list)):
        return output[_LOGITS_AT.get(type(module).__name__, 0)]
    return output


def _walk(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod
