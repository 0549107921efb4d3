"""Score queries that share an image while computing their shared prefix only once.

Probes ask the same image many questions (text ablations, counterfactual prompts,
permuted prompts) and score several candidates after one context. For a decoder that reads
the image as ordinary prefix tokens, everything up to and including the last image token
is the same for all of them: it is run once per distinct image (prefixes of up to
`batch_size` images in one forward) with a KV cache, and only what differs runs on top of
it, `batch_size` rows per forward, each row reading the cache rows of its own image:

- candidates of one token: one row per query (the rest of its prompt), every candidate
  read from the logits at the row's last position, as the plain fast path does;
- longer candidates: one row per (query, candidate), the candidate's tokens appended and
  their log-probabilities summed, as `sequence_logprobs` does.

Rows are right-padded after the cached prefix, so every token keeps its position; the
numbers equal the plain path's up to float rounding (tests/test_prefix_reuse.py: probe
metrics equal to 1e-6). Every image query of a call takes this path, shared or not, so
queries of one call are computed alike: a score that cannot depend on the image (a blind
model) stays bit-identical across images. `GenerativeAdapter.score` decides when the path
applies (`_reuse_prefixes`); a query whose image prefix is not shared verbatim by its
group (a template that writes text before the image) stays on the plain path.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch

from audit.adapters.base import Query
from audit.errors import InputError

__all__ = ["score_shared_prefixes", "generate_shared_prefixes", "score_prompt_variants", "image_prefix_length"]

_IMAGE_KEYS = ("pixel_", "image_", "video_", "aspect_ratio", "batch_num_images")


def image_prefix_length(ids: Sequence[int], image_token_id: int) -> int | None:
    """Tokens up to and including the last image token (None without one)."""
    for pos in range(len(ids) - 1, -1, -1):
        if ids[pos] == image_token_id:
            return pos + 1
    return None


def _cache_kwarg(model) -> str:
    """transformers >= 5.20 names the cache argument `cache`, older versions `past_key_values`."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Group:
    """Queries on one image: their context ids and the inputs of the shared prefix."""

    def __init__(self, members: list[int]) -> None:
        self.members = members
        self.ids: dict[int, list[int]] = {}
        self.prefix: dict | None = None
        self.k: int | None = None
        self.ok = True
        self.slot: tuple[int, int] = (0, 0)  # (prefix forward, row in it)


def _encode_groups(adapter, queries: Sequence[Query], groups: list[_Group], batch_size: int) -> None:
    """Context ids of every member and the prefix inputs of each group (from its first member)."""
    owner = {i: g for g in groups for i in g.members}
    order = [i for g in groups for i in g.members]
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        enc = adapter.encode([queries[i] for i in chunk])
        ids = enc.input_ids
        seq = {k for k, v in enc.inputs.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape
               and not k.startswith(_IMAGE_KEYS)}
        for r, i in enumerate(chunk):
            g = owner[i]
            row = ids[r, :enc.context_lengths[r]].tolist()
            k = image_prefix_length(row, adapter.image_token_id)
            g.ids[i] = row
            if k is None or k >= len(row) or (g.k is not None and (k != g.k or row[:k] != g.ids[g.members[0]][:k])):
                g.ok = False  # no image, nothing after it, or a prefix that is not shared verbatim
                continue
            if g.prefix is None:
                g.k = k
                prefix = {}
                for key, v in enc.inputs.items():
                    if not torch.is_tensor(v):
                        continue
                    if key in seq:
                        prefix[key] = v[r:r + 1, :k]
                    elif v.dim() and v.shape[0] == ids.shape[0]:
                        prefix[key] = v[r:r + 1]  # one image per row
                    else:
                        g.ok = False  # image inputs not split per row (patches of several images)
                g.prefix = prefix


