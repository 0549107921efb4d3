"""Audio-language models whose audio enters the decoder as placeholder tokens (Qwen2-Audio).

Qwen2-Audio is the audio twin of LLaVA: a Whisper-style encoder turns log-mel features into
one vector per 40 ms, a linear projector maps them into the language model's embedding
space, and the processor expands one `<|AUDIO|>` placeholder into as many tokens as the
clip has encoder frames, so `masked_scatter` puts the audio features at those positions.
Everything the generic white-box adapter does (lm-eval scoring, hooks, question mask) holds
unchanged; this module only says where the audio is:

- `audio_token_id` is the placeholder the features replace; `audio_spans` (declared on
  `GenerativeWhiteBox`) finds its runs, `ModalitySpan(modality="audio")`.
- `image_token_id` is -1: no position is ever an image token, so image probes find nothing
  to read instead of mistaking audio for an image.
- `capabilities.modalities` is ("audio", "text"): an image query is refused, not dropped.
- hook sites: the canonical language sites and `projector` as for LLaVA; the encoder's
  blocks are `audio.blocks.{i}` (there is no `vision.blocks`).

The site map is declared here and registered (the same object's fields) in
`audit.adapters.sites` / `audit.adapters.families`, which stay torch-free.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from audit.adapters.families import Family, family_of
from audit.adapters.generative import GenerativeAdapter
from audit.adapters.sites import GENERATIVE_FAMILIES, resolve
from audit.errors import UnsupportedError

__all__ = ["QWEN2_AUDIO_SITES", "QWEN2_AUDIO_FAMILY", "Qwen2AudioAdapter", "AUDIO_LAYERS"]

# The registry's entry (audit/adapters/sites.py, families.py): `vision_layers` holds the
# audio encoder's blocks and `image_token_attr` the audio placeholder (FamilySites has no
# audio fields); Qwen2AudioAdapter reads both as audio.
QWEN2_AUDIO_SITES = GENERATIVE_FAMILIES["qwen2_audio"]
AUDIO_LAYERS = QWEN2_AUDIO_SITES.vision_layers
QWEN2_AUDIO_FAMILY = family_of("qwen2_audio")


class Qwen2AudioAdapter(GenerativeAdapter):
    """GenerativeAdapter for Qwen2AudioForConditionalGeneration checkpoints."""

    def __init__(self, model, processor, *, family: Family = QWEN2_AUDIO_FAMILY, device: str = "cpu") -> None:
        super().__init__(model, processor, architecture=family.model_type, sites=family.sites, device=device)
        # The base class read the placeholder of `image_token_attr`: here it is audio's.
        self.audio_token_id = int(self.image_token_id)
        self.image_token_id = -1
        self.image_token = None
        self.prefix_reuse = False  # prefix KV reuse is implemented for image prefixes only
        self.capabilities = replace(
            self.capabilities, modalities=("audio", "text"),
            notes=(*self.capabilities.notes, "audio tokens in the sequence; audio encoder blocks at audio.blocks.{i}"))

    def site_module(self, site: str) -> torch.nn.Module:
        parts = site.split(".")
        if parts[0] == "audio" and len(parts) == 3 and parts[1] == "blocks":
            try:
                return resolve(self.model, AUDIO_LAYERS)[int(parts[2])]
            except (AttributeError, IndexError, ValueError) as exc:
                raise UnsupportedError(f"no hook site {site!r} on this model ({exc})", where=self.architecture) from exc
        if parts[0] == "vision":
            raise UnsupportedError(f"{self.architecture} has no vision tower; its encoder blocks are "
                                   "audio.blocks.{i}", where=self.architecture)
        return super().site_module(site)
