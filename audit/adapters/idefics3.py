"""Idefics3 and SmolVLM: with image splitting, one image is several runs of image tokens.

The processor writes each tile as <fake_token_around_image><row_r_col_c> + image tokens, then
the downscaled global view as <fake_token_around_image><global-img> + image tokens. Each run
is a span (a square grid of its tile); the run after <global-img> closes the image, so all
the runs of one image share its `image_index`.
"""
from __future__ import annotations

from dataclasses import replace

from audit.adapters.base import ModalitySpan
from audit.adapters.generative import GenerativeAdapter

__all__ = ["Idefics3Adapter"]


class Idefics3Adapter(GenerativeAdapter):
    def __init__(self, model, processor, *, family, device: str = "cpu") -> None:
        super().__init__(model, processor, architecture=family.model_type, sites=family.sites, device=device)
        self._global_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "global_image_token", "<global-img>"))

    def image_spans(self, input_ids) -> list[list[ModalitySpan]]:
        out = []
        for row, runs in zip(input_ids.tolist(), super().image_spans(input_ids)):
            image, spans = 0, []
            for sp in runs:
                spans.append(replace(sp, image_index=image))
                if sp.start > 0 and row[sp.start - 1] == self._global_id:
                    image += 1
            out.append(spans)
        return out
