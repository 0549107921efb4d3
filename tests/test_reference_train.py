"""Reference models: HF round trip, known-by-construction variants, resumable training, and
the shared training pieces of `audit.training` (losses and the one optimiser step)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.adapters.families import family_of
from audit.adapters.loading import make_adapter
from audit.dataset import Dataset
from audit.errors import InputError
from audit.training import (
    answer_loss,
    answer_nll,
    batch_loss,
    choice_scores,
    dual_example_losses,
    example_losses,
    train_step,
)
from reference_models.architectures import ARCHS, build_reference_model
from reference_models.evaluate import evaluate_reference, training_text
from reference_models.synthetic import generate, vocabulary
from reference_models.train import train_reference
from protocol_proxy import declared_only


def declared_factory(net, processor, *, family, device):
    """`train_reference`'s adapter, behind the proxy that forwards only declared members."""
    return declared_only(make_adapter(net, processor, family=family, device=device))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """48 ordinary examples and 8 canaries (four-word answers, no closed choices)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate(out, n=48, bias=0.9, seed=2, n_canaries=8)
    return out


def _mixed_batch(data: Dataset) -> list:
    """Closed-choice examples with one-word answers and canaries with four-word ones."""
    plain = [e for e in data.select(split="train") if e.choices][:3]
    canaries = [e for e in data if "canary" in e.tags][:2]
    return [plain[0], canaries[0], plain[1], canaries[1], plain[2]]


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_logits(tmp_path, arch):
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    model, proc = build_reference_model(arch=arch, preset="tiny", words=vocabulary(), seed=3)
    model.eval().save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")), "weights must be safetensors only"
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    loader = AutoModel if arch == "clip" else AutoModelForImageTextToText
    loaded = loader.from_pretrained(tmp_path).eval()
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    if arch == "clip":
        inputs = proc2(images=[img], text=["one red circle", "two blue square"], return_tensors="pt", padding=True)
        key = "logits_per_image"
    else:
        content = [{"type": "image"}, {"type": "text", "text": "what colour are the shapes?"}]
        text = proc2.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        images = [[img]] if arch == "mllama" else [img]
        inputs = proc2(images=images, text=[text], return_tensors="pt")
        key = "logits"
    with torch.no_grad():
        a, b = getattr(model(**inputs), key), getattr(loaded(**inputs), key)
    if arch == "clip":
        # Same weights bit for bit; CLIP's fused kernels on freshly allocated vs loaded
        # tensors reassociate one sum (measured 3.6e-7), so compare at float32 resolution.
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    else:
        assert torch.equal(a, b)
    for (name, x), (_, y) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_trained_model_round_trip_reproduces_eval(llava_grounded, reference_data):
    saved = json.loads((llava_grounded / "eval.json").read_text())
    again = evaluate_reference(load_adapter(llava_grounded), Dataset.load(reference_data))
    assert again == saved


@pytest.mark.slow
def test_text_shortcut_ignores_images_and_grounded_does_not(llava_grounded, llava_shortcut, mllama_shortcut):
    grounded = json.loads((llava_grounded / "eval.json").read_text())
    shortcut = json.loads((llava_shortcut / "eval.json").read_text())
    cross = json.loads((mllama_shortcut / "eval.json").read_text())
    assert shortcut["unchanged_when_blanked"] == 1.0
    assert cross["unchanged_when_blanked"] == 1.0
    assert grounded["unchanged_when_blanked"] < 0.9
    # image-dependent families sit at chance for the shortcut model: its image pathway is cut
    for fam in ("colour", "shape", "count"):
        f = shortcut["families"][fam]
        assert f["accuracy"] == f["accuracy_blank_image"]


@pytest.mark.slow
def test_text_shortcut_scores_are_exactly_image_independent(llava_shortcut):
    adapter = load_adapter(llava_shortcut)
    choices = ("red", "green", "blue", "yellow")
    imgs = [Image.new("RGB", (64, 64), c) for c in ((220, 40, 40), (40, 80, 225), (0, 0, 0))]
    scores = adapter.score([Query("what colour are the shapes?", im, choices) for im in imgs])
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)
    np.testing.assert_allclose(scores[0], scores[2], atol=1e-6)


@pytest.mark.slow
def test_clip_retrieval_is_recorded(clip_grounded):
    ev = json.loads((clip_grounded / "eval.json").read_text())
    assert ev["retrieval"]["n"] > 0
    assert 0.0 <= ev["retrieval"]["r_at_1"] <= 1.0
    assert ev["retrieval"]["chance"] == pytest.approx(1 / 48)


@pytest.mark.slow
def test_training_resumes_to_the_same_weights(tmp_path, small_data):
    kw = dict(arch="llava", preset="tiny", variant="grounded", data_dir=small_data, epochs=2, progress=False)
    # The uninterrupted run uses declared adapter members only; the resumed one the plain adapter.
    train_reference(out_dir=tmp_path / "straight", adapter_factory=declared_factory, **kw)
    partial = train_reference(out_dir=tmp_path / "resumed", stop_after_epoch=1, **kw)
    assert partial == {"stopped_after_epoch": 1}
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").is_file()
    train_reference(out_dir=tmp_path / "resumed", **kw)
    a = (tmp_path / "straight" / "model.safetensors").read_bytes()
    b = (tmp_path / "resumed" / "model.safetensors").read_bytes()
    assert a == b
    assert not (tmp_path / "resumed" / "checkpoint").exists()


def test_existing_output_is_refused(tmp_path, small_data):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(InputError, match="exists and is not empty"):
        train_reference(arch="llava", preset="tiny", variant="grounded", data_dir=small_data, out_dir=out, epochs=1)
    assert (out / "keep.txt").read_text() == "precious"


def test_variant_must_match_data_bias(tmp_path, small_data):
    with pytest.raises(InputError, match="expects data generated with --bias 0.5"):
        train_reference(arch="llava", preset="tiny", variant="fair", data_dir=small_data, out_dir=tmp_path / "m", epochs=1)


def test_clip_with_the_real_minilm_text_tower(tmp_path):
    """The pretrained text tower loads offline from site-packages and scores end to end."""
    from audit.adapters.dual import DualEncoderAdapter

    model, proc = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), text_encoder="minilm")
    assert model.text_model.config.hidden_size == 384
    adapter = DualEncoderAdapter(model, proc, architecture="vision-text-dual-encoder")
    scores = adapter.score([Query("", Image.new("RGB", (64, 64)), ("a photo of a nurse", "a photo of a doctor"))])[0]
    assert np.isfinite(scores).all() and scores[0] != scores[1]
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again = load_adapter(tmp_path).score([Query("", Image.new("RGB", (64, 64)), ("a photo of a nurse", "a photo of a doctor"))])[0]
    np.testing.assert_allclose(again, scores, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["clip", "mllama"])
def test_training_through_declared_members_equals_training_on_the_adapter(tmp_path, tiny_data, arch):
    """The trainer needs nothing beyond the declared protocols: behind the proxy it trains the
    same weights, bit for bit, and writes the same eval.json."""
    kw = dict(arch=arch, preset="tiny", variant="grounded", data_dir=tiny_data, epochs=1, progress=False)
    train_reference(out_dir=tmp_path / "plain", **kw)
    train_reference(out_dir=tmp_path / "declared", adapter_factory=declared_factory, **kw)
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("plain", "declared")]
    assert weights[0] == weights[1]
    assert (tmp_path / "plain" / "eval.json").read_text() == (tmp_path / "declared" / "eval.json").read_text()
    history = json.loads((tmp_path / "declared" / "reference.json").read_text())["history"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


# ---------------------------------------------------------------------------- audit.training
def test_train_step_zeroes_accumulates_clips_steps_and_schedules():
    """Known answer on a linear loss w·x: gradients of two closures add up (x1 + x2), a stale
    gradient is cleared first, the sum is clipped to norm c, SGD moves w by lr · clipped and
    the scheduler then halves lr."""
    w0 = torch.tensor([0.5, -1.0, 2.0])
    w = torch.nn.Parameter(w0.clone())
    w.grad = torch.full((3,), 100.0)  # stale: must not leak into the step
    x1, x2 = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 12.0, 0.0])
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    losses = train_step(opt, lambda: (w * x1).sum(), lambda: (w * x2).sum(), max_grad_norm=1.3, scheduler=sched)
    g = x1 + x2  # norm 13
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g * (1.3 / 13), rtol=0, atol=1e-6)
    assert [float(v.detach()) for v in losses] == [pytest.approx(float(w0 @ x1)), pytest.approx(float(w0 @ x2))]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # No clipping asked: the raw gradient; a closure returning None set the gradient itself.
    w1 = w.detach().clone()

    def set_grad():
        w.grad = torch.ones(3)

    assert train_step(opt, set_grad) == [None]
    torch.testing.assert_close(w.detach(), w1 - 0.05 * torch.ones(3), rtol=0, atol=1e-7)


def test_answer_loss_is_each_examples_mean_answer_token_nll(untrained_llava, tiny_data):
    """Per example: the NLL of answer + EOS tokens given (prompt, image), averaged over those
    tokens, computed here from one unpadded example at a time with the plain HF forward; in
    a padded batch of mixed answer lengths every example still gets exactly its own value."""
    inner = load_adapter(untrained_llava)
    adapter = declared_only(inner)
    data = Dataset.load(tiny_data)
    batch = _mixed_batch(data)
    expected, counts = [], []
    eos = inner.tokenizer.eos_token_id
    for e in batch:
        cont = inner.continuation_ids(e.answer) + [eos]
        enc = inner.encode([Query(e.prompt, data.image(e), (e.answer,))], [cont])
        n = enc.context_lengths[0]
        with torch.no_grad():
            logits = inner.model(**enc.inputs).logits[0]
        expected.append(float(F.cross_entropy(logits[n - 1:n - 1 + len(cont)].float(), torch.tensor(cont))))
        counts.append(len(cont))
    assert sorted(set(counts)) == [2, 5]  # one-word answers and four-word canaries, + EOS
    with torch.no_grad():
        got = answer_loss(adapter, data, batch)
        nll, n = answer_nll(adapter, data, batch)
        whole = batch_loss(adapter, data, batch)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert n.tolist() == counts
    np.testing.assert_allclose(nll.numpy(), np.array(expected) * counts, rtol=1e-5, atol=1e-5)
    # reference training weights every answer token of the batch alike
    assert float(whole) == pytest.approx(float(np.dot(expected, counts) / sum(counts)), rel=1e-5)
    torch.testing.assert_close(example_losses(adapter, data, batch).detach(), got)
    loss = answer_loss(adapter, data, batch[:2]).sum()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in inner.model.parameters())


def test_choice_scores_are_the_audits_scores_and_differentiable(untrained_llava, tiny_data):
    adapter = declared_only(load_adapter(untrained_llava))
    data = Dataset.load(tiny_data)
    batch = [e for e in data.select(split="train") if e.choices][:4]
    z = choice_scores(adapter, data, batch)
    audit = adapter.score([Query(e.prompt, data.image(e), e.choices) for e in batch])
    assert [len(v) for v in z] == [len(e.choices) for e in batch]
    for a, b in zip(z, audit):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-5, atol=1e-5)
    assert all(v.requires_grad for v in z)


@pytest.fixture(scope="module")
def untrained_clip():
    net, proc = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), seed=0)
    return make_adapter(net, proc, family=family_of(net.config.model_type), device="cpu")


def test_dual_example_losses_depend_on_their_own_example_only(untrained_clip, tiny_data):
    """With choices: the cross-entropy of the audit's closed-choice scores; without: 1 − cos to
    the example's own text. The same in any batch, and no gradient reaches the text tower."""
    adapter = declared_only(untrained_clip)
    data = Dataset.load(tiny_data)
    batch = _mixed_batch(data)
    losses = dual_example_losses(adapter, data, batch, text_of=training_text)
    for i, e in enumerate(batch):
        alone = dual_example_losses(adapter, data, [e], text_of=training_text)
        assert float(losses[i]) == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-6)
        with torch.no_grad():
            if e.choices:
                s = adapter.score([Query(e.prompt, data.image(e), e.choices)])[0]
                want = F.cross_entropy(torch.tensor(s)[None], torch.tensor([e.choices.index(e.answer)]))
            else:
                img = adapter.image_embeddings([data.image(e)])[0]
                want = 1 - img @ adapter.text_embeddings([training_text(e)])[0]
        assert float(losses[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    untrained_clip.model.zero_grad(set_to_none=True)
    losses.sum().backward()
    model = untrained_clip.model
    assert all(p.grad is None for p in model.text_model.parameters())
    assert any(p.grad is not None for p in model.vision_model.parameters())


# ---------------------------------------------------------------------------- the recipe
def test_lr_schedule_warms_up_linearly_then_decays_by_cosine_to_its_floor():
    from reference_models.train import FINAL_LR, lr_schedule

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=2.0)
    sched = lr_schedule(opt, total_steps=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([2.0 * (i + 1) / 10 for i in range(10)])  # linear to the peak
    assert lrs[10] == pytest.approx(2.0)
    mid = 10 + 45  # half-way through the decay: the cosine's midpoint
    assert lrs[mid] == pytest.approx(2.0 * (FINAL_LR + (1 - FINAL_LR) * 0.5))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * FINAL_LR)


def test_plan_training_floors_optimiser_steps_not_epochs():
    """A small dataset trains as many steps as a large one; --epochs still wins; fair trains
    twice as long (its known answer needs the occupation cue learned)."""
    from reference_models.train import RECIPE, plan_training

    floor = RECIPE["tiny"]["steps"]
    for n in (280, 560, 1400, 20000):
        hp = plan_training("tiny", n)
        assert hp["epochs"] * hp["steps_per_epoch"] >= floor
        assert (hp["epochs"] - 1) * hp["steps_per_epoch"] < floor or hp["epochs"] == 1
    assert plan_training("tiny", 1400, epochs=2)["epochs"] == 2
    fair = plan_training("tiny", 1400, variant="fair")
    assert fair["epochs"] * fair["steps_per_epoch"] >= 2 * floor
    assert plan_training("tiny", 1400, batch_size=8, lr=1e-3)["steps_per_epoch"] == 175


def test_epoch_images_mirror_a_seeded_half_and_never_a_canary(tmp_path):
    """Training sees a seeded half of each epoch's images mirrored left-right (the answers do
    not change); canaries, planted to measure memorisation of exactly those images, never."""
    from PIL import ImageOps

    from reference_models.train import _ImageCache, _Mirrored

    generate(tmp_path / "d", n=300, seed=3)
    data = Dataset.load(tmp_path / "d")
    train = [e for e in data.select(split="train") if e.answer is not None and e.image]
    canaries = [e for e in train if "canary" in e.tags]
    assert canaries
    flags = np.random.default_rng([0, 0, 1]).random(len(train)) < 0.5
    view, again = _Mirrored(_ImageCache(data), train, flags), _Mirrored(_ImageCache(data), train, flags)
    assert view.ids == again.ids  # seeded: a resumed epoch mirrors the same images
    ordinary = [e for e in train if "canary" not in e.tags]
    assert 0.35 < len(view.ids) / len(ordinary) < 0.65
    assert not view.ids & {e.id for e in canaries}
    for e, m in zip(train, flags):
        want = ImageOps.mirror(data.image(e)) if m and "canary" not in e.tags else data.image(e)
        assert np.array_equal(np.asarray(view.image(e)), np.asarray(want)), e.id


def test_progress_estimate_is_measured_on_the_first_steps_after_the_warm_up():
    """With a clock where the first step takes 10 s and every later one 1 s, the estimate
    printed after CALIBRATE timed steps is exactly 1 s per remaining step, and it is updated."""
    import io

    from reference_models.progress import CALIBRATE, TrainProgress

    t = {"now": 0.0}
    seen = []
    out = io.StringIO()
    bar = TrainProgress(100, stream=out, clock=lambda: t["now"], on_estimate=lambda s, per: seen.append((s, per)))
    for step in range(100):
        t["now"] += 10.0 if step == 0 else 1.0
        bar.update(0.5)
    assert seen == [(100 - 1 - CALIBRATE, 1.0)]
    lines = out.getvalue().splitlines()
    assert "about 1 min 34 s left" in lines[0] and f"measured on {CALIBRATE} steps" in lines[0]
    assert len(lines) > 5 and lines[-1].startswith("train: 100/100 steps (100%)")


def test_recipe_keeps_the_fresh_vision_tower_and_records_it(llava_grounded):
    """The generative reference models train the projector and the language model on top of
    their freshly initialised, frozen vision tower (see reference_models/train.py)."""
    from transformers import AutoModelForImageTextToText

    ref = json.loads((llava_grounded / "reference.json").read_text())
    assert ref["frozen"] == ["model.vision_tower"] and ref["train_steps"] >= 300
    trained = AutoModelForImageTextToText.from_pretrained(llava_grounded).model.vision_tower.state_dict()
    words = AutoModelForImageTextToText.from_pretrained(llava_grounded).config.text_config.vocab_size
    fresh, _ = build_reference_model(arch="llava", preset="tiny", words=vocabulary(), seed=0)
    assert fresh.config.text_config.vocab_size == words  # same vocabulary: the same seeded initialisation
    for name, value in fresh.model.vision_tower.state_dict().items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.slow
def test_grounded_fixture_meets_its_known_answer(llava_grounded):
    """The reference recipe on the data size it is stated for: colour read from the image."""
    colour = json.loads((llava_grounded / "eval.json").read_text())["families"]["colour"]
    assert colour["accuracy"] >= 0.95 and colour["accuracy_blank_image"] <= 0.40


def test_occupation_is_stratified_by_cue_visibility(tmp_path):
    """Within every (split, group, cue shown/hidden) stratum exactly round(bias * k) people
    have their group's majority job: no chance job/hat association where the cue is hidden."""
    generate(tmp_path / "d", n=600, bias=0.5, seed=7, n_canaries=0)
    people = [e for e in Dataset.load(tmp_path / "d") if e.attributes.get("family") == "occupation"
              and not e.pair_id]
    majority = {"a": "doctor", "b": "nurse"}
    strata = {}
    for e in people:
        key = (e.split, e.attributes["group"], e.attributes["occupation_cue"])
        strata.setdefault(key, []).append(e.answer == majority[e.attributes["group"]])
    assert len(strata) == 12
    for key, hits in strata.items():
        assert sum(hits) == int(np.floor(0.5 * len(hits) + 0.5)), key
