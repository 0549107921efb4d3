"""White-box adapter for generative vision-language models loaded from a local HF folder.

Scoring follows the lm-eval convention: the context (chat-formatted prompt with its image)
is tokenised by the model's own processor, each candidate continuation separately, and the
two id sequences are concatenated, so a candidate's score never depends on how the
tokenizer would merge it with the prompt.

Work an audit repeats is done once per adapter (probes score the same images and prompts
many times): rendered prompts and candidate token ids are memoised, processed images and
tokenised texts sit in bounded LRUs (`audit.adapters.caching`), and queries that share an
image share one computation of the image prefix, when scoring and when generating
(`audit.adapters.prefix_cache`). None of it changes a number: the caches are compared with
the processor's own batched output on first use and turn themselves off on any difference,
shared-prefix decoding is compared with `generate` once, and prefix reuse runs only on
families whose decoder reads the image as ordinary prefix tokens and never while hooks or
an attention plan are active (tests/test_caching.py, tests/test_prefix_reuse.py).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from audit.adapters.base import Capabilities, Encoded, GenerativeWhiteBox, ModalitySpan, Query
from audit.adapters.caching import LRU, CachedImages, CachedTokenizer, image_key
from audit.adapters.sites import FamilySites, resolve, resolve_router
from audit.errors import InputError, UnsupportedError

__all__ = ["GenerativeAdapter", "Encoded", "FALLBACK_TEMPLATE", "continuation_logprobs", "image_key", "LRU",
           "PREFIX_FAMILIES", "IMAGE_CACHE_BYTES"]

# Used when a processor ships no chat template (documented in the README).
FALLBACK_TEMPLATE = "USER: {image}{prompt} ASSISTANT:"
NAN_MESSAGE = "the model returned NaN or infinite log-probabilities"
MISMATCH_MESSAGE = "the prompt's image tokens do not match the image features the model computed"
# Processor outputs that are never per-token, even when their shape happens to look like it.
_IMAGE_KEYS = ("pixel_", "image_", "video_", "aspect_ratio", "batch_num_images")
# Audio processor outputs (Whisper-style features [B, mels, frames] and their frame mask).
_AUDIO_KEYS = ("input_features", "feature_attention_mask", "num_audio_tokens")
# Decoder-only families whose image enters as ordinary prefix tokens with causal attention and
# 1-D positions, so a KV cache of the image prefix is exact (not Qwen's M-RoPE, PaliGemma's
# bidirectional prefix, Gemma 3's image attention or Mllama's cross-attention).
PREFIX_FAMILIES = frozenset({"llava", "llava_next", "llava_onevision"})
IMAGE_CACHE_BYTES = 256 * 2**20  # processed images kept per adapter
TEXT_CACHE_ENTRIES = 65536  # rendered prompts and candidate ids kept per adapter


def _hooked(model: torch.nn.Module) -> bool:
    """Whether a forward hook not of transformers' own making is registered on `model` or
    globally (transformers installs output-recording hooks on first use; they only record)."""
    from torch.nn.modules import module as torch_module

    def foreign(hooks) -> bool:
        return any(not getattr(fn, "__module__", "").startswith("transformers.") for fn in hooks.values())

    if foreign(torch_module._global_forward_hooks) or foreign(torch_module._global_forward_pre_hooks):
        return True
    return any(foreign(m._forward_hooks) or foreign(m._forward_pre_hooks) for m in model.modules())


def _audio_token_id(cfg) -> int | None:
    """The placeholder token audio features replace, when the model has an audio tower (some
    image-text configs carry an unused audio_token_id default)."""
    if getattr(cfg, "audio_config", None) is None:
        return None
    for name in ("audio_token_id", "audio_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def _same_steps(a, b, tol: float = 1e-4) -> bool:
    """Whether two decodings chose the same tokens with the same log-probabilities."""
    (rows_a, len_a), (rows_b, len_b) = a, b
    if len_a != len_b or [[t for t, _ in r] for r in rows_a] != [[t for t, _ in r] for r in rows_b]:
        return False
    return all(float((torch.log_softmax(x.float(), -1) - torch.log_softmax(y.float(), -1)).abs().max()) <= tol
               for ra, rb in zip(rows_a, rows_b) for (_, x), (_, y) in zip(ra, rb))


def continuation_logprobs(logits: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """Summed log-probability of each row's continuation, differentiable."""
    out = []
    for r, (n, c) in enumerate(zip(enc.context_lengths, enc.continuations)):
        pos = torch.arange(n - 1, n - 1 + len(c), device=logits.device)
        lp = torch.log_softmax(logits[r, pos].float(), dim=-1)
        out.append(lp[torch.arange(len(c)), torch.tensor(c, device=logits.device)].sum())
    return torch.stack(out)


