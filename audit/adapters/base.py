"""The adapter protocols: the only layer of mmaudit that knows a model family.

Three declared surfaces, each an abstract class listing every member the rest of mmaudit
may use (a test runs every probe and defense through a proxy that forwards only these):

- `ModelAdapter` — any model, white or black box: `score`, `generate`, `capabilities`.
  Probes that need only outputs use nothing else, so they run unchanged on an endpoint.
- `GenerativeWhiteBox` — a local generative VLM: `encode` a batch, one tensor-level
  scoring call `sequence_logprobs` (forward + continuation log-probabilities,
  differentiable), structure (`image_spans`, `n_layers`, `image_token_id`), canonical hook
  sites and `hooks()`, the model, processor and tokenizer.
- `DualEncoderWhiteBox` — a local dual encoder: image and text embeddings, `similarity`.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from audit.errors import UnsupportedError

__all__ = ["Audio", "Capabilities", "ModalitySpan", "ModelAdapter", "Query", "Encoded", "GenerativeWhiteBox",
           "DualEncoderWhiteBox", "declared_members", "candidate_text"]


@dataclass(frozen=True, eq=False)
class Audio:
    """A mono clip: a 1-D float32 waveform (read-only copy, nominally in [-1, 1]) and its
    sample rate in Hz. Equal and hashed by content, so a Query holding it stays a value."""

    waveform: np.ndarray
    sample_rate: int

    def __post_init__(self) -> None:
        wave = np.array(self.waveform, dtype=np.float32, copy=True)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"an audio waveform must be 1-D and non-empty, got shape {wave.shape}")
        if not np.all(np.isfinite(wave)):
            raise ValueError("an audio waveform must be finite")
        if isinstance(self.sample_rate, bool) or not isinstance(self.sample_rate, (int, np.integer)) \
                or self.sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive integer, got {self.sample_rate!r}")
        wave.setflags(write=False)
        object.__setattr__(self, "waveform", wave)
        object.__setattr__(self, "sample_rate", int(self.sample_rate))

    @property
    def seconds(self) -> float:
        return self.waveform.size / self.sample_rate

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Audio) and self.sample_rate == other.sample_rate
                and np.array_equal(self.waveform, other.waveform))

    def __hash__(self) -> int:
        return hash((self.sample_rate, self.waveform.size, self.waveform.tobytes()))


@dataclass(frozen=True)
class Query:
    """One scoring request: a prompt, an optional image, the candidate answers to score and
    an optional audio clip (last, so positional callers are unchanged).

    `example_id` and `variant` say which example and which ablation / counterfactual /
    perturbation the query is; adapters ignore them, `--log-samples` records them.
    """

    prompt: str
    image: Image.Image | None
    candidates: tuple[str, ...]
    example_id: str | None = field(default=None, compare=False)
    variant: str | None = field(default=None, compare=False)
    audio: Audio | None = None


@dataclass(frozen=True)
class ModalitySpan:
    """Where one modality sits in a token sequence: positions [start, end)."""

    modality: str  # "image" | "text" | "audio"
    start: int
    end: int
    image_index: int | None = None
    grid: tuple[int, int] | None = None  # (rows, cols) of image tokens when known

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do. Probes declare what they need (catalog `needs`, `kinds`,
    `fusions`) and `Probe.check` compares; nothing fails deep inside a probe."""

    kind: str  # "generative" | "dual_encoder"
    white_box: bool
    fusion: str = "early"  # "early" (image tokens in the sequence) | "cross_attention" | "late" | "unknown"
    hooks: bool = False
    attention_patterns: bool = False
    gradients: bool = False
    logprobs: bool = True  # scores are log-probabilities (False: generate mode's parsed-answer indicators)
    modalities: tuple[str, ...] = ("image", "text")  # what `Query` fields the model reads ("audio": Query.audio)
    notes: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Encoded:
    """A padded batch plus where each row's scored continuation sits."""

    inputs: dict[str, Any]
    context_lengths: list[int]
    continuations: list[list[int]]
    texts: list[str] = field(default_factory=list)  # rendered prompts (chat template applied)
    prompts: list[str] = field(default_factory=list)  # the users' prompts inside them

    @property
    def input_ids(self):
        return self.inputs["input_ids"]


def candidate_text(prompt: str, candidate: str) -> str:
    """The text a dual encoder matches for a closed choice: `"{prompt} {candidate}"`."""
    return f"{prompt} {candidate}".strip() if prompt else candidate