def _prefix_caches(adapter, groups: list[_Group]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the keys and values of every group's prefix [groups, heads, k, dim]."""
    from transformers import DynamicCache

    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    kwarg = _cache_kwarg(adapter.model)
    for k in sorted({g.k for g in groups}):  # one forward per prefix length (one, for one template)
        same = [g for g in groups if g.k == k]
        inputs = {key: torch.cat([g.prefix[key] for g in same]) for key in same[0].prefix}
        cache = DynamicCache()
        with adapter._mismatch_as_input_error():
            adapter.model(**inputs, **{kwarg: cache}, use_cache=True, logits_to_keep=1)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        for j, g in enumerate(same):
            g.slot = (len(parts), j)
        parts.append(layers)
    return parts


def score_shared_prefixes(adapter, queries: Sequence[Query], *, batch_size: int) -> dict[int, np.ndarray]:
    """Scores of the queries whose image prefix is shared (index -> candidate scores); the
    others are left to the plain path."""
    from transformers import DynamicCache

    cand = [[adapter.continuation_ids(c) for c in q.candidates] for q in queries]
    by_image: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        if q.image is not None and q.candidates:
            by_image.setdefault(adapter._image_key(q.image), []).append(i)
    # Every image query takes this path, shared or not: queries of one call are then computed
    # alike, so a score that cannot depend on the image (a blind model) is bit-identical across
    # images, as on the plain path. A lone query costs what a plain forward costs.
    groups = [_Group(m) for m in by_image.values()]
    out: dict[int, np.ndarray] = {}
    kwarg = _cache_kwarg(adapter.model)
    pad = adapter.tokenizer.pad_token_id or 0
    for w in range(0, len(groups), batch_size):  # a wave: at most batch_size prefixes held at once
        wave = groups[w:w + batch_size]
        _encode_groups(adapter, queries, wave, batch_size)
        wave = [g for g in wave if g.ok and g.prefix is not None]
        if not wave:
            continue
        layers = _prefix_caches(adapter, wave)
        rows = []  # (group, query, suffix ids, positions read, candidate tokens read there)
        for g in wave:
            for i in g.members:
                rest = g.ids[i][g.k:]
                if all(len(c) == 1 for c in cand[i]):
                    rows.append((g, i, rest, [len(rest) - 1], [[c[0] for c in cand[i]]]))
                else:
                    for c in cand[i]:
                        rows.append((g, i, rest + c, list(range(len(rest) - 1, len(rest) - 1 + len(c))),
                                     [[t] for t in c]))
        values: dict[int, list[float]] = {}
        rows.sort(key=lambda r: r[0].k)  # stable: a chunk never mixes prefix lengths
        chunks = [rows[s:s + batch_size] for s in range(0, len(rows), batch_size)]
        chunks = [[r for r in c if r[0].k == k] for c in chunks for k in dict.fromkeys(r[0].k for r in c)]
        for chunk in chunks:
            width = max(len(r[2]) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), chunk[0][0].k + width), dtype=torch.long)
            for r, (g, _, suffix, _, _) in enumerate(chunk):
                ids[r, :len(suffix)] = torch.tensor(suffix)
                mask[r, :g.k + len(suffix)] = 1
            data = [(torch.cat([layers[g.slot[0]][li][0][g.slot[1]:g.slot[1] + 1] for g, *_ in chunk]),
                     torch.cat([layers[g.slot[0]][li][1][g.slot[1]:g.slot[1] + 1] for g, *_ in chunk]))
                    for li in range(len(layers[chunk[0][0].slot[0]]))]
            with adapter._mismatch_as_input_error():
                logits = adapter.model(input_ids=ids.to(adapter.device), attention_mask=mask.to(adapter.device),
                                       **{kwarg: DynamicCache(ddp_cache_data=data)}, use_cache=True).logits
            for r, (_, i, _, positions, tokens) in enumerate(chunk):
                lp = torch.log_softmax(logits[r, positions].float(), dim=-1)
                got = [float(lp[j, t].item()) for j, ts in enumerate(tokens) for t in ts]
                if len(positions) == 1 and len(tokens[0]) > 1:
                    values[i] = got  # every one-token candidate from one row
                else:
                    values.setdefault(i, []).append(float(sum(got)))  # one candidate's summed tokens
        for i, v in values.items():
            s = np.asarray(v, dtype=np.float64)
            if not np.all(np.isfinite(s)):
                raise InputError("the model returned NaN or infinite log-probabilities",
                                 where=f"prompt {queries[i].prompt[:40]!r}")
            out[i] = s
    return out


