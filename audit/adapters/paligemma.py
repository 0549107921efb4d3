"""PaliGemma: prefix-LM prompts on the generic adapter.

PaliGemma reads "<image>... <bos>prompt\\n" (the processor inserts the BOS after the last
image token and appends the newline) with bidirectional attention over that prefix
(`token_type_ids` 0) and causal attention over the answer (`token_type_ids` 1). Its
checkpoints ship no chat template and its processor refuses a prompt without an image.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from audit.adapters.base import Encoded, Query
from audit.adapters.generative import GenerativeAdapter
from audit.errors import UnsupportedError

__all__ = ["PaliGemmaAdapter"]


class PaliGemmaAdapter(GenerativeAdapter):
    def __init__(self, model, processor, *, family, device: str = "cpu") -> None:
        super().__init__(model, processor, architecture=family.model_type, sites=family.sites, device=device)

    def prompt_text(self, prompt: str, *, has_image: bool) -> str:
        if not has_image:
            raise UnsupportedError("PaliGemma reads every prompt with an image; a text-only query cannot be scored",
                                   where=self.architecture)
        if getattr(self.processor, "chat_template", None):
            return super().prompt_text(prompt, has_image=has_image)
        return f"{self.image_placeholder}{prompt}"

    def _process(self, prompts, images, **kwargs) -> dict:
        out = super()._process(prompts, images, **kwargs)
        out.pop("labels", None)  # built from token_type_ids for fine-tuning; it would make forward compute a loss
        return out

    def encode(self, queries: Sequence[Query], continuations: Sequence[Sequence[int]] | None = None) -> Encoded:
        enc = super().encode(queries, continuations)
        types = enc.inputs["token_type_ids"]
        for r, n in enumerate(enc.context_lengths):
            # The continuation is the causal suffix: with type 0 it would join the bidirectional
            # prefix and every answer token would see the ones after it.
            types[r, n:] = 1
        return enc

    def question_mask(self, enc: Encoded) -> torch.Tensor:
        mask = super().question_mask(enc)
        # The BOS and the closing newline come from the processor, not from the rendered text.
        newline = len(self.tokenizer("\n", add_special_tokens=False)["input_ids"])
        for r, n in enumerate(enc.context_lengths):
            mask[r, n - newline:n] = False
        return mask & (enc.input_ids != self.tokenizer.bos_token_id)
