"""Families whose processor writes one image as several runs of image tokens.

Pixtral (Mistral 3; Pixtral-12B, a `llava` checkpoint) closes each row of [IMG] tokens with
[IMG_BREAK] and the image with [IMG_END]. Llama 4 writes each tile's <|patch|> tokens between
tile separators, then the global view's after <|image|>, and closes with <|image_end|>. The
features go to the image tokens only, so an image is several spans: they share the image's
`image_index`, and a span claims a square grid only where it is a tile (never a Pixtral row).
"""
from __future__ import annotations

from audit.adapters.base import ModalitySpan
from audit.adapters.generative import GenerativeAdapter

__all__ = ["PixtralAdapter", "Llama4Adapter", "runs_by_image"]


def runs_by_image(input_ids, image_token_id: int, end_id: int, *, tiles: bool) -> list[list[ModalitySpan]]:
    """Runs of `image_token_id` in each row; a new image starts after each `end_id`."""
    out = []
    for row in input_ids.tolist():
        spans, image, start = [], 0, None
        for pos, tok in enumerate([*row, None]):
            if tok == image_token_id:
                start = pos if start is None else start
                continue
            if start is not None:
                side = int(round((pos - start) ** 0.5))
                grid = (side, side) if tiles and side * side == pos - start and side > 1 else None
                spans.append(ModalitySpan("image", start, pos, image_index=image, grid=grid))
                start = None
            if tok == end_id:
                image += 1
        out.append(spans)
    return out


class PixtralAdapter(GenerativeAdapter):
    def __init__(self, model, processor, *, family, device: str = "cpu") -> None:
        super().__init__(model, processor, architecture=family.model_type, sites=family.sites, device=device)
        # None for a LLaVA processor without Pixtral's rows: the generic spans apply.
        self._image_end_id = getattr(processor, "image_end_token_id", None)

    def image_spans(self, input_ids) -> list[list[ModalitySpan]]:
        if self._image_end_id is None:
            return super().image_spans(input_ids)
        return runs_by_image(input_ids, self.image_token_id, self._image_end_id, tiles=False)


class Llama4Adapter(GenerativeAdapter):
    def __init__(self, model, processor, *, family, device: str = "cpu") -> None:
        super().__init__(model, processor, architecture=family.model_type, sites=family.sites, device=device)
        self._image_end_id = int(model.config.eoi_token_index)

    def image_spans(self, input_ids) -> list[list[ModalitySpan]]:
        return runs_by_image(input_ids, self.image_token_id, self._image_end_id, tiles=True)
