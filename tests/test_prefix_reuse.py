"""Queries that share an image share one computation of the image prefix (KV cache), and the
numbers are the plain path's: scores to float rounding, probe metrics to 1e-6."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import audit.adapters.prefix_cache as prefix_cache
from audit.adapters import Query, load_adapter
from audit.dataset import Dataset
from probes.base import get_probe


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(n)]


def _pair(path):
    on, off = load_adapter(path), load_adapter(path)
    off.prefix_reuse = False
    return on, off


class _RowCounter:
    """Wraps `model.forward` (no hook, so reuse stays on) and records the rows of every call."""

    def __init__(self, model):
        self.rows, self._forward = [], model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows.append(int(ids.shape[0]))
        return self._forward(*args, **kwargs)


def _queries():
    a, b, c = _images(3)
    one = ("red", "blue", "green")
    many = ("red circle", "blue", "a green square")
    return [Query("what colour are the shapes?", a, one), Query("", a, one), Query("is there a circle?", a, many),
            Query("what colour are the shapes?", b, many), Query("what colour are the shapes?", c, one),
            Query("what colour are the shapes?", None, one), Query("is there a circle?", b, one)]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_shared_prefix_scores_equal_the_plain_path(untrained_llava, batch_size):
    on, off = _pair(untrained_llava)
    queries = _queries()
    counter = _RowCounter(on.model)
    got, want = on.score(queries, batch_size=batch_size), off.score(queries, batch_size=batch_size)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
    assert max(counter.rows) <= batch_size  # prefixes, suffix rows and plain batches alike
    assert on._reuse_prefixes()


def test_the_prefix_is_computed_once_per_image(untrained_llava):
    on, _ = _pair(untrained_llava)
    image = _images(1)[0]
    queries = [Query(f"is there a {w}?", image, ("yes", "no")) for w in ("circle", "square", "cross", "star")]
    counter = _RowCounter(on.model)
    on.score(queries, batch_size=16)
    assert counter.rows == [1, 4]  # one prefix row, then the four prompts on top of it


def test_prompt_variants_helper_matches_score(untrained_llava):
    on, off = _pair(untrained_llava)
    image = _images(1)[0]
    prompts = [f"what is the job of this {w}?" for w in ("man", "woman", "person")]
    got = prefix_cache.score_prompt_variants(on, image, prompts, ("doctor", "nurse"))
    want = off.score([Query(p, image, ("doctor", "nurse")) for p in prompts])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_hooks_and_attention_plans_turn_reuse_off(untrained_llava, monkeypatch):
    on, off = _pair(untrained_llava)
    calls = []
    real = prefix_cache.score_shared_prefixes
    monkeypatch.setattr(prefix_cache, "score_shared_prefixes", lambda *a, **k: calls.append(1) or real(*a, **k))
    queries = _queries()
    with on.hooks({"language.embed": lambda m, i, o: None}):
        hooked = on.score(queries)
    assert not calls
    for g, w in zip(hooked, off.score(queries)):
        np.testing.assert_array_equal(g, w)
    from audit.adapters.attention import LayerPlan, attention_plan

    with attention_plan(on, {0: LayerPlan()}):
        on.score(queries)
    assert not calls
    on.score(queries)
    assert calls == [1]


PROBES = {"modality_ablation": {"permutations": 3}, "counterfactual_bias": {}, "typographic_attack": {},
          "hallucination": {}, "group_fairness": {}}


@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_metrics_are_the_same_with_and_without_prefix_reuse(name, untrained_llava, small_data):
    data = Dataset.load(small_data).audit_split()
    frames = []
    for adapter in _pair(untrained_llava):
        probe = get_probe(name, batch_size=8, **PROBES[name])
        plan = probe.plan(adapter, data, max_examples=24)
        assert plan.units, name
        rows = pd.concat([probe.run(adapter, u, seed=1) for u in plan.units], ignore_index=True)
        frames.append(probe.summarize(rows, seed=0))
    got, want = frames
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got.drop(columns=["value", "ci_low", "ci_high"]),
                                  want.drop(columns=["value", "ci_low", "ci_high"]))
    np.testing.assert_allclose(got.value.to_numpy(float), want.value.to_numpy(float), rtol=0, atol=1e-6,
                               err_msg=f"{name}: value")
    # A bootstrap interval is a quantile of resampled means: a 1e-8 change of the inputs can swap two
    # neighbouring resamples (about 1e-6 apart here), so intervals get a looser bound than values.
    for col in ("ci_low", "ci_high"):
        np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=0, atol=1e-4,
                                   err_msg=f"{name}: {col}")


# ---------------------------------------------------------------- generation (generate mode's answers)
def _generation_queries():
    a, b = _images(2)
    return [Query("what colour are the shapes?", a, ("red",)), Query("is there a circle?", a, ("yes", "no")),
            Query("", a, ("x",)), Query("what colour are the shapes?", b, ("red",))]


def test_shared_prefix_generation_equals_generate(untrained_llava):
    on, off = _pair(untrained_llava)
    queries = _generation_queries()
    got = on.generate_detailed(queries, max_new_tokens=5, top_k=3)
    assert on._generate_reuse is True  # checked against transformers' generate on first use
    counter = _RowCounter(on.model)  # after the check: generate() validates forward's signature
    again = on.generate_detailed(queries, max_new_tokens=5, top_k=3)
    assert counter.rows[0] == 2  # one prefix row per image, then the decoding rows
    want = off.generate_detailed(queries, max_new_tokens=5, top_k=3)
    for rows in (got, again):
        for g, w in zip(rows, want):
            assert (g["text"], g["finish_reason"], g["prompt_tokens"]) == (w["text"], w["finish_reason"],
                                                                          w["prompt_tokens"])
            assert [t["token"] for t in g["tokens"]] == [t["token"] for t in w["tokens"]]
            np.testing.assert_allclose([t["logprob"] for t in g["tokens"]], [t["logprob"] for t in w["tokens"]],
                                       atol=1e-5)
            assert [[x for x, _ in t["top"]] for t in g["tokens"]] == [[x for x, _ in t["top"]] for t in w["tokens"]]


def test_generation_falls_back_when_the_shared_path_disagrees(untrained_llava, monkeypatch):
    on, off = _pair(untrained_llava)
    real = prefix_cache.generate_shared_prefixes

    def wrong(*args, **kwargs):  # a decoder that picks another first token
        steps, lengths = real(*args, **kwargs)
        return [[(t + 1, s) for t, s in row] for row in steps], lengths

    monkeypatch.setattr(prefix_cache, "generate_shared_prefixes", wrong)
    queries = _generation_queries()
    assert on.generate(queries, max_new_tokens=4) == off.generate(queries, max_new_tokens=4)
    assert on._generate_reuse is False
    mixed = [Query("what colour are the shapes?", None, ("red",))] + queries[:1]  # text-only: plain path
    assert real(on, mixed, max_new_tokens=2) is None
