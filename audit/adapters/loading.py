"""Open a model directory (or an endpoint URL) as the right adapter, offline and safely."""
from __future__ import annotations

import json
from pathlib import Path

from audit.adapters.base import ModelAdapter
from audit.adapters.families import families, family_of
from audit.errors import InputError, UnsupportedError

__all__ = ["load_adapter", "load_processor", "make_adapter", "resolve_device", "without_video"]


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was asked for but no GPU is visible", where="--device")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}", where="--device")
    return device


def load_adapter(model: str | Path, *, device: str | None = "cpu", dtype=None, trust_remote_code: bool = False) -> ModelAdapter:
    """A white-box adapter for a local HF folder, or a black-box one for an http(s) URL."""
    if str(model).startswith(("http://", "https://")):
        from audit.adapters.endpoint import EndpointAdapter

        return EndpointAdapter(str(model))
    path = Path(model)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError("not a Hugging Face model folder (no config.json)", where=str(path))
    try:
        model_type = json.loads(cfg_path.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"config.json is unreadable or has no model_type ({exc})", where=str(cfg_path)) from exc
    family = family_of(model_type)
    if family is None:
        known = ", ".join(sorted(families()))
        raise UnsupportedError(f"unsupported architecture {model_type!r}; supported: {known}", where=str(cfg_path))
    why = family.unavailable_reason()
    if why:
        raise UnsupportedError(why, where=str(cfg_path))
    if not any(path.glob("*.safetensors")):
        # Never fall back to pickled .bin weights: unpickling runs arbitrary code.
        raise InputError("no safetensors weights found (pickled .bin weights are refused)", where=str(path))
    device = resolve_device(device)

    import transformers

    processor = load_processor(path, model_type=model_type, trust_remote_code=trust_remote_code)
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    auto = getattr(transformers, family.auto_class)
    if family.kind == "generative":
        kwargs["attn_implementation"] = "sdpa"
    net = auto.from_pretrained(path, **kwargs).to(device)
    return make_adapter(net, processor, family=family, device=device)


def make_adapter(net, processor, *, family, device: str) -> ModelAdapter:
    """The adapter of `family` around an already built model (reference training uses it too)."""
    import importlib

    if family.adapter:
        module, _, name = family.adapter.partition(":")
        cls = getattr(importlib.import_module(module), name)
        return cls(net, processor, family=family, device=device)
    if family.kind == "generative":
        from audit.adapters.generative import GenerativeAdapter

        return GenerativeAdapter(net, processor, architecture=family.model_type, sites=family.sites, device=device)
    from audit.adapters.dual import DualEncoderAdapter

    return DualEncoderAdapter(net, processor, architecture=family.model_type, device=device)


def load_processor(path: Path, *, model_type: str, trust_remote_code: bool = False):
    """The folder's processor; image-only when the install cannot build its video processor."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        # Qwen2-VL / LLaVA-OneVision processors own a video processor, which needs torchvision
        # and a config that image-only folders lack. The audit never sends video: build without it.
        if "video" in str(exc).lower() or "torchvision" in str(exc).lower():
            try:
                return _image_only_processor(path, model_type)
            except (ImportError, OSError, ValueError, TypeError, AttributeError) as inner:
                raise UnsupportedError(f"the processor could not be built without its video part ({inner}); "
                                       f"first error: {exc}", where=str(path)) from exc
        what = "needs a package that is not installed" if isinstance(exc, ImportError) else "is unusable"
        raise InputError(f"the model folder's processor {what} ({exc})", where=str(path)) from exc
    if not hasattr(processor, "image_processor"):  # AutoProcessor may settle for a bare tokenizer
        raise InputError(f"the model folder has no image processor (got {type(processor).__name__})", where=str(path))
    return processor


def without_video(cls):
    """`cls` accepting `video_processor=None` (its class check crashes when torchvision is absent)."""

    def check(self, name, arg):
        if name == "video_processor" and arg is None:
            return None
        return cls.check_argument_for_proper_class(self, name, arg)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check, "__module__": cls.__module__})


def _image_only_processor(path: Path, model_type: str):
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    cfg_file = path / "processor_config.json"
    saved = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    name = saved.get("processor_class") or PROCESSOR_MAPPING_NAMES.get(model_type)
    cls = getattr(transformers, name or "", None)
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise ValueError(f"no image-only form of processor {name!r}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    params = set(inspect.signature(cls.__init__).parameters) - {"image_processor", "tokenizer", "video_processor"}
    kwargs = {k: v for k, v in saved.items() if k in params and not isinstance(v, dict)}
    legacy = path / "chat_template.json"  # older repos keep the processor's template here
    if getattr(tokenizer, "chat_template", None) is None and legacy.is_file():
        kwargs.setdefault("chat_template", json.loads(legacy.read_text()).get("chat_template"))
    kwargs.setdefault("chat_template", getattr(tokenizer, "chat_template", None))
    return without_video(cls)(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)
