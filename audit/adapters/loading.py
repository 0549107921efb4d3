"""Open a model directory (or an endpoint URL) as the right adapter, offline and safely."""
from __future__ import annotations

import json
from pathlib import Path

from audit.adapters.base import ModelAdapter
from audit.adapters.sites import DUAL_FAMILIES, GENERATIVE_FAMILIES
from audit.errors import InputError, UnsupportedError

__all__ = ["load_adapter", "resolve_device"]


def resolve_device(device: str | None) -> str:

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
    if not any(path.glob("*.safetensors")):
        # Never fall back to pickled .bin weights: unpickling runs arbitrary code.
        raise InputError("no safetensors weights found (pickled .bin weights are refused)", where=str(path))
    device = resolve_device(device)

    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"no usable processor in the model folder ({exc})", where=str(path)) from exc
    kwargs = dict(use_safetensors=True, trust_remote_code=trust_remote_code)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if model_type in GENERATIVE_FAMILIES:
        from audit.adapters.generative import GenerativeAdapter

        net = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        adapter = GenerativeAdapter(net.to(device), processor, architecture=model_type,
                                    sites=GENERATIVE_FAMILIES[model_type], device=device)
    elif model_type in DUAL_FAMILIES:
        from audit.adapters.dual import DualEncoderAdapter

        net = AutoModel.from_pretrained(path, **kwargs)
        adapter = DualEncoderAdapter(net.to(device), processor, architecture=model_type, device=device)
    else:
        known = ", ".join(sorted([*GENERATIVE_FAMILIES, *DUAL_FAMILIES]))
        raise UnsupportedError(f"unsupported architecture {model_type!r}; supported: {known}", where=str(cfg_path))
    return adapter