class ModelAdapter(ABC):
    """Common surface of white-box and black-box adapters."""

    architecture: str
    capabilities: Capabilities
    device: str = "cpu"

    @abstractmethod
    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        """Log-probability (generative) or matching score (dual encoder) of each candidate."""

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        raise UnsupportedError(f"{self.architecture} cannot generate text", where=self.architecture)

    def describe(self) -> dict:
        return {"architecture": self.architecture, "kind": self.capabilities.kind,
                "white_box": self.capabilities.white_box, "device": self.device}

    def close(self) -> None:
        """Release connections or memory (endpoints close their HTTP client)."""

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


class _WhiteBox(ModelAdapter):
    """Members shared by every local (white-box) adapter."""

    model: Any  # torch.nn.Module
    processor: Any
    tokenizer: Any

    @abstractmethod
    def site_module(self, site: str):
        """The torch module at a canonical site (`audit.adapters.sites`)."""

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

    def module_name(self, site: str) -> str:
        """Dotted name of the module at `site` inside `model` (for peft targets, reports)."""
        target = self.site_module(site)
        for name, mod in self.model.named_modules():
            if mod is target:
                return name
        raise UnsupportedError(f"the module at site {site!r} is not inside the model", where=self.architecture)


class GenerativeWhiteBox(_WhiteBox):
    """A generative model with access to its tensors."""

    image_token_id: int
    audio_token_id: int | None = None  # the placeholder audio features replace (None: the model hears nothing)

    @property
    @abstractmethod
    def n_layers(self) -> int:
        """Number of decoder layers (`language.blocks.{i}` for i < n_layers)."""

    @abstractmethod
    def encode(self, queries: Sequence[Query], continuations: Sequence[Sequence[int]] | None = None) -> Encoded:
        """The chat-formatted context of each query (images processed), optionally followed
        by one continuation of token ids per query, padded on the right."""

    @abstractmethod
    def forward(self, enc: Encoded, **overrides):
        """One forward pass of `model` on `enc` (`overrides` replace inputs, e.g. pixel_values)."""

    @abstractmethod
    def sequence_logprobs(self, enc: Encoded, **overrides):
        """Summed log-probability of each row's continuation, as a differentiable tensor [rows]."""

    @abstractmethod
    def continuation_ids(self, text: str) -> list[int]:
        """Token ids of `text` as a continuation after the prompt (lm-eval convention)."""

    @abstractmethod
    def image_spans(self, input_ids) -> list[list[ModalitySpan]]:
        """Contiguous runs of image tokens in each row."""

    def audio_spans(self, input_ids) -> list[list[ModalitySpan]]:
        """Contiguous runs of audio tokens in each row (`modality="audio"`, `image_index` is
        the clip's index in the row); none for a model without an audio placeholder."""
        rows = input_ids.tolist()
        if self.audio_token_id is None:
            return [[] for _ in rows]
        spans = []
        for row in rows:
            found, start = [], None
            for pos, tok in enumerate([*row, None]):
                if tok == self.audio_token_id and start is None:
                    start = pos
                elif tok != self.audio_token_id and start is not None:
                    found.append(ModalitySpan("audio", start, pos, image_index=len(found)))
                    start = None
            spans.append(found)
        return spans

    @abstractmethod
    def question_mask(self, enc: Encoded):
        """Boolean mask [B, T]: the positions of the user's prompt text. Context positions that
        are neither image tokens nor question are template tokens (BOS, roles, image
        boundaries): attention sinks that a "question" block must not include."""

    @abstractmethod
    def pixel_normalisation(self) -> tuple[list[float], list[float]] | None:
        """(mean, std) per channel the image processor normalises with, or None."""

    @abstractmethod
    def render_prompt(self, query: Query) -> str:
        """The exact text the model reads for `query` before image-token expansion."""

    @abstractmethod
    def generate_detailed(self, queries: Sequence[Query], *, max_new_tokens: int = 8, top_k: int = 0) -> list[dict]:
        """Greedy generation with per-token log-probabilities (the server's answer)."""


class DualEncoderWhiteBox(_WhiteBox):
    """A dual encoder (CLIP-style) with access to its tensors."""

    @abstractmethod
    def image_embeddings(self, images: Sequence):
        """L2-normalised image embeddings [N, D] (differentiable)."""

    @abstractmethod
    def text_embeddings(self, texts: Sequence[str]):
        """L2-normalised text embeddings [M, D] (differentiable)."""

    @abstractmethod
    def similarity(self, image_embeddings, text_embeddings):
        """The model's logits for every (image, text) pair [N, M]."""


def declared_members(protocol: type) -> frozenset[str]:
    """Every public member a protocol class (and its bases) declares: methods, properties
    and annotated attributes. The proxy in tests forwards exactly these."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or not issubclass(cls, ModelAdapter):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")}
        names |= {n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_")}
    return frozenset(names)
