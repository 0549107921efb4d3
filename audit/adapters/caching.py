"""The generative adapter's caches: work an audit repeats, done once per adapter.

- `image_key`: the identity of an image's content (pixels, size, mode).
- `LRU`: a least-recently-used map bounded by entries and by bytes.
- `CachedImages` / `CachedTokenizer`: stand-ins for a processor's image processor and
  tokenizer during one processor call. Each image is processed alone and each distinct text
  tokenised alone, from or into the adapter's LRUs, and the pieces are put together as the
  real call puts them (images concatenated, rows padded as the tokenizer pads). The first
  call with several images or texts is compared with the real batched call; any difference,
  or an output that cannot be split per image or per text, turns that cache off for the
  adapter (tests/test_caching.py), so a processor that treats its inputs jointly is never
  cached.

The owner (`audit.adapters.generative.GenerativeAdapter`) holds the LRUs and the on/verified
flags: `_image_cache`, `_image_cache_on`, `_image_cache_verified`, `_image_key(image)`,
`_image_cache_fails(real)`, and the same for `_token_cache`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

__all__ = ["image_key", "LRU", "CachedImages", "CachedTokenizer"]


def image_key(image) -> str:
    """Identity of an image's content (pixels, size, mode): equal images share cached work."""
    h = hashlib.blake2b(image.tobytes(), digest_size=16)
    h.update(f"{image.size}{image.mode}".encode())
    return h.hexdigest()


class LRU:
    """A least-recently-used map bounded by entries and by the bytes its values declare."""

    def __init__(self, *, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key):
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key, value, nbytes: int = 0) -> None:
        if self.max_bytes is not None and nbytes > self.max_bytes:
            return  # larger than the whole budget: never kept
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while self._items and ((self.max_entries is not None and len(self._items) > self.max_entries)
                               or (self.max_bytes is not None and self.bytes > self.max_bytes)):
            _, (_, n) = self._items.popitem(last=False)
            self.bytes -= n


class CachedImages:
    """Stands in for `processor.image_processor` during one processor call: every image is
    processed alone (or taken from the adapter's LRU, keyed by its pixels and the call's
    options) and the outputs are concatenated. For processors that treat images one by one
    that is the batched output itself; the first call with several images is compared with
    the real batched call, and any difference (or an output that cannot be split per image)
    turns the cache off for this adapter."""

    def __init__(self, owner, inner) -> None:
        self._owner, self._inner = owner, inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, images, **kwargs):
        from transformers import BatchFeature

        owner, flat = self._owner, _flatten(images)
        options = repr(sorted(kwargs.items()))
        parts = []
        for im in flat:
            key = (owner._image_key(im), options)
            out = owner._image_cache.get(key)
            if out is None:
                out = dict(self._inner([[im]], **kwargs))
                if not all(torch.is_tensor(v) and v.dim() and v.shape[0] == 1 for v in out.values()):
                    return owner._image_cache_fails(self._inner(images, **kwargs))
                owner._image_cache.put(key, out, sum(v.numel() * v.element_size() for v in out.values()))
            parts.append(out)
        if any(p.keys() != parts[0].keys() or any(p[k].shape[1:] != parts[0][k].shape[1:] for k in p)
               for p in parts[1:]):
            return owner._image_cache_fails(self._inner(images, **kwargs))
        combined = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        if not owner._image_cache_verified and len(flat) > 1:
            real = self._inner(images, **kwargs)
            if set(real.keys()) != set(combined) or not all(
                    torch.is_tensor(real[k]) and real[k].shape == v.shape and torch.equal(real[k], v)
                    for k, v in combined.items()):
                return owner._image_cache_fails(real)
            owner._image_cache_verified = True
        return BatchFeature(combined)


class CachedTokenizer:
    """Stands in for `processor.tokenizer` during one processor call: each distinct text is
    tokenised once per adapter (an LRU keyed by the text and the call's options) and the rows
    are padded as the tokenizer pads them. Compared with the real call on first use with
    several texts; any difference, or an output it cannot rebuild, turns it off."""

    _FREE = ("padding", "padding_side", "return_tensors")  # options that only shape the batch

    def __init__(self, owner, inner) -> None:
        self._owner, self._inner = owner, inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        from transformers import BatchEncoding

        owner, inner = self._owner, self._inner
        side = kwargs.get("padding_side") or inner.padding_side
        if (not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text)
                or kwargs.get("return_tensors") != "pt" or kwargs.get("padding") is not True):
            return inner(text, **kwargs)
        options = repr(sorted((k, v) for k, v in kwargs.items() if k not in self._FREE))
        rows = {t: owner._token_cache.get((t, options)) for t in dict.fromkeys(text)}
        missing = [t for t, r in rows.items() if r is None]
        if missing:
            out = inner(missing, **{**kwargs, "padding_side": "right"})
            ids = out["input_ids"]
            if not all(torch.is_tensor(v) and v.shape == ids.shape for v in out.values()):
                return owner._token_cache_fails(inner(text, **kwargs))
            lengths = out["attention_mask"].sum(1).tolist()
            for r, t in enumerate(missing):
                rows[t] = {k: v[r, :lengths[r]].clone() for k, v in out.items()}
                owner._token_cache.put((t, options), rows[t])
        width = max(len(r["input_ids"]) for r in rows.values())
        fill = {"input_ids": inner.pad_token_id if inner.pad_token_id is not None else 0,
                "token_type_ids": getattr(inner, "pad_token_type_id", 0)}
        data = {}
        for key in rows[text[0]]:
            batch = torch.full((len(text), width), fill.get(key, 0), dtype=rows[text[0]][key].dtype)
            for r, t in enumerate(text):
                v = rows[t][key]
                if side == "left":
                    batch[r, width - len(v):] = v
                else:
                    batch[r, :len(v)] = v
            data[key] = batch
        if not owner._token_cache_verified and len(text) > 1:
            real = inner(text, **kwargs)
            if set(real.keys()) != set(data) or not all(torch.equal(real[k], v) for k, v in data.items()):
                return owner._token_cache_fails(real)
            owner._token_cache_verified = True
        return BatchEncoding(data)


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [im for x in images for im in _flatten(x)]
    return [images]
