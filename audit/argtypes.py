"""argparse value types shared by every sub-command (bad values exit 2 with one line)."""
from __future__ import annotations

import argparse
import math

__all__ = ["probability", "positive_int", "positive_float", "nonnegative_int", "nonnegative_float", "seed", "batch_size", "port", "image_size", "device",
           "DTYPE_CHOICES"]

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def probability(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def seed(text: str) -> int:
    """A seed in [0, 2**32 - 1] (numpy's generators refuse negative seeds)."""
    value = _number(text, int)
    if not 0 <= value <= 2**32 - 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 4294967295, got {value}")
    return value


def batch_size(text: str) -> int | str:
    """A positive integer or `auto`."""
    return "auto" if text == "auto" else positive_int(text)


def port(text: str) -> int:
    value = _number(text, int)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port between 1 and 65535, got {value}")
    return value


def image_size(text: str) -> int:
    """Side of generated images in pixels (bounded: a huge value cannot be allocated)."""
    value = _number(text, int)
    if not 16 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be between 16 and 1024 pixels, got {value}")
    return value


def device(text: str) -> str:
    """cpu, cuda, cuda:N or auto (whether the GPU exists is checked when the model loads)."""
    if text in ("cpu", "cuda", "auto") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda, cuda:N or auto, got {text!r}")


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
