"""The adapter protocol: the only layer of mmaudit that knows a model family.

Probes talk to models through `Query` objects and an adapter's `score`, so the same probe
code runs on a white-box Hugging Face model and on a black-box endpoint.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from audit.errors import UnsupportedError

__all__ = ["Capabilities", "ModalitySpan", "ModelAdapter", "Query"]


@dataclass(frozen=True)
class Query:
    """One scoring request: a prompt, an optional image and the candidate answers to score."""

    prompt: str
    image: Image.Image | None
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class ModalitySpan:
    """Where one modality sits in a token sequence: positions [start, end)."""

    modality: str  # "image" | "text"
    start: int
    end: int
    image_index: int | None = None
    grid: tuple[int, int] | None = None  # (rows, cols) of image tokens when known

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do; probes check these before they run (never fail deep inside)."""

    kind: str  # "generative" | "dual_encoder"
    white_box: bool
    fusion: str = "early"  # "early" (image tokens in the sequence) | "cross_attention" | "late"
    hooks: bool = False
    attention_patterns: bool = False
    gradients: bool = False
    generate: bool = True
    logprobs: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


class ModelAdapter(ABC):
    """Common surface of white-box and black-box adapters."""

    architecture: str
    capabilities: Capabilities
    device: str = "cpu"

    @abstractmethod
    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        """Log-probability (generative) or matching score (dual encoder) of each candidate."""

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        raise NotImplementedError(f"{self.architecture} adapter cannot generate")

    def site_module(self, site: str):
        raise UnsupportedError(f"{self.architecture} exposes no hook sites (black box)", where=site)

    @contextlib.contextmanager
    def hooks(self, fns: Mapping[str, Callable]) -> Iterator[None]:
        """Forward hooks at canonical sites; always removed, even when the body raises."""
        handles = []
        try:
            for site, fn in fns.items():
                handles.append(self.site_module(site).register_forward_hook(fn))
            yield
        finally:
            for h in handles:
                h.remove()

    def describe(self) -> dict:
        return {"architecture": self.architecture, "kind": self.capabilities.kind,
                "white_box": self.capabilities.white_box, "device": self.device}

    @staticmethod
    def choice_distribution(scores: np.ndarray) -> np.ndarray:
        """Normalise candidate scores into a distribution (softmax, numerically stable).

        For one candidate the 'distribution' is (p, 1 - p) with p = exp(log-prob), so the
        same distance measures apply to scored reference answers.
        """
        s = np.asarray(scores, dtype=np.float64)
        if s.size == 1:
            p = float(np.exp(min(s[0], 0.0)))
            return np.array([p, 1.0 - p])
        z = np.exp(s - s.max())
        return z / z.sum()
