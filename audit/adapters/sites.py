"""Declarative maps from canonical hook sites to module paths, one per model family.

Canonical sites (what probes ask for):
    language.embed              token embeddings entering the language model
    language.blocks.{i}.resid   output of decoder block i (residual stream)
    language.blocks.{i}.attn    self-attention module of decoder block i
    projector                   module whose output are the image features the LM reads
    vision.blocks.{i}           vision encoder block i
Like TransformerLens' `component_mapping`, but for the HF module tree as it is, so hooks
run on the unmodified model with its SDPA kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["FamilySites", "GENERATIVE_FAMILIES", "DUAL_FAMILIES", "resolve"]


@dataclass(frozen=True)
class FamilySites:
    language_layers: str
    embed: str
    projector: str
    vision_layers: str
    image_token_attr: str  # config attribute holding the image placeholder token id
    fusion: str = "early"
    cross_attention_layers_attr: str | None = None


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

GENERATIVE_FAMILIES: dict[str, FamilySites] = {
    # Pixtral-12B is a `llava` checkpoint whose vision tower is Pixtral's, not CLIP's.
    "llava": replace(_LLAVA, vision_layers=f"{_LLAVA.vision_layers}|model.vision_tower.transformer.layers"),
    "llava_next": _LLAVA,
    "vipllava": _LLAVA,  # walkthrough: LLaVA's module tree with multi-layer vision features
    "llava_onevision": _LLAVA,
    "gemma3": _LLAVA,
    "paligemma": _LLAVA,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "qwen3_vl_moe": _QWEN,
    "internvl": replace(_LLAVA, vision_layers="model.vision_tower.encoder.layer"),
    "mistral3": replace(_LLAVA, vision_layers="model.vision_tower.transformer.layers"),  # Pixtral tower
    "llama4": FamilySites(  # no `model.` wrapper: the language model is a whole Llama4ForCausalLM
        language_layers="language_model.model.layers",
        embed="language_model.model.embed_tokens",
        projector="multi_modal_projector",
        vision_layers="vision_model.model.layers",
        image_token_attr="image_token_id",  # the <|patch|> token the features replace
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


def _walk(root, path: str):
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod
