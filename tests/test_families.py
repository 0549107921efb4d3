"""Every supported family, built tiny from configs and opened through `load_adapter`.

Each check runs on a model saved with `save_pretrained` and loaded back exactly like a
user's model: adapter kind, image spans against the features the model really scatters,
log-prob scoring (batch invariance, multi-token sums), no-op hooks, generation, and the
dual encoders' scores against the model's own logits.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.dual import DualEncoderAdapter, candidate_text
from audit.adapters.generative import GenerativeAdapter
from audit.errors import InputError, UnsupportedError
from family_models import DUAL, FAMILIES, GENERATIVE, build_family

COLOURS = ("red", "green", "blue", "yellow")
PROMPT = "what colour are the shapes?"
# Mixed aspect ratios so any-resolution families (LLaVA-NeXT/OneVision, Qwen2-VL) give rows
# with different image-token counts, i.e. real padding inside a batch.
SIZES = ((48, 40), (40, 48), (32, 32))


def _img(size=(48, 40), rgb=(220, 40, 40)):
    return Image.new("RGB", size, rgb)


def _queries():
    prompts = (PROMPT, "how many shapes are there?", "is there a red circle in the image?")
    rgbs = ((220, 40, 40), (40, 80, 225), (30, 160, 50))
    return [Query(p, _img(s, c), COLOURS) for p, s, c in zip(prompts, SIZES, rgbs)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from a second thread, and lose a lot when the CPUs are shared.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = build_family(name, path=tmp_path_factory.mktemp("families") / name)
        return built[name]

    return get


@pytest.fixture(scope="module")
def adapter(family_dir):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_adapter(family_dir(name))
        return cache[name]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_gives_the_right_kind(adapter, family):
    a = adapter(family)
    assert a.architecture == family
    assert isinstance(a, GenerativeAdapter if family in GENERATIVE else DualEncoderAdapter)
    assert a.capabilities.kind == ("generative" if family in GENERATIVE else "dual_encoder")
    if family in GENERATIVE:
        cfg = a.model.config.text_config
        assert a.describe()["n_layers"] == a.n_layers == cfg.num_hidden_layers


def _scattered_positions(a: GenerativeAdapter, enc) -> torch.Tensor:
    """Positions whose embedding entering the first decoder block is not the token's own."""
    seen = {}
    embed = a.site_module("language.embed").register_forward_hook(lambda m, i, o: seen.setdefault("tok", o))

    def first_block(m, args, kwargs):
        seen.setdefault("in", args[0] if args else kwargs["hidden_states"])

    block = a.site_module("language.blocks.0.resid").register_forward_pre_hook(first_block, with_kwargs=True)
    try:
        with torch.no_grad():
            a.forward(enc)
    finally:
        embed.remove()
        block.remove()
    return (seen["in"] != seen["tok"]).any(-1)[0].nonzero().flatten()


@pytest.mark.parametrize("family", [f for f in GENERATIVE if f != "mllama"])
@pytest.mark.parametrize("size", SIZES)
def test_image_span_is_where_the_model_puts_image_features(adapter, family, size):
    a = adapter(family)
    enc = a.encode([Query(PROMPT, _img(size), COLOURS)])
    spans = a.image_spans(enc.input_ids)[0]
    assert len(spans) == 1 and a.capabilities.fusion == "early"
    positions = _scattered_positions(a, enc).tolist()
    assert positions == list(range(spans[0].start, spans[0].end))


def test_mllama_has_one_placeholder_and_cross_attention(adapter):
    a = adapter("mllama")
    assert a.capabilities.fusion == "cross_attention"
    enc = a.encode([Query(PROMPT, _img(), COLOURS)])
    assert [len(s) for s in a.image_spans(enc.input_ids)[0]] == [1]
    assert "cross_attention_mask" in enc.inputs
    assert _scattered_positions(a, enc).numel() == 0  # nothing is scattered: images enter by cross-attention


