"""Reference models: HF round trip, known-by-construction variants, resumable training."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from audit.adapters import Query, load_adapter
from audit.dataset import Dataset
from audit.errors import InputError
from reference_models.architectures import ARCHS, build_reference_model
from reference_models.evaluate import evaluate_reference
from reference_models.synthetic import vocabulary
from reference_models.train import train_reference


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


def test_trained_model_round_trip_reproduces_eval(llava_grounded, small_data):
    saved = json.loads((llava_grounded / "eval.json").read_text())
    again = evaluate_reference(load_adapter(llava_grounded), Dataset.load(small_data))
    assert again == saved


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


def test_text_shortcut_scores_are_exactly_image_independent(llava_shortcut):
    adapter = load_adapter(llava_shortcut)
    choices = ("red", "green", "blue", "yellow")
    imgs = [Image.new("RGB", (64, 64), c) for c in ((220, 40, 40), (40, 80, 225), (0, 0, 0))]
    scores = adapter.score([Query("what colour are the shapes?", im, choices) for im in imgs])
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-6)
    np.testing.assert_allclose(scores[0], scores[2], atol=1e-6)


def test_clip_retrieval_is_recorded(clip_grounded):
    ev = json.loads((clip_grounded / "eval.json").read_text())
    assert ev["retrieval"]["n"] > 0
    assert 0.0 <= ev["retrieval"]["r_at_1"] <= 1.0
    assert ev["retrieval"]["chance"] == pytest.approx(1 / 48)


def test_training_resumes_to_the_same_weights(tmp_path, small_data):
    kw = dict(arch="llava", preset="tiny", variant="grounded", data_dir=small_data, epochs=2, progress=False)
    train_reference(out_dir=tmp_path / "straight", **kw)
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
