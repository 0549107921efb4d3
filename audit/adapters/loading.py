"""Open a model (local folder, Hub id or endpoint URL) as the right adapter, offline and safely.

`load_model` resolves the source (audit.adapters.source), checks every safetensors file's
header, picks the dtype and device placement, loads through the family's transformers
auto class, and refuses a checkpoint whose weights do not match its architecture (missing,
unexpected or mis-shaped tensors would otherwise be freshly initialised and the audit would
run on a random model) unless `allow_missing_weights` says otherwise. It returns the adapter
and what `summary.json` records about the model (identity, dtype, device map, revision).
"""
from __future__ import annotations

import json
from pathlib import Path

from audit.adapters.base import ModelAdapter
from audit.adapters.families import families, family_of
from audit.adapters.source import check_safetensors, model_identity, resolve_source, source_of_folder
from audit.errors import InputError, UnsupportedError

__all__ = ["load_adapter", "load_model", "load_processor", "make_adapter", "resolve_device", "resolve_dtype",
           "without_video", "DTYPES", "DEVICE_MAPS"]

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICE_MAPS = ("auto", "balanced", "sequential")


def resolve_device(device: str | None) -> str:
    import torch

    device = device or "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError("CUDA was asked for but no GPU is visible", where="--device")
        if device.startswith("cuda:"):
            index = device.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise InputError(f"no GPU {index!r}: {torch.cuda.device_count()} visible", where="--device")
        return device
    raise InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto", where="--device")


def _checkpoint_dtype(config: dict) -> str | None:
    for cfg in (config, config.get("text_config") or {}):
        value = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(value, str):
            return value.replace("torch.", "")
    return None


def resolve_dtype(dtype: str | None, *, config: dict, device: str):
    """The torch dtype to load in: `auto` keeps the checkpoint's, except float32 on a GPU -> bfloat16."""
    import torch

    name = dtype or "auto"
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}", where="--dtype")
    if name == "auto":
        name = _checkpoint_dtype(config) or "float32"
        if name == "float32" and device.startswith("cuda"):
            name = "bfloat16"
    if name not in ("bfloat16", "float16", "float32"):
        raise InputError(f"the checkpoint's dtype {name!r} is not supported; give --dtype", where="--dtype")
    if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise InputError("this GPU cannot run bfloat16; use --dtype float16", where="--dtype")
    return getattr(torch, name)


def load_adapter(model: str | Path, **options) -> ModelAdapter:
    """The adapter alone (see `load_model` for the options)."""
    return load_model(model, **options)[0]


def load_model(model: str | Path, *, device: str | None = "cpu", dtype: str | None = None,
               device_map: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
               allow_missing_weights: bool = False, endpoint_options: dict | None = None) -> tuple[ModelAdapter, dict]:
    """(adapter, model record for summary.json) for a local folder, a Hub id or an http(s) URL."""
    if str(model).startswith(("http://", "https://")):
        import hashlib

        from audit.adapters.endpoint import EndpointAdapter

        adapter = EndpointAdapter(str(model), **(endpoint_options or {}))
        name = getattr(adapter, "model_name", "")
        ident = hashlib.sha256(f"{model}|{name}".encode()).hexdigest()
        return adapter, {"identity": ident, "endpoint_model": name}
    source = resolve_source(str(model), revision=revision, trust_remote_code=trust_remote_code)
    path = source.path
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError("not a Hugging Face model folder (no config.json)", where=str(path))
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        model_type = config["model_type"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"config.json is unreadable or has no model_type ({type(exc).__name__})",
                         where=str(cfg_path)) from exc
    if not isinstance(model_type, str):
        raise InputError("config.json's model_type is not a string", where=str(cfg_path))
    family = family_of(model_type)
    if family is None:
        known = ", ".join(sorted(families()))
        raise UnsupportedError(f"unsupported architecture {model_type!r}; supported: {known}", where=str(cfg_path))
    why = family.unavailable_reason()
    if why:
        raise UnsupportedError(why, where=str(cfg_path))
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        # Never fall back to pickled .bin weights: unpickling runs arbitrary code.
        raise InputError("no safetensors weights found (pickled .bin weights are refused)", where=str(path))
    for w in weights:
        check_safetensors(w)
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise InputError(f"unknown device map {device_map!r}; choose one of {', '.join(DEVICE_MAPS)}",
                         where="--device-map")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config=config, device=device)

    import transformers

    processor = load_processor(path, model_type=model_type, trust_remote_code=trust_remote_code)
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch_dtype,
                  output_loading_info=True)
    if family.kind == "generative":
        kwargs["attn_implementation"] = "sdpa"
    if device_map is not None:
        kwargs["device_map"] = device_map  # accelerate places the layers; hooks move activations between devices
    auto = getattr(transformers, family.auto_class)
    try:
        try:
            net, info = auto.from_pretrained(path, **kwargs)
        except ValueError as exc:
            if "scaled_dot_product_attention" not in str(exc):
                raise
            # Some architectures (Gemma 2 inside PaliGemma 2) have no SDPA path: eager attention is exact, slower
            net, info = auto.from_pretrained(path, **{**kwargs, "attn_implementation": "eager"})
    except (OSError, ValueError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())[:300]
        raise InputError(f"the checkpoint does not load ({type(exc).__name__}: {msg})", where=str(path)) from exc
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems and not allow_missing_weights:
        detail = "; ".join(f"{len(v)} {k.replace('_', ' ')} (e.g. {v[0]})" for k, v in problems.items())
        raise InputError(f"the weights do not match the architecture: {detail}. Loading anyway would audit freshly "
                         "initialised weights; pass --allow-missing-weights to do it on purpose", where=str(path))
    if device_map is None:
        net = net.to(device)
    else:
        first = next(net.parameters()).device
        device = str(first)
    adapter = make_adapter(net, processor, family=family, device=device)
    record = {"identity": model_identity(source_of_folder(path) if source.commit is None else source), "dtype": str(torch_dtype).replace("torch.", ""),
              "device_map": device_map, "hub_id": source.hub_id, "revision": source.revision,
              "commit": source.commit, "trust_remote_code": trust_remote_code,
              "weights_not_loaded": problems or None}
    return adapter, record


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
    # AutoProcessor may settle for a bare tokenizer; an audio model brings a feature extractor instead
    if not (hasattr(processor, "image_processor") or hasattr(processor, "feature_extractor")):
        raise InputError(f"the model folder has no image processor or audio feature extractor "
                         f"(got {type(processor).__name__})", where=str(path))
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
