"""`--log-samples`: a transcript of every scored query (what the model saw and said).

`recording(adapter)` wraps an adapter so that every `score` and `generate` call is
recorded: the probe, example and variant the query belongs to (Query.example_id /
variant, set by the probes), the rendered prompt (chat template applied, for white-box
models; the raw prompt for endpoints), a hash of the image, each candidate's score and
the generated text. The wrapper is an instance of the same protocol class as the adapter
it wraps (probes' isinstance checks keep working) and forwards everything else unchanged.
Rows travel back with each unit's result; the runner writes `units/<probe>/<k>.samples.parquet`
and, at the end, `RUN_DIR/samples.parquet` (docs/format.md).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

__all__ = ["SAMPLE_COLUMNS", "recording", "samples_frame"]

SAMPLE_COLUMNS = ["probe", "example_id", "variant", "call", "prompt", "rendered_prompt", "image_sha256",
                  "candidates", "scores", "predicted", "generated"]
_CAP = 100_000  # rows per unit: a transcript must not grow without bound


def _image_hash(image) -> str | None:
    if image is None:
        return None
    return hashlib.sha256(image.tobytes() + f"{image.size}{image.mode}".encode()).hexdigest()[:16]


def samples_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=SAMPLE_COLUMNS)
    return frame.astype({c: "string" for c in SAMPLE_COLUMNS if c not in ("scores",)} | {"scores": "object"})


def _protocol_of(adapter) -> type:
    from audit.adapters.base import DualEncoderWhiteBox, GenerativeWhiteBox, ModelAdapter

    for proto in (GenerativeWhiteBox, DualEncoderWhiteBox):
        if isinstance(adapter, proto):
            return proto
    return ModelAdapter


def _render(inner, query) -> str | None:
    from audit.adapters.base import GenerativeWhiteBox

    if isinstance(inner, GenerativeWhiteBox):
        return inner.render_prompt(query)
    return None


def recording(adapter, *, probe: str):
    """(adapter that records every score/generate call, the list of records)."""
    records: list[dict] = []
    local = {"score", "generate", "_inner", "_records", "_probe"}

    def _add(q, call: str, scores=None, text=None):
        if len(records) >= _CAP:
            return
        s = None if scores is None else [float(x) for x in np.asarray(scores, dtype=np.float64)]
        pred = q.candidates[int(np.argmax(s))] if s and q.candidates else None
        records.append({"probe": probe, "example_id": q.example_id, "variant": q.variant, "call": call,
                        "prompt": q.prompt, "rendered_prompt": _render(adapter, q),
                        "image_sha256": _image_hash(q.image), "candidates": json.dumps(list(q.candidates)),
                        "scores": s, "predicted": pred, "generated": text})

    def __getattribute__(self, name):
        if name.startswith("__") or name in local:
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_inner"), name, value)

    def score(self, queries, *, batch_size: int = 16):
        out = adapter.score(queries, batch_size=batch_size)
        texts = getattr(adapter, "last_answers", None)  # generate mode: the answers the scores were read from
        texts = texts if isinstance(texts, list) and len(texts) == len(out) else [None] * len(out)
        for q, s, text in zip(queries, out, texts):
            _add(q, "score", scores=s, text=text)
        return out

    def generate(self, queries, *, max_new_tokens: int = 8):
        out = adapter.generate(queries, max_new_tokens=max_new_tokens)
        for q, text in zip(queries, out):
            _add(q, "generate", text=text)
        return out

    proto = _protocol_of(adapter)
    cls = type(f"Recording{proto.__name__}", (proto,), {"__getattribute__": __getattribute__,
                                                        "__setattr__": __setattr__, "score": score,
                                                        "generate": generate})
    cls.__abstractmethods__ = frozenset()
    obj = object.__new__(cls)
    object.__setattr__(obj, "_inner", adapter)
    return obj, records
