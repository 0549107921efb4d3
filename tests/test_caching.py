"""The generative adapter's caches (prompts, candidate ids, tokenised texts, processed images)
save work without changing a single number, stay within their bounds, and switch
themselves off when a processor does not treat images or texts one by one."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.generative import LRU, image_key


def _images(n, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _uncached(path):
    ad = load_adapter(path)
    ad._image_cache_on = ad._token_cache_on = False
    ad.prefix_reuse = False
    return ad


def _queries(images):
    prompts = ["what colour are the shapes?", "is there a circle?", "", "what shape is shown on the left?"]
    return [Query(prompts[i % len(prompts)], im, ("red", "blue", "green circle")) for i, im in enumerate(images)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lru_evicts_least_recently_used_within_entries_and_bytes():
    lru = LRU(max_entries=3)
    for k in "abc":
        lru.put(k, k.upper())
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("d", "D")
    assert lru.get("b") is None and [lru.get(k) for k in "acd"] == ["A", "C", "D"]
    by_bytes = LRU(max_bytes=100)
    by_bytes.put("x", 1, 60)
    by_bytes.put("y", 2, 30)
    by_bytes.put("z", 3, 30)  # 120 bytes: x goes
    assert by_bytes.get("x") is None and by_bytes.bytes == 60 and len(by_bytes) == 2
    by_bytes.put("huge", 4, 101)  # never kept, nothing evicted for it
    assert by_bytes.get("huge") is None and len(by_bytes) == 2


def test_image_key_is_the_content():
    a, = _images(1)
    assert image_key(a) == image_key(a.copy())
    b = a.copy()
    b.putpixel((0, 0), (0, 0, 0) if a.getpixel((0, 0)) != (0, 0, 0) else (1, 1, 1))
    assert image_key(a) != image_key(b)
    assert image_key(a) != image_key(a.convert("L").convert("RGB"))


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_processing_equals_the_processor(untrained_llava, side):
    cached, plain = load_adapter(untrained_llava), _uncached(untrained_llava)
    images = _images(5) + [Image.new("RGB", (48, 40), (128, 128, 128))]
    queries = _queries(images + images[:3])  # repeated images and texts: hits on the second round
    for _ in range(2):
        got = cached._process([q.prompt for q in queries], [q.image for q in queries], side=side)
        want = plain._process([q.prompt for q in queries], [q.image for q in queries], side=side)
        assert _equal(got, want)
    assert cached._image_cache_verified and cached._token_cache_verified
    assert cached._image_cache.hits > 0 and cached._token_cache.hits > 0
    enc_a, enc_b = cached.encode(queries), plain.encode(queries)
    assert _equal(enc_a.inputs, enc_b.inputs) and enc_a.context_lengths == enc_b.context_lengths


def test_scores_and_generations_do_not_change_with_the_caches(untrained_llava):
    cached, plain = load_adapter(untrained_llava), _uncached(untrained_llava)
    cached.prefix_reuse = False  # this test isolates the caches (prefix reuse: test_prefix_reuse.py)
    queries = _queries(_images(4) * 2)
    for _ in range(2):
        for a, b in zip(cached.score(queries, batch_size=3), plain.score(queries, batch_size=3)):
            np.testing.assert_array_equal(a, b)
    assert cached.generate(queries[:3], max_new_tokens=3) == plain.generate(queries[:3], max_new_tokens=3)


def test_a_batch_dependent_image_processor_turns_the_cache_off(untrained_llava):
    """An image processor whose output for one image depends on the others in the call (here:
    a batch-mean shift) cannot be cached per image: the first check finds the difference."""
    cached, plain = load_adapter(untrained_llava), _uncached(untrained_llava)
    for ad in (cached, plain):
        real = ad.processor.image_processor

        class Shifted:
            def __getattr__(self, name, real=real):
                return getattr(real, name)

            def __call__(self, images, real=real, **kw):
                out = real(images, **kw)
                out["pixel_values"] = out["pixel_values"] - out["pixel_values"].mean()
                return out

        ad.processor.image_processor = Shifted()
    queries = _queries(_images(3))
    got = cached._process([q.prompt for q in queries], [q.image for q in queries])
    want = plain._process([q.prompt for q in queries], [q.image for q in queries])
    assert _equal(got, want) and not cached._image_cache_on


def test_the_image_cache_stays_within_its_byte_budget(untrained_llava):
    ad = load_adapter(untrained_llava)
    one = 3 * 64 * 64 * 4  # float32 pixel values of one tiny-LLaVA image
    ad._image_cache = LRU(max_bytes=3 * one)
    ad.encode(_queries(_images(8)))
    assert len(ad._image_cache) == 3 and ad._image_cache.bytes <= 3 * one


def test_memoised_candidates_and_prompts_are_fresh_copies(untrained_llava):
    ad = load_adapter(untrained_llava)
    ids = ad.continuation_ids("red")
    ids.append(-1)  # a caller extending its list (answer + EOS) must not touch the cache
    assert ad.continuation_ids("red") == ids[:-1]
    q = Query("is there a circle?", _images(1)[0], ("yes",))
    assert ad.render_prompt(q) == ad.prompt_text(q.prompt, has_image=True)
    ad.clear_caches()
    assert len(ad._texts) == 0 and len(ad._image_cache) == 0