def score_prompt_variants(adapter, image, prompts: Sequence[str], candidates: Sequence[str]) -> list[np.ndarray]:
    """Log-probabilities of `candidates` after each prompt on one image (one shared prefix)."""
    queries = [Query(p, image, tuple(candidates)) for p in prompts]
    with adapter._call_scope(queries), torch.no_grad():
        got = score_shared_prefixes(adapter, queries, batch_size=max(1, len(queries)))
    if len(got) != len(queries):
        return adapter.score(queries, batch_size=max(1, len(queries)))
    return [got[i] for i in range(len(queries))]


@torch.no_grad()
def generate_shared_prefixes(adapter, queries: Sequence[Query], *, max_new_tokens: int):
    """Greedy decoding of `queries` on one KV cache per distinct image prefix: (per query the
    (token id, logits) steps up to and including a stop token, prompt lengths), or None when
    the batch does not fit (a query without an image, prefixes of different lengths).

    Rows keep their prompt right after the cached prefix and generated tokens go to the next
    cache slot with their own position ids, pad slots masked, so every token sees what it sees
    in a left-padded batch at the position it has there.
    """
    from transformers import DynamicCache

    if not queries or any(q.image is None for q in queries):
        return None
    by_image: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        by_image.setdefault(adapter._image_key(q.image), []).append(i)
    groups = [_Group(m) for m in by_image.values()]
    _encode_groups(adapter, queries, groups, len(queries))
    if any(not g.ok or g.prefix is None for g in groups) or len({g.k for g in groups}) != 1:
        return None
    layers = _prefix_caches(adapter, groups)
    k = groups[0].k
    owner = {i: g for g in groups for i in g.members}
    order = range(len(queries))
    suffix = [owner[i].ids[i][k:] for i in order]
    width = max(len(s) for s in suffix)
    pad = adapter.tokenizer.pad_token_id or 0
    ids = torch.full((len(queries), width), pad, dtype=torch.long)
    mask = torch.zeros((len(queries), k + width), dtype=torch.long)
    for r, s in enumerate(suffix):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :k + len(s)] = 1
    data = [(torch.cat([layers[owner[i].slot[0]][li][0][owner[i].slot[1]:owner[i].slot[1] + 1] for i in order]),
             torch.cat([layers[owner[i].slot[0]][li][1][owner[i].slot[1]:owner[i].slot[1] + 1] for i in order]))
            for li in range(len(layers[0]))]
    cache = DynamicCache(ddp_cache_data=data)
    kwarg = _cache_kwarg(adapter.model)
    dev = adapter.device
    lengths = torch.tensor([len(s) for s in suffix], device=dev)
    mask = mask.to(dev)
    with adapter._mismatch_as_input_error():
        out = adapter.model(input_ids=ids.to(dev), attention_mask=mask, **{kwarg: cache}, use_cache=True)
    logits = out.logits[torch.arange(len(queries), device=dev), lengths - 1].float()
    position = k + lengths  # of the next token
    stops, steps, done = adapter._stops(), [[] for _ in order], [False] * len(queries)
    for t in range(max_new_tokens):
        chosen = logits.argmax(-1)
        for r, tid in enumerate(chosen.tolist()):
            if not done[r]:
                steps[r].append((tid, logits[r]))
                done[r] = tid in stops
        if all(done) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with adapter._mismatch_as_input_error():
            out = adapter.model(input_ids=chosen[:, None], attention_mask=mask, position_ids=position[:, None],
                                **{kwarg: cache}, use_cache=True)
        logits = out.logits[:, -1].float()
        position = position + 1
    return steps, [len(owner[i].ids[i]) for i in order]