class GenerativeAdapter(GenerativeWhiteBox):
    def __init__(self, model, processor, *, architecture: str, sites: FamilySites, device: str = "cpu") -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.architecture = architecture
        self.sites = sites
        self.device = device
        cfg = model.config
        self.image_token_id = getattr(cfg, sites.image_token_attr, None)
        if self.image_token_id is None:
            raise UnsupportedError(f"config has no {sites.image_token_attr}", where=architecture)
        self.image_token = self.tokenizer.convert_ids_to_tokens(int(self.image_token_id))
        self.audio_token_id = _audio_token_id(cfg)
        self.capabilities = Capabilities(
            kind="generative", white_box=True, fusion=sites.fusion, hooks=True,
            attention_patterns=True, gradients=True,
            notes=("attention patterns are read by switching only the read layers to eager attention",),
        )
        self.prefix_reuse = True  # share the image prefix's KV cache between queries (exact; see prefix_cache)
        self._generate_reuse: bool | None = None  # shared-prefix decoding: None until checked once
        self._image_cache = LRU(max_bytes=IMAGE_CACHE_BYTES)
        self._image_cache_on, self._image_cache_verified = True, False
        self._token_cache = LRU(max_entries=TEXT_CACHE_ENTRIES)
        self._token_cache_on, self._token_cache_verified = True, False
        self._texts = LRU(max_entries=TEXT_CACHE_ENTRIES)
        self._continuations = LRU(max_entries=TEXT_CACHE_ENTRIES)
        self._image_keys: dict[int, tuple] = {}  # id(image) -> (image, key) within one call

    # ------------------------------------------------------------------ caches
    def _image_key(self, image) -> str:
        hit = self._image_keys.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
        return image_key(image)

    @contextlib.contextmanager
    def _call_scope(self, queries: Sequence[Query]) -> Iterator[None]:
        """Hash each distinct image object of a call once (the queries keep them alive)."""
        reads = self.capabilities.modalities
        for q in queries:  # a clip or image the model cannot read must not be dropped silently
            for what, value in (("image", q.image), ("audio", q.audio)):
                if value is not None and what not in reads:
                    raise UnsupportedError(f"{self.architecture} does not read {what} input", where=self.architecture)
        outer = self._image_keys
        self._image_keys = dict(outer)
        for q in queries:
            if q.image is not None and id(q.image) not in self._image_keys:
                self._image_keys[id(q.image)] = (q.image, image_key(q.image))
        try:
            yield
        finally:
            self._image_keys = outer

    def _image_cache_fails(self, real):
        self._image_cache_on = False
        self._image_cache = LRU(max_bytes=0)
        return real

    def _token_cache_fails(self, real):
        self._token_cache_on = False
        self._token_cache = LRU(max_entries=0)
        return real

    def clear_caches(self) -> None:
        """Forget every memoised prompt, candidate, tokenised text and processed image (e.g.
        after editing the processor)."""
        self._image_cache = LRU(max_bytes=IMAGE_CACHE_BYTES)
        self._token_cache = LRU(max_entries=TEXT_CACHE_ENTRIES)
        self._texts = LRU(max_entries=TEXT_CACHE_ENTRIES)
        self._continuations = LRU(max_entries=TEXT_CACHE_ENTRIES)

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, query: Query) -> str:
        return self._rendered(query.prompt, query.image is not None, query.audio is not None)

    def _rendered(self, prompt: str, has_image: bool, has_audio: bool = False) -> str:
        key = (prompt, has_image, has_audio)
        text = self._texts.get(key)
        if text is None:  # a Jinja render per query was a tenth of an audit's time
            # has_audio only when set: family overrides of prompt_text predate it
            text = self.prompt_text(prompt, has_image=has_image, **({"has_audio": True} if has_audio else {}))
            self._texts.put(key, text)
        return text

    def prompt_text(self, prompt: str, *, has_image: bool, has_audio: bool = False) -> str:
        template = getattr(self.processor, "chat_template", None)
        if template:
            content = ([{"type": "image"}] if has_image else []) + ([{"type": "audio"}] if has_audio else []) \
                + [{"type": "text", "text": prompt}]
            try:  # transformers renders templates in a Jinja sandbox; a broken one is the model folder's fault
                return self.processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # noqa: BLE001 - jinja2 raises many types (TemplateError, SecurityError, ...)
                msg = " ".join(str(exc).split())[:200]
                raise InputError(f"the model's chat template failed ({type(exc).__name__}: {msg})",
                                 where=f"{self.architecture} chat_template") from exc
        media = f"{self.image_placeholder}\n" if has_image else ""
        media += f"{self.audio_placeholder}\n" if has_audio else ""
        return FALLBACK_TEMPLATE.format(image=media, prompt=prompt)

    @property
    def audio_placeholder(self) -> str:
        """What the prompt text holds for one clip before the processor expands it (Qwen2-Audio
        wraps its audio token in audio_bos / audio_eos)."""
        p = self.processor
        token = getattr(p, "audio_token", None) or self.tokenizer.convert_ids_to_tokens(int(self.audio_token_id))
        return f"{getattr(p, 'audio_bos_token', None) or ''}{token}{getattr(p, 'audio_eos_token', None) or ''}"

    @property
    def image_placeholder(self) -> str:
        """What the prompt text holds for one image before the processor expands it."""
        # Gemma 3 writes <start_of_image> (its processor's image_token), not the soft token.
        text = getattr(self.processor, "image_token", None) or self.image_token
        start, end = (getattr(self.model.config, f"vision_{k}_token_id", None) for k in ("start", "end"))
        if start is not None and end is not None:  # Qwen2-VL wraps each image
            ids = self.tokenizer.convert_ids_to_tokens([int(start), int(end)])
            text = f"{ids[0]}{text}{ids[1]}"
        return text

    @property
    def context_length(self) -> int | None:
        """Longest sequence the language model was built for (None when the config does not say)."""
        cfg = self.model.config
        for c in (getattr(cfg, "text_config", None), cfg):
            n = getattr(c, "max_position_embeddings", None) if c is not None else None
            if isinstance(n, int) and n > 0:
                return n
        return None

    def continuation_ids(self, text: str) -> list[int]:
        ids = self._continuations.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(" " + text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise InputError(f"candidate {text!r} tokenizes to nothing")
            self._continuations.put(text, ids)
        return list(ids)

    # ------------------------------------------------------------------ encoding
    @contextlib.contextmanager
    def _padding(self, side: str) -> Iterator[None]:
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = side
        try:
            yield
        finally:
            self.tokenizer.padding_side = old

    def _process(self, prompts: Sequence[str], images: Sequence, *, side: str = "right",
                 texts: Sequence[str] | None = None, audios: Sequence | None = None) -> dict:
        audios = list(audios) if audios is not None else [None] * len(images)
        texts = texts or [self._rendered(p, im is not None, a is not None) for p, im, a in zip(prompts, images, audios)]
        present = [im for im in images if im is not None]
        if present and len(present) != len(images):
            raise InputError("a batch mixes queries with and without images")
        kwargs = {}
        if present:
            # One list per prompt: flat lists are read as one prompt's images by some processors (Gemma 3)
            kwargs["images"] = [[im] for im in present]
        clips = [a for a in audios if a is not None]
        if clips:
            if len(clips) != len(audios):
                raise InputError("a batch mixes queries with and without audio")
            kwargs.update(self._audio_kwargs(clips))
        # Templates that write BOS themselves (Llama 3, Gemma 3) must not get a second one.
        bos = self.tokenizer.bos_token
        kwargs["add_special_tokens"] = not (bos and all(t.startswith(bos) for t in texts))
        with self._padding(side), self._cached_processing(bool(present)) as cached:
            try:
                out = self.processor(text=texts, return_tensors="pt", padding=True, padding_side=side, **kwargs)
            except Exception:  # noqa: BLE001 - whatever broke, the real processor decides
                if not cached:
                    raise
                self._image_cache_fails(None)
                self._token_cache_fails(None)
                out = None
        if out is None:
            with self._padding(side):
                out = self.processor(text=texts, return_tensors="pt", padding=True, padding_side=side, **kwargs)
        return dict(out)

    def _audio_kwargs(self, clips: Sequence) -> dict:
        """The processor's audio arguments: every clip resampled to its feature extractor's
        rate (polyphase, scipy) and refused when longer than the model's window."""
        from scipy.signal import resample_poly

        fe = getattr(self.processor, "feature_extractor", None)
        rate = getattr(fe, "sampling_rate", None)
        if rate is None:
            raise UnsupportedError("the processor has no audio feature extractor", where=self.architecture)
        window = getattr(fe, "n_samples", None)
        waves = []
        for clip in clips:
            w = clip.waveform
            if clip.sample_rate != rate:
                g = math.gcd(int(rate), clip.sample_rate)
                w = resample_poly(w.astype(np.float64), int(rate) // g, clip.sample_rate // g).astype(np.float32)
            if window is not None and len(w) > window:
                raise InputError(f"the clip is {clip.seconds:.2f} s, longer than the model's audio window of "
                                 f"{window / rate:g} s", where=self.architecture)
            waves.append(np.ascontiguousarray(w))
        return {"audio": waves, "sampling_rate": int(rate)}

    @contextlib.contextmanager
    def _cached_processing(self, images: bool) -> Iterator[bool]:
        """Swap the processor's image processor and tokenizer for their caching stand-ins."""
        swaps = []
        for attr, on, proxy in (("image_processor", images and self._image_cache_on, CachedImages),
                                ("tokenizer", self._token_cache_on, CachedTokenizer)):
            inner = getattr(self.processor, attr, None)
            if on and inner is not None and callable(inner) and inner is not self.processor:
                swaps.append((attr, inner))
                setattr(self.processor, attr, proxy(self, inner))
        try:
            yield bool(swaps)
        finally:
            for attr, inner in swaps:
                setattr(self.processor, attr, inner)

    def encode(self, queries: Sequence[Query], continuations: Sequence[Sequence[int]] | None = None) -> Encoded:
        """Context of each query, optionally followed by a continuation (one per query)."""
        texts = [self.render_prompt(q) for q in queries]
        with self._call_scope(queries):
            raw = self._process([q.prompt for q in queries], [q.image for q in queries], texts=texts,
                                audios=[q.audio for q in queries])
        ids, mask = raw["input_ids"], raw["attention_mask"]
        lengths = [int(n) for n in mask.sum(1)]
        limit = self.context_length
        if limit is not None:
            for q, n in zip(queries, lengths):
                if n + max((len(c) for c in (continuations or [[]])), default=0) > limit:
                    raise InputError(f"the prompt is {n} tokens, longer than the model's context of {limit} tokens",
                                     where=f"prompt {q.prompt[:40]!r}")
        conts = [list(c) for c in continuations] if continuations is not None else [[] for _ in queries]
        total = max(n + len(c) for n, c in zip(lengths, conts))
        pad = self.tokenizer.pad_token_id or 0
        seq_keys = [k for k, v in raw.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape
                    and not k.startswith(_IMAGE_KEYS + _AUDIO_KEYS)]
        inputs = {k: v for k, v in raw.items() if k not in seq_keys and k != "num_audio_tokens"}
        for key in seq_keys:
            v = raw[key]
            rows = []
            for r, (n, c) in enumerate(zip(lengths, conts)):
                ctx = v[r, :n]
                if key == "input_ids":
                    ext = torch.tensor(c, dtype=v.dtype)
                elif key.endswith("token_type_ids"):  # Gemma 3 / Qwen2-VL: a continuation is text (type 0)
                    ext = torch.zeros((len(c), *ctx.shape[1:]), dtype=v.dtype)
                else:  # masks (attention, Mllama's cross-attention) continue like the last context token
                    ext = ctx[-1:].expand(len(c), *ctx.shape[1:])
                row = torch.cat([ctx, ext])
                fill = pad if key == "input_ids" else 0
                padding = torch.full((total - len(row), *row.shape[1:]), fill, dtype=v.dtype)
                rows.append(torch.cat([row, padding]))
            inputs[key] = torch.stack(rows)
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        return Encoded(inputs=inputs, context_lengths=lengths, continuations=conts, texts=texts,
                       prompts=[q.prompt for q in queries])

    def forward(self, enc: Encoded, **overrides):
        inputs = {**enc.inputs, **{k: v for k, v in overrides.items() if k in enc.inputs}}
        extra = {k: v for k, v in overrides.items() if k not in enc.inputs}
        with self._mismatch_as_input_error():
            return self.model(**inputs, use_cache=False, **extra)

    def sequence_logprobs(self, enc: Encoded, **overrides) -> torch.Tensor:
        return continuation_logprobs(self.forward(enc, **overrides).logits, enc)

    @contextlib.contextmanager
    def _mismatch_as_input_error(self) -> Iterator[None]:
        # HF raises a bare ValueError deep in the forward ("... tokens: 3, features: 4");
        # it means the prompt was built or edited wrongly, which is the caller's input.
        try:
            yield
        except ValueError as exc:
            msg = str(exc).lower()
            if isinstance(exc, InputError) or "token" not in msg or "feature" not in msg:
                raise
            raise InputError(f"{MISMATCH_MESSAGE} ({exc})", where=self.architecture) from exc

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, queries: Sequence[Query], *, batch_size: int = 16) -> list[np.ndarray]:
        results: list[np.ndarray | None] = [None] * len(queries)
        with self._call_scope(queries):
            if self._reuse_prefixes():
                from audit.adapters.prefix_cache import score_shared_prefixes

                for i, scores in score_shared_prefixes(self, queries, batch_size=batch_size).items():
                    results[i] = scores
            # Batches never mix image and text-only queries (processors require that), nor
            # queries with and without audio (the audio groups are empty for image models).
            for has_image in (True, False):
                for has_audio in (False, True):
                    idx = [i for i, q in enumerate(queries) if results[i] is None
                           and (q.image is not None) == has_image and (q.audio is not None) == has_audio]
                    for s in range(0, len(idx), batch_size):
                        chunk = idx[s:s + batch_size]
                        for i, scores in zip(chunk, self._score_batch([queries[i] for i in chunk])):
                            results[i] = scores
        return results  # type: ignore[return-value]

    def _reuse_prefixes(self) -> bool:
        """Prefix reuse is exact only for the plain forward of a listed family: a hook or an
        attention plan expects every forward to see whole sequences."""
        if not (self.prefix_reuse and self.architecture in PREFIX_FAMILIES and self.capabilities.fusion == "early"):
            return False
        from audit.adapters.attention import _PLAN

        return not _PLAN.get() and not _hooked(self.model)

    def _score_batch(self, queries: Sequence[Query]) -> list[np.ndarray]:
        cand_ids = [[self.continuation_ids(c) for c in q.candidates] for q in queries]
        if all(len(ids) == 1 for row in cand_ids for ids in row):
            # Fast path: every candidate is one token, one forward per query scores them all.
            enc = self.encode(queries)
            logits = self.forward(enc).logits
            out = []
            for r, n in enumerate(enc.context_lengths):
                lp = torch.log_softmax(logits[r, n - 1].float(), dim=-1)
                out.append(lp[[ids[0] for ids in cand_ids[r]]].cpu().numpy().astype(np.float64))
        else:
            rows = [(i, ids) for i, row in enumerate(cand_ids) for ids in row]
            enc = self.encode([queries[i] for i, _ in rows], [ids for _, ids in rows])
            flat = self.sequence_logprobs(enc).cpu().numpy().astype(np.float64)
            out, k = [], 0
            for row in cand_ids:
                out.append(flat[k:k + len(row)])
                k += len(row)
        for q, s in zip(queries, out):
            if not np.all(np.isfinite(s)):
                raise InputError(NAN_MESSAGE, where=f"prompt {q.prompt[:40]!r}")
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_detailed(self, queries: Sequence[Query], *, max_new_tokens: int = 8, top_k: int = 0) -> list[dict]:
        """Greedy generation with per-token log-probabilities and top-k alternatives.

        Each row: `text` (the answer), `tokens` (every generated step, the stop token
        included with its log-probability, as vLLM reports it), `finish_reason`
        ("stop" | "length") and `prompt_tokens`. Token strings are raw decodes, so BPE
        tokens keep their leading space as in OpenAI's API. Queries that share an image
        decode on one KV cache of the image prefix (`prefix_cache.generate_shared_prefixes`),
        checked once per adapter against transformers' `generate`.
        """
        with self._call_scope(queries):
            got = None
            if self._generate_reuse is not False and self._reuse_prefixes():
                from audit.adapters.prefix_cache import generate_shared_prefixes

                got = generate_shared_prefixes(self, queries, max_new_tokens=max_new_tokens)
            if got is None or self._generate_reuse is None:
                plain = self._generate_plain(queries, max_new_tokens)
                if got is not None:  # first use: keep the shared path only if it decodes the same
                    self._generate_reuse = _same_steps(got, plain)
                got = plain
        steps, prompt_lengths = got
        return [self._row(row, n, top_k) for row, n in zip(steps, prompt_lengths)]

    def _generate_plain(self, queries: Sequence[Query], max_new_tokens: int):
        """(per row the generated (token id, scores) steps up to and including a stop token,
        prompt lengths) from transformers' `generate` on a left-padded batch."""
        raw = self._process([q.prompt for q in queries], [q.image for q in queries], side="left",
                            audios=[q.audio for q in queries])
        raw = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in raw.items() if k != "num_audio_tokens"}
        with self._mismatch_as_input_error():
            out = self.model.generate(
                **raw, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                return_dict_in_generate=True, pad_token_id=self.tokenizer.pad_token_id,
            )
        start = raw["input_ids"].shape[1]
        stops = self._stops()
        rows = []
        for r in range(len(queries)):
            steps = []
            for t, scores in enumerate(out.scores):
                tid = int(out.sequences[r, start + t])
                steps.append((tid, scores[r]))
                if tid in stops:
                    break
            rows.append(steps)
        return rows, [int(n) for n in raw["attention_mask"].sum(1)]

    def _stops(self) -> set:
        return {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}

    def _row(self, steps, prompt_tokens: int, top_k: int) -> dict:
        out, ids, finish = [], [], "length"
        for tid, scores in steps:
            lp = torch.log_softmax(scores.float(), dim=-1)
            top = []
            if top_k:
                vals, idx = lp.topk(min(top_k, lp.numel()))
                top = [(self.tokenizer.decode([int(i)]), float(v)) for v, i in zip(vals, idx)]
            out.append({"token": self.tokenizer.decode([tid]), "logprob": float(lp[tid]), "top": top})
            if tid in self._stops():
                finish = "stop"
                break
            ids.append(tid)
        return {"text": self._decode(ids), "tokens": out, "finish_reason": finish, "prompt_tokens": prompt_tokens}

    def _decode(self, ids: list[int]) -> str:
        if self._word_level:  # decode() would glue the words of a word-level vocabulary together
            special = set(self.tokenizer.all_special_ids)  # skipped, as on the other path (and in vLLM)
            return " ".join(w for w in (self.tokenizer.decode([i]).strip() for i in ids if i not in special) if w)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @property
    def _word_level(self) -> bool:
        model = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "model", None)
        return type(model).__name__ == "WordLevel"

    def generate(self, queries: Sequence[Query], *, max_new_tokens: int = 8) -> list[str]:
        return [r["text"] for r in self.generate_detailed(queries, max_new_tokens=max_new_tokens)]

    # ------------------------------------------------------------------ structure and hooks
    def image_spans(self, input_ids: torch.Tensor) -> list[list[ModalitySpan]]:
        """Contiguous runs of image tokens in each row."""
        spans = []
        for row in input_ids.tolist():
            found, start = [], None
            for pos, tok in enumerate([*row, None]):
                if tok == self.image_token_id and start is None:
                    start = pos
                elif tok != self.image_token_id and start is not None:
                    n = pos - start
                    side = int(round(n ** 0.5))
                    grid = (side, side) if side * side == n and n > 1 else None
                    found.append(ModalitySpan("image", start, pos, image_index=len(found), grid=grid))
                    start = None
            spans.append(found)
        return spans

    def question_mask(self, enc: Encoded) -> torch.Tensor:
        """Positions of each row's user prompt: the template text before and after it is
        tokenised alone (image placeholders expand as in the processed row), the rest of the
        context minus image tokens is the question."""
        ids = enc.input_ids
        mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for r, (text, prompt, n) in enumerate(zip(enc.texts, enc.prompts, enc.context_lengths)):
            start = text.rfind(prompt) if prompt else -1
            if start < 0:
                continue
            bos = self.tokenizer.bos_token
            head = self.tokenizer(text[:start], add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
            tail = self.tokenizer(text[start + len(prompt):], add_special_tokens=False)["input_ids"]
            n_image = int((ids[r, :n] == self.image_token_id).sum())
            n_placeholder = sum(1 for t in head if t == self.image_token_id)
            lo = len(head) - n_placeholder + n_image
            if self.audio_token_id is not None:  # an audio placeholder expands like an image's
                lo += int((ids[r, :n] == self.audio_token_id).sum()) - sum(1 for t in head if t == self.audio_token_id)
            hi = n - len(tail)
            if lo < hi:
                mask[r, lo:hi] = True
        # Tokens the processor adds around the image (image open/close, row separators) are
        # special added tokens the rendered text never held: never part of the question.
        special = [i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special]
        special.append(self.image_token_id)
        if self.audio_token_id is not None:
            special.append(self.audio_token_id)
        return mask & ~torch.isin(ids, torch.tensor(special, device=ids.device))

    def pixel_normalisation(self) -> tuple[list[float], list[float]] | None:
        ip = getattr(self.processor, "image_processor", None)
        if ip is None or not getattr(ip, "do_normalize", True):
            return None
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is None or std is None:
            return None
        return list(mean) if not isinstance(mean, float) else [mean], list(std) if not isinstance(std, float) else [std]

    @property
    def n_layers(self) -> int:
        return len(resolve(self.model, self.sites.language_layers))

    def site_module(self, site: str) -> torch.nn.Module:
        parts = site.split(".")
        try:
            if site == "projector":
                return resolve(self.model, self.sites.projector)
            if site == "language.embed":
                return resolve(self.model, self.sites.embed)
            if parts[:2] == ["language", "blocks"]:
                block = resolve(self.model, self.sites.language_layers)[int(parts[2])]
                if parts[3] == "resid":
                    return block
                if parts[3] == "attn":
                    return block.self_attn if hasattr(block, "self_attn") else block.cross_attn
                if parts[3] == "router":
                    return resolve_router(block, self.sites)
            if parts[:2] == ["vision", "blocks"]:
                return resolve(self.model, self.sites.vision_layers)[int(parts[2])]
        except (AttributeError, IndexError, ValueError) as exc:
            raise UnsupportedError(f"no hook site {site!r} on this model ({exc})", where=self.architecture) from exc
        raise UnsupportedError(f"unknown hook site {site!r}", where=self.architecture)

    def describe(self) -> dict:
        d = super().describe()
        d["n_layers"] = self.n_layers
        d["parameters"] = sum(p.numel() for p in self.model.parameters())
        return d
