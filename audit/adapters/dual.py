"""White-box adapter for dual encoders (CLIP, SigLIP, VisionTextDualEncoder).

A closed-choice question is scored as the image's match with each text
`"{prompt} {candidate}"` (or the candidate alone when the prompt is empty), so the same
manifest drives generative and dual-encoder audits. Scores are the model's own logits
(logit_scale · cos, plus SigLIP's bias).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from audit.adapters.base import Capabilities, DualEncoderWhiteBox, Query, candidate_text
from audit.adapters.sites import resolve
from audit.errors import UnsupportedError

__all__ = ["DualEncoderAdapter", "candidate_text"]


def _features(out) -> torch.Tensor:
    # transformers 5.2x returns a ModelOutput whose pooler_output is the projected
    # embedding; older releases return the tensor itself.
    return out if torch.is_tensor(out) else out.pooler_output


class DualEncoderAdapter(DualEncoderWhiteBox):
    def __init__(self, model, processor, *, architecture: str, device: str = "cpu") -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.architecture = architecture
        self.device = device
        self.capabilities = Capabilities(
            kind="dual_encoder", white_box=True, fusion="late", hooks=True, gradients=True,
            attention_patterns=False,
            notes=("late fusion: no cross-modal attention exists to read or knock out",
                   "cannot generate text; closed choices are scored by image-text similarity"),
        )

    def image_embeddings(self, images: Sequence) -> torch.Tensor:
        px = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        f = _features(self.model.get_image_features(pixel_values=px))
        return f / f.norm(dim=-1, keepdim=True)

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        kwargs = {"padding": "max_length", "truncation": True, "max_length": 64} if "siglip" in self.architecture else {"padding": True, "truncation": True}
        tok = self.processor(text=list(texts), return_tensors="pt", **kwargs)
        tok = {k: v.to(self.device) for k, v in tok.items()}
        f = _features(self.model.get_text_features(**tok))
        return f / f.norm(dim=-1, keepdim=True)

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        logits = img @ txt.T * self.model.logit_scale.exp()
        bias = getattr(self.model, "logit_bias", None)
        return logits + bias if bias is not None else logits

    @torch.no_grad()
    def score(self, queries: Sequence[Query], *, batch_size: int = 32) -> list[np.ndarray]:
        if any(q.image is None for q in queries):
            raise UnsupportedError("a dual encoder needs an image for every query", where=self.architecture)
        out: list[np.ndarray] = []
        for s in range(0, len(queries), batch_size):
            chunk = queries[s:s + batch_size]
            texts = sorted({candidate_text(q.prompt, c) for q in chunk for c in q.candidates})
            index = {t: i for i, t in enumerate(texts)}
            sims = self.similarity(self.image_embeddings([q.image for q in chunk]), self.text_embeddings(texts))
            for r, q in enumerate(chunk):
                cols = [index[candidate_text(q.prompt, c)] for c in q.candidates]
                out.append(sims[r, cols].float().cpu().numpy().astype(np.float64))
        return out

    def site_module(self, site: str) -> torch.nn.Module:
        vision = getattr(self.model, "vision_model")
        paths = {"projector": "visual_projection", "vision.post_layernorm": "vision_model.post_layernorm"}
        try:
            if site in paths:
                return resolve(self.model, paths[site])
            parts = site.split(".")
            if parts[:2] == ["vision", "blocks"]:
                return vision.encoder.layers[int(parts[2])]
        except (AttributeError, IndexError, ValueError) as exc:
            raise UnsupportedError(f"no hook site {site!r} ({exc})", where=self.architecture) from exc
        raise UnsupportedError(f"unknown hook site {site!r} for a dual encoder", where=self.architecture)
