"""Tiny, untrained models of every family the white-box adapter supports, built from configs.

`build_family(name, path=...)` saves model + processor (with its tokenizer) to `path` with
`save_pretrained`, so tests open them through `load_adapter` exactly like a user's
model. Nothing is downloaded: the tokenizer is the project's word-level one, extended with
each family's special tokens. Sizes are the smallest that keep every code path alive.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast

from audit.adapters.loading import without_video
from reference_models.architectures import _image_processor
from reference_models.synthetic import vocabulary
from reference_models.tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, UNK, build_tokenizer

__all__ = ["FAMILIES", "GENERATIVE", "DUAL", "MODEL_TYPE", "NEEDS", "build_family"]

GENERATIVE = ("llava", "llava_next", "llava_onevision", "mllama", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3",
              "qwen3_vl", "qwen3_vl_moe", "internvl", "smolvlm", "paligemma",
              "mistral3", "llava_pixtral", "llama4", "vipllava")
DUAL = ("clip", "siglip")
FAMILIES = GENERATIVE + DUAL
MODEL_TYPE = {"llava_pixtral": "llava"}  # test families that are another form of a registered model_type
# Packages transformers' processors need for a family (tests skip the family without them).
NEEDS = {"smolvlm": ("num2words",), "mistral3": ("torchvision",), "llava_pixtral": ("torchvision",),
         "llama4": ("torchvision",)}
IMAGE = 32  # side of every vision tower's input, in pixels
PATCH = 8
HIDDEN = 32
HEADS = 2


def _tokenizer(*, named: dict[str, str] | None = None, extra: tuple[str, ...] = (), image_text: str | None = None,
               add_eos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer plus the family's special tokens.

    `named` become tokenizer attributes (`tok.image_token`, `tok.boi_token`, ...) that
    processors read; `image_text` is what the chat template writes for an image.
    """
    named = dict(named or {})
    base = build_tokenizer(vocabulary(), image_token=named.get("image_token"), add_eos=add_eos)
    specials = [t for t in (*named.values(), *extra) if t not in base.get_vocab()]
    core = base.backend_tokenizer
    if specials:
        core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    kwargs = {"extra_special_tokens": named} if named else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, pad_token=PAD, bos_token=BOS,
                                  eos_token=EOS, **kwargs)
    tok.padding_side = "right"
    if image_text is not None:
        tok.chat_template = CHAT_TEMPLATE.replace("IMAGE_TOKEN", image_text)
    return tok


def _llama(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                **kw)


def _clip_vision(**kw) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                image_size=IMAGE, patch_size=PATCH, projection_dim=HIDDEN, **kw)


def _siglip_vision(**kw) -> dict:
    return dict(model_type="siglip_vision_model", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                num_hidden_layers=1, num_attention_heads=HEADS, image_size=IMAGE, patch_size=PATCH, **kw)


def _square_clip_processor():
    return _image_processor("CLIPImageProcessor", size={"shortest_edge": IMAGE},
                            crop_size={"height": IMAGE, "width": IMAGE})