@pytest.mark.parametrize("family", GENERATIVE)
def test_fallback_template_places_the_image_like_the_chat_template(adapter, family, monkeypatch):
    a = adapter(family)
    monkeypatch.setattr(a.processor, "chat_template", None)
    enc = a.encode([Query(PROMPT, _img(), COLOURS)])
    spans = a.image_spans(enc.input_ids)[0]
    assert len(spans) == 1
    if family == "mllama":
        assert len(spans[0]) == 1
    else:
        assert _scattered_positions(a, enc).tolist() == list(range(spans[0].start, spans[0].end))


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_a_template_that_writes_bos_gets_no_second_one(adapter, family, monkeypatch):
    a = adapter(family)
    monkeypatch.setattr(a.processor, "chat_template", a.tokenizer.bos_token + a.processor.chat_template)
    ids = a.encode([Query(PROMPT, _img(), COLOURS)]).input_ids[0].tolist()
    assert ids[0] == a.tokenizer.bos_token_id and ids.count(a.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("family", GENERATIVE)
def test_scores_are_batch_invariant_log_probabilities(adapter, family, monkeypatch):
    a = adapter(family)
    qs = _queries()
    together = a.score(qs, batch_size=3)
    alone = [a.score([q])[0] for q in qs]
    for x, y in zip(together, alone):
        assert np.all(np.isfinite(x)) and (x <= 0).all()
        np.testing.assert_allclose(x, y, atol=1e-5)
    # multi-token candidates (general path) in a batch equal the same queries alone
    multi = [Query(q.prompt, q.image, ("red", "red green")) for q in qs]
    batched = a.score(multi, batch_size=3)
    for q, b, t in zip(multi, batched, together):
        np.testing.assert_allclose(b, a.score([q])[0], atol=1e-5)
        np.testing.assert_allclose(b[0], t[0], atol=1e-5)  # general path == single-token fast path
    # a tokenizer saved with left padding (Qwen's are) changes nothing
    monkeypatch.setattr(a.tokenizer, "padding_side", "left")
    for x, y in zip(a.score(qs, batch_size=3), together):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("family", GENERATIVE)
def test_multi_token_candidate_is_the_sum_of_token_logprobs(adapter, family):
    a = adapter(family)
    q = Query(PROMPT, _img(), ("red green",))
    total = a.score([q])[0][0]
    red, green = a.continuation_ids("red")[0], a.continuation_ids("green")[0]
    with torch.no_grad():
        lp1 = torch.log_softmax(a.forward(a.encode([q])).logits[0, -1].float(), -1)[red]
        lp2 = torch.log_softmax(a.forward(a.encode([q], [[red]])).logits[0, -1].float(), -1)[green]
    assert total == pytest.approx(float(lp1 + lp2), abs=1e-5)


@pytest.mark.parametrize("family", GENERATIVE)
def test_noop_hooks_fire_and_leave_logits_bit_identical(adapter, family):
    a = adapter(family)
    enc = a.encode([Query(PROMPT, _img(), COLOURS)])
    sites = [f"language.blocks.{i}.{part}" for i in range(a.n_layers) for part in ("resid", "attn")]
    sites += ["language.embed", "projector", "vision.blocks.0"]
    seen = []
    with torch.no_grad():
        plain = a.forward(enc).logits
        with a.hooks({s: (lambda m, i, o, s=s: seen.append(s)) for s in sites}):
            hooked = a.forward(enc).logits
    assert set(seen) == set(sites)
    assert torch.equal(plain, hooked)


@pytest.mark.parametrize("family", DUAL)
def test_dual_encoder_noop_hooks(adapter, family):
    a = adapter(family)
    q = Query(PROMPT, _img(), COLOURS)
    sites = ["vision.blocks.0", "vision.post_layernorm"]
    if family == "siglip":  # SigLIP has no projection layer (its pooling head makes the embedding)
        with pytest.raises(UnsupportedError, match="projector"):
            a.site_module("projector")
    else:
        sites.append("projector")
    seen = []
    plain = a.score([q])[0]
    with a.hooks({s: (lambda m, i, o, s=s: seen.append(s)) for s in sites}):
        hooked = a.score([q])[0]
    assert set(seen) == set(sites)
    np.testing.assert_array_equal(plain, hooked)


@pytest.mark.parametrize("family", GENERATIVE)
def test_generate_returns_text(adapter, family):
    out = adapter(family).generate(_queries()[:2], max_new_tokens=3)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)


@pytest.mark.parametrize("family", DUAL)
def test_dual_encoder_score_is_the_models_own_logits(adapter, family):
    a = adapter(family)
    q = Query("", _img(), COLOURS)
    texts = [candidate_text(q.prompt, c) for c in q.candidates]
    pad = {"padding": "max_length", "max_length": 64} if family == "siglip" else {"padding": True}
    inputs = a.processor(text=texts, images=[q.image], return_tensors="pt", **pad)
    with torch.no_grad():
        own = a.model(**inputs).logits_per_image[0].numpy()
    np.testing.assert_allclose(a.score([q])[0], own, rtol=1e-5, atol=1e-5)
    assert len({float(x) for x in own}) > 1  # the candidates are told apart at all


@pytest.mark.parametrize("family", [f for f in GENERATIVE if f != "mllama"])
def test_image_token_count_mismatch_is_an_input_error(adapter, family):
    a = adapter(family)
    enc = a.encode([Query(PROMPT, _img(), COLOURS)])
    keep = torch.ones(enc.input_ids.shape[1], dtype=torch.bool)
    keep[a.image_spans(enc.input_ids)[0][0].start] = False  # drop one image token
    for k, v in enc.inputs.items():
        if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == enc.input_ids.shape:
            enc.inputs[k] = v[:, keep]
    with pytest.raises(InputError, match="image tokens"):
        a.forward(enc)


def test_a_folder_whose_processor_cannot_load_is_an_input_error(family_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(family_dir("llava"), broken)
    (broken / "processor_config.json").unlink()  # the image processor's settings live there
    with pytest.raises(InputError, match="processor"):
        load_adapter(broken)
