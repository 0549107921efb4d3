"""White-box adapters: modality spans, scoring, hooks that change nothing, site maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.sites import GENERATIVE_FAMILIES, resolve
from audit.errors import UnsupportedError

COLOURS = ("red", "green", "blue", "yellow")


def _img(rgb=(220, 40, 40)):
    return Image.new("RGB", (64, 64), rgb)


def test_llava_image_span_matches_the_patch_grid(untrained_llava):
    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", _img(), COLOURS)])
    spans = a.image_spans(enc.input_ids)[0]
    cfg = a.model.config.vision_config
    side = cfg.image_size // cfg.patch_size
    assert len(spans) == 1
    assert len(spans[0]) == side * side and spans[0].grid == (side, side)
    ids = enc.input_ids[0].tolist()
    assert all(t == a.image_token_id for t in ids[spans[0].start:spans[0].end])
    assert a.image_token_id not in ids[:spans[0].start] + ids[spans[0].end:]


def test_mllama_has_one_placeholder_and_cross_attention(mllama_shortcut):
    a = load_adapter(mllama_shortcut)
    assert a.capabilities.fusion == "cross_attention"
    enc = a.encode([Query("what colour are the shapes?", _img(), COLOURS)])
    assert [len(s) for s in a.image_spans(enc.input_ids)[0]] == [1]
    assert "cross_attention_mask" in enc.inputs


def test_scores_are_log_probabilities_and_batch_invariant(untrained_llava):
    a = load_adapter(untrained_llava)
    qs = [Query("what colour are the shapes?", _img(c), COLOURS) for c in [(220, 40, 40), (40, 80, 225), (30, 160, 50)]]
    together = a.score(qs, batch_size=3)
    alone = [a.score([q])[0] for q in qs]
    for x, y in zip(together, alone):
        np.testing.assert_allclose(x, y, atol=1e-5)
        assert (x <= 0).all()
    # the fast single-token path equals the general continuation path
    multi = a.score([Query("what colour are the shapes?", _img(), ("red", "red green"))])[0]
    np.testing.assert_allclose(multi[0], together[0][0], atol=1e-5)
    assert multi[1] < multi[0]  # two tokens can only be less likely than their first


def test_multi_token_continuation_is_the_sum_of_token_logprobs(untrained_llava):
    a = load_adapter(untrained_llava)
    q = Query("what colour are the shapes?", _img(), ("red green",))
    s = a.score([q])[0][0]
    enc = a.encode([q])
    red, green = a.continuation_ids("red")[0], a.continuation_ids("green")[0]
    with torch.no_grad():
        lp1 = torch.log_softmax(a.forward(enc).logits[0, -1], -1)[red]
        enc2 = a.encode([q], [[red]])
        lp2 = torch.log_softmax(a.forward(enc2).logits[0, -1], -1)[green]
    assert s == pytest.approx(float(lp1 + lp2), abs=1e-5)


def test_noop_hooks_leave_logits_bit_identical(untrained_llava):
    a = load_adapter(untrained_llava)
    enc = a.encode([Query("what colour are the shapes?", _img(), COLOURS)])
    with torch.no_grad():
        plain = a.forward(enc).logits
        seen = []
        sites = {f"language.blocks.{i}.resid": (lambda m, i_, o: seen.append(1)) for i in range(a.n_layers)}
        sites["projector"] = lambda m, i_, o: seen.append(1)
        sites["vision.blocks.0"] = lambda m, i_, o: seen.append(1)
        with a.hooks(sites):
            hooked = a.forward(enc).logits
    assert len(seen) == a.n_layers + 2
    assert torch.equal(plain, hooked)


def test_hooks_are_removed_even_when_the_body_raises(untrained_llava):
    a = load_adapter(untrained_llava)
    module = a.site_module("projector")
    before = len(module._forward_hooks)
    with pytest.raises(RuntimeError):
        with a.hooks({"projector": lambda m, i, o: None}):
            assert len(module._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == before


def test_unknown_site_is_a_clear_error(untrained_llava):
    a = load_adapter(untrained_llava)
    with pytest.raises(UnsupportedError, match="language.blocks.99.resid"):
        a.site_module("language.blocks.99.resid")


@pytest.mark.slow
def test_dual_encoder_scores_match_model_logits(clip_grounded):
    a = load_adapter(clip_grounded)
    assert a.capabilities.kind == "dual_encoder"
    with pytest.raises(UnsupportedError, match="cannot generate"):
        a.generate([])
    im = _img()
    s = a.score([Query("", im, ("one red circle", "two blue square"))])[0]
    inputs = a.processor(images=[im], text=["one red circle", "two blue square"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = a.model(**inputs).logits_per_image[0].numpy()
    np.testing.assert_allclose(s, ref, atol=1e-4)


@pytest.mark.parametrize("config_name", ["LlavaConfig", "LlavaNextConfig", "LlavaOnevisionConfig", "Qwen2VLConfig",
                                         "Qwen2_5_VLConfig", "Idefics3Config", "Gemma3Config", "MllamaConfig"])
def test_site_maps_resolve_on_every_generative_family(config_name):
    import transformers
    from transformers import AutoModelForImageTextToText

    cfg = getattr(transformers, config_name)()
    sites = GENERATIVE_FAMILIES[cfg.model_type]
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    assert len(resolve(model, sites.language_layers)) > 0
    assert len(resolve(model, sites.vision_layers)) > 0
    assert isinstance(resolve(model, sites.embed), torch.nn.Embedding)
    resolve(model, sites.projector)
    assert getattr(cfg, sites.image_token_attr) is not None


def test_question_mask_covers_exactly_the_prompt_words(untrained_llava):
    a = load_adapter(untrained_llava)
    img = Image.new("RGB", (64, 64), (10, 200, 30))
    enc = a.encode([Query("what colour are the shapes?", img, ("red",)), Query("", img, ("red",))])
    ids, mask = enc.input_ids, a.question_mask(enc)
    words = a.tokenizer.convert_ids_to_tokens(ids[0][mask[0]].tolist())
    assert [w.strip() for w in words] == ["what", "colour", "are", "the", "shapes", "?"] or \
        "".join(w.strip() for w in words).replace("?", "") == "whatcolouraretheshapes"
    assert not mask[1].any()  # an empty prompt has no question tokens
    image = ids == a.image_token_id
    assert not (mask & image).any()
    n = enc.context_lengths[0]
    special = ~mask[0, :n] & ~image[0, :n]
    assert special.sum() >= 2  # BOS and the template's role words are not "question"


def test_sequence_logprobs_is_the_score_and_is_differentiable(untrained_llava):
    a = load_adapter(untrained_llava)
    q = Query("what colour are the shapes?", Image.new("RGB", (64, 64), (200, 30, 30)), ("red", "blue green"))
    ids = [a.continuation_ids(c) for c in q.candidates]
    enc = a.encode([q, q], ids)
    lp = a.sequence_logprobs(enc)
    np.testing.assert_allclose(lp.detach().numpy(), a.score([q])[0], atol=1e-5)
    px = enc.inputs["pixel_values"].clone().requires_grad_(True)
    a.sequence_logprobs(enc, pixel_values=px).sum().backward()
    assert px.grad is not None and px.grad.abs().sum() > 0


def test_module_name_and_pixel_normalisation(untrained_llava):
    a = load_adapter(untrained_llava)
    assert a.module_name("language.blocks.1.attn") == "model.language_model.layers.1.self_attn"
    mean, std = a.pixel_normalisation()
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)