# ---------------------------------------------------------------------------- LLaVA family
def _llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(named={"image_token": "<image>"}, image_text="<image>")
    n = (IMAGE // PATCH) ** 2
    cfg = LlavaConfig(vision_config=_clip_vision(model_type="clip_vision_model"),
                      text_config=dict(model_type="llama", **_llama(tok)), image_token_id=tok.image_token_id,
                      image_seq_length=n, vision_feature_layer=-1, vision_feature_select_strategy="default")
    proc = LlavaProcessor(image_processor=_square_clip_processor(), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)
    return LlavaForConditionalGeneration(cfg), proc


def _vipllava():
    from transformers import LlavaProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration

    tok = _tokenizer(named={"image_token": "<image>"}, image_text="<image>")
    cfg = VipLlavaConfig(vision_config=_clip_vision(model_type="clip_vision_model"),
                         text_config=dict(model_type="llama", **_llama(tok)), image_token_id=tok.image_token_id,
                         image_seq_length=(IMAGE // PATCH) ** 2, vision_feature_layers=[-1])
    proc = LlavaProcessor(image_processor=_square_clip_processor(), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)
    return VipLlavaForConditionalGeneration(cfg), proc


PINPOINTS = [[IMAGE, IMAGE], [IMAGE, 2 * IMAGE], [2 * IMAGE, IMAGE], [2 * IMAGE, 2 * IMAGE]]


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tok = _tokenizer(named={"image_token": "<image>"}, image_text="<image>")
    cfg = LlavaNextConfig(vision_config=_clip_vision(model_type="clip_vision_model"),
                          text_config=dict(model_type="llama", **_llama(tok)), image_token_index=tok.image_token_id,
                          image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", image_seq_length=(IMAGE // PATCH) ** 2)
    ip = _image_processor("LlavaNextImageProcessor", size={"shortest_edge": IMAGE},
                          crop_size={"height": IMAGE, "width": IMAGE}, image_grid_pinpoints=PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=tok.chat_template)
    return LlavaNextForConditionalGeneration(cfg), proc


def _llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

    tok = _tokenizer(named={"image_token": "<image>", "video_token": "<video>"}, image_text="<image>")
    cfg = LlavaOnevisionConfig(vision_config=_siglip_vision(vision_use_head=False),
                               text_config=dict(model_type="qwen2", **_llama(tok)),
                               image_token_index=tok.image_token_id, video_token_index=tok.video_token_id,
                               image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    ip = _image_processor("LlavaOnevisionImageProcessor", size={"height": IMAGE, "width": IMAGE},
                          image_grid_pinpoints=PINPOINTS)
    # without_video: the real class needs torchvision for its video processor (absent here)
    proc = without_video(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=(IMAGE // PATCH) ** 2,
        vision_feature_select_strategy="full", chat_template=tok.chat_template)
    return LlavaOnevisionForConditionalGeneration(cfg), proc


def _pixtral(name: str):
    """Mistral 3 (Pixtral tower, patch merger) or Pixtral-12B's form: LLaVA with a Pixtral tower."""
    import transformers
    from transformers.models.pixtral.processing_pixtral import PixtralProcessor

    named = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    tok = _tokenizer(named=named, image_text="[IMG]")
    vision = dict(model_type="pixtral", hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                  num_attention_heads=HEADS, head_dim=HIDDEN // HEADS, image_size=2 * IMAGE, patch_size=PATCH)
    text = dict(model_type="mistral", **_llama(tok), head_dim=HIDDEN // HEADS)
    merge = 2 if name == "mistral3" else 1
    if name == "mistral3":
        cfg = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                          spatial_merge_size=merge)
        model = transformers.Mistral3ForConditionalGeneration(cfg)
    else:
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                       vision_feature_layer=-1, vision_feature_select_strategy="full")
        model = transformers.LlavaForConditionalGeneration(cfg)
    # Pixtral keeps the aspect ratio: the test images give different row and column counts.
    ip = _image_processor("PixtralImageProcessor", size={"longest_edge": 2 * IMAGE},
                          patch_size={"height": PATCH, "width": PATCH})
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, spatial_merge_size=merge,
                            chat_template=tok.chat_template)
    return model, proc


LLAMA4_SPECIALS = {"image_token": "<|image|>", "boi_token": "<|image_start|>", "eoi_token": "<|image_end|>",
                   "patch_token": "<|patch|>"}


def _llama4():
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor

    tok = _tokenizer(named=LLAMA4_SPECIALS, extra=("<|tile_x_separator|>", "<|tile_y_separator|>"),
                     image_text="<|image|>")
    vision = dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH, vision_output_dim=HIDDEN, projector_input_dim=HIDDEN,
                  projector_output_dim=HIDDEN, pixel_shuffle_ratio=0.5)  # the shuffle needs intermediate = 4 * hidden
    # Every block a mixture of experts (4, one per token, plus the shared expert); block 1 has no
    # RoPE and attends in full, block 0 attends in chunks of 16 positions, which the prompts cross.
    text = dict(**_llama(tok), head_dim=HIDDEN // HEADS, intermediate_size_mlp=2 * HIDDEN, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2, attention_chunk_size=16)
    cfg = Llama4Config(vision_config=vision, text_config=text, image_token_index=tok.patch_token_id,
                       boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id)
    # Up to 2 tiles plus the global view: wide and tall images are tiled, square ones are not.
    ip = _image_processor("Llama4ImageProcessor", size={"height": IMAGE, "width": IMAGE}, max_patches=2)
    proc = Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=PATCH, pixel_shuffle_ratio=0.5,
                           chat_template=tok.chat_template)
    return Llama4ForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------------- cross-attention
def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.configuration_mllama import MllamaTextConfig, MllamaVisionConfig

    tok = _tokenizer(named={"image_token": "<|image|>"}, image_text="<|image|>")
    vision = MllamaVisionConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_global_layers=1, attention_heads=HEADS,
                                intermediate_size=2 * HIDDEN, vision_output_dim=2 * HIDDEN, image_size=IMAGE,
                                patch_size=PATCH, max_num_tiles=1, intermediate_layers_indices=[0],
                                supported_aspect_ratios=[[1, 1]])
    text = MllamaTextConfig(**{**_llama(tok), "num_hidden_layers": 3}, cross_attention_layers=[1])
    cfg = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    ip = _image_processor("MllamaImageProcessor", size={"height": IMAGE, "width": IMAGE}, max_image_tiles=1)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template)
    return MllamaForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------------- Qwen2-VL family
QWEN_SPECIALS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}


def _qwen(name: str):
    import transformers

    prefix = "Qwen2VL" if name == "qwen2_vl" else "Qwen2_5_VL"
    tok = _tokenizer(named=QWEN_SPECIALS, image_text="<|vision_start|><|image_pad|><|vision_end|>")
    patch = 4
    vision = dict(depth=1, hidden_size=HIDDEN, num_heads=HEADS, patch_size=patch, spatial_merge_size=2,
                  temporal_patch_size=2)
    if name == "qwen2_vl":
        vision.update(embed_dim=HIDDEN, mlp_ratio=2)
    else:
        vision.update(intermediate_size=2 * HIDDEN, out_hidden_size=HIDDEN, window_size=4 * patch,
                      fullatt_block_indexes=[0])
    head_dim = HIDDEN // HEADS
    # M-RoPE splits the head_dim/2 rotary frequencies over (time, height, width)
    half = head_dim // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # Qwen's own 16/24/24 of 64
    text = dict(model_type=f"{name}_text", **_llama(tok),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    cfg = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    pixels = IMAGE * IMAGE  # any image is resized to about this many pixels
    ip = _image_processor("Qwen2VLImageProcessor", size={"shortest_edge": pixels, "longest_edge": pixels},
                          patch_size=patch, merge_size=2, temporal_patch_size=2)
    proc = without_video(getattr(transformers, f"{prefix}Processor"))(
        image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg), proc


def _qwen3(name: str):
    import transformers

    prefix = "Qwen3VL" if name == "qwen3_vl" else "Qwen3VLMoe"
    tok = _tokenizer(named=QWEN_SPECIALS, image_text="<|vision_start|><|image_pad|><|vision_end|>")
    patch = 4
    # deepstack_visual_indexes=[0]: vision block 0's features are also added after decoder block 0
    vision = dict(depth=1, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_heads=HEADS, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    half = HIDDEN // HEADS // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]  # Qwen3's 24/20/20 of 64, interleaved
    text = dict(model_type=f"{name}_text", **_llama(tok), head_dim=HIDDEN // HEADS,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                                 "mrope_interleaved": True})
    if name == "qwen3_vl_moe":  # every layer sparse: 4 experts, 2 per token
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN, decoder_sparse_step=1)
    cfg = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=text, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
        vision_start_token_id=tok.vision_start_token_id, vision_end_token_id=tok.vision_end_token_id)
    pixels = IMAGE * IMAGE
    ip = _image_processor("Qwen2VLImageProcessor", size={"shortest_edge": pixels, "longest_edge": pixels},
                          patch_size=patch, merge_size=2, temporal_patch_size=2)
    proc = without_video(transformers.Qwen3VLProcessor)(
        image_processor=ip, tokenizer=tok, video_processor=None, chat_template=tok.chat_template)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg), proc


# ---------------------------------------------------------------------------- InternVL
def _internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _tokenizer(named=named, image_text="<IMG_CONTEXT>")
    vision = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH)
    cfg = InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **_llama(tok)),
                         image_token_id=tok.context_image_token_id, downsample_ratio=0.5)
    seq = (IMAGE // PATCH) ** 2 // 4  # pixel shuffle by 0.5 keeps a quarter of the patches per tile
    # Tiling on: a 64x32 image becomes 2 tiles plus a thumbnail (the small test images stay one tile).
    ip = _image_processor("GotOcr2ImageProcessor", size={"height": IMAGE, "width": IMAGE}, crop_to_patches=True,
                          min_patches=1, max_patches=2)
    proc = without_video(InternVLProcessor)(image_processor=ip, tokenizer=tok, video_processor=None,
                                            image_seq_length=seq, chat_template=tok.chat_template)
    return InternVLForConditionalGeneration(cfg), proc


# ---------------------------------------------------------------------------- Idefics3/SmolVLM, Gemma 3, PaliGemma
def _idefics3(name: str):
    """Idefics3 or SmolVLM (the same layout; SmolVLM's processor also owns a video processor)."""
    import transformers

    prefix = "Idefics3" if name == "idefics3" else "SmolVLM"
    tok = _tokenizer(extra=("<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"),
                     image_text="<image>")
    ip = _image_processor(f"{prefix}ImageProcessor", size={"longest_edge": IMAGE},
                          max_image_size={"longest_edge": IMAGE}, do_image_splitting=False)
    scale = 2
    seq = (IMAGE // PATCH) ** 2 // scale ** 2
    parts = dict(image_processor=ip, tokenizer=tok, image_seq_len=seq, chat_template=tok.chat_template)
    if name == "smolvlm":
        proc = without_video(transformers.SmolVLMProcessor)(video_processor=None, **parts)
    else:
        proc = transformers.Idefics3Processor(**parts)
    vision = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                  image_size=IMAGE, patch_size=PATCH)
    cfg = getattr(transformers, f"{prefix}Config")(
        vision_config=vision, text_config=dict(model_type="llama", **_llama(tok)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, pad_token_id=tok.pad_token_id)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg), proc


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    tok = _tokenizer(named=named, image_text="<start_of_image>")
    mm_tokens = 4
    text = dict(model_type="gemma3_text", **{**_llama(tok), "num_key_value_heads": 1}, head_dim=HIDDEN // HEADS,
                query_pre_attn_scalar=HIDDEN // HEADS, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"])  # one layer of each kind
    cfg = Gemma3Config(vision_config=_siglip_vision(vision_use_head=False), text_config=text,
                       mm_tokens_per_image=mm_tokens, boi_token_index=tok.boi_token_id,
                       eoi_token_index=tok.eoi_token_id, image_token_index=tok.image_token_id)
    ip = _image_processor("Gemma3ImageProcessor", size={"height": IMAGE, "width": IMAGE})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=mm_tokens,
                           chat_template=tok.chat_template)
    return Gemma3ForConditionalGeneration(cfg), proc


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor

    # PaliGemma checkpoints ship no chat template: the adapter writes "<image>" + prompt itself.
    tok = _tokenizer(named={"image_token": "<image>"})
    # PaliGemma 1's Gemma decoder: PaliGemma 2's Gemma 2 has no SDPA, which load_adapter asks for.
    text = dict(model_type="gemma", **{**_llama(tok), "num_key_value_heads": 1}, head_dim=HIDDEN // HEADS)
    cfg = PaliGemmaConfig(vision_config=_siglip_vision(vision_use_head=False), text_config=text,
                          image_token_index=tok.image_token_id, projection_dim=HIDDEN, hidden_size=HIDDEN,
                          vocab_size=len(tok))
    ip = _image_processor("SiglipImageProcessor", size={"height": IMAGE, "width": IMAGE},
                          image_seq_length=(IMAGE // PATCH) ** 2)
    return PaliGemmaForConditionalGeneration(cfg), PaliGemmaProcessor(image_processor=ip, tokenizer=tok)


# ---------------------------------------------------------------------------- dual encoders
def _clip():
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tok = _tokenizer(add_eos=True)
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = CLIPConfig(text_config=text, vision_config=_clip_vision(), projection_dim=HIDDEN)
    return CLIPModel(cfg), CLIPProcessor(image_processor=_square_clip_processor(), tokenizer=tok)


def _siglip():
    from transformers import SiglipConfig, SiglipModel, SiglipProcessor

    tok = _tokenizer(add_eos=True)
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1,
                num_attention_heads=HEADS, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = {k: v for k, v in _siglip_vision().items() if k != "model_type"}
    cfg = SiglipConfig(text_config=text, vision_config=vision)
    ip = _image_processor("SiglipImageProcessor", size={"height": IMAGE, "width": IMAGE})
    return SiglipModel(cfg), SiglipProcessor(image_processor=ip, tokenizer=tok)


_BUILDERS = {
    "llava": _llava, "llava_next": _llava_next, "vipllava": _vipllava, "llava_onevision": _llava_onevision, "mllama": _mllama,
    "qwen2_vl": lambda: _qwen("qwen2_vl"), "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"),
    "qwen3_vl": lambda: _qwen3("qwen3_vl"), "qwen3_vl_moe": lambda: _qwen3("qwen3_vl_moe"),
    "mistral3": lambda: _pixtral("mistral3"), "llava_pixtral": lambda: _pixtral("llava_pixtral"),
    "llama4": _llama4, "internvl": _internvl, "idefics3": lambda: _idefics3("idefics3"),
    "smolvlm": lambda: _idefics3("smolvlm"), "paligemma": _paligemma,
    "gemma3": _gemma3, "clip": _clip, "siglip": _siglip,
}


def build_family(name: str, *, path: Path, seed: int = 0) -> Path:
    """Build a fresh, seeded tiny model of family `name` and save it (with processor) to `path`."""
    torch.manual_seed(seed)
    model, proc = _BUILDERS[name]()
    model.eval().save_pretrained(path)
    if hasattr(proc, "video_processor") and proc.video_processor is None:
        _save_image_only(proc, path)
    else:
        proc.save_pretrained(path)
    return path


def _save_image_only(proc, path: Path) -> None:
    # An image-only processor cannot `save_pretrained` (it saves every sub-processor); write
    # the parts the way Hub repos ship them: tokenizer, preprocessor_config.json, processor_config.json.
    proc.tokenizer.save_pretrained(path)
    proc.image_processor.save_pretrained(path)
    params = inspect.signature(type(proc).__init__).parameters
    saved = {k: getattr(proc, k) for k in params if isinstance(getattr(proc, k, None), (int, float, str))}
    saved.pop("chat_template", None)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": type(proc).__name__, **saved}))
