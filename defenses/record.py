"""The defense record and the MODEL_DIR plumbing every defense shares.

A defense never mutates its input: it writes a new MODEL_DIR (a plain Hugging Face folder,
safetensors weights, processor copied) and next to the weights `defense.json`:

    {"schema_version": 1, "method": "dp" | "debias:cda" | "debias:clp" | "debias:residual",
     "created": ISO-8601, "source": {"model": path, "model_sha256": …, "data": path, "data_sha256": …},
     "parameters": {…every setting that shaped the result…},
     "privacy": {"epsilon", "delta", "accountant", "steps", "noise_multiplier", "sample_rate",
                 "target_epsilon", "n_train"} | null,
     "training": {"steps", "seconds", "weights_changed", "trainable_parameters", "history", …},
     "validator": {"errors", "frozen", …} | null,
     "utility": {"before": {…}, "after": {…}, "delta": {"accuracy": after − before}},
     "fairness": {"before": {…}, "after": {…}, "delta": {…}} | null,
     "environment": {"torch", "transformers", "opacus", "peft", "device"}}

`dp_accountant.json` (DP only) holds what is needed to recompute ε without trusting the
record: the accountant's name, its history [(noise_multiplier, sample_rate, steps), …] and δ.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from audit.errors import InputError

__all__ = [
    "ACCOUNTANT_FILE",
    "ERR_OUT_EXISTS",
    "ERR_OUT_IS_MODEL",
    "RECORD_FILE",
    "SCHEMA_VERSION",
    "check_out",
    "deltas",
    "environment",
    "epsilon_from_accountant",
    "model_fingerprint",
    "read_accountant",
    "read_record",
    "source",
    "utility_summary",
    "write_model_dir",
]

RECORD_FILE = "defense.json"
ACCOUNTANT_FILE = "dp_accountant.json"
SCHEMA_VERSION = 1
ERR_OUT_EXISTS = "output folder exists and is not empty; pass --overwrite to replace it"
ERR_OUT_IS_MODEL = "the output folder is the input model; a defense never changes its input"


def check_out(out: str | os.PathLike, *, model: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work when OUT cannot be written (nothing already written is lost)."""
    out = Path(out).absolute()
    if out.resolve() == Path(model).absolute().resolve():
        raise InputError(ERR_OUT_IS_MODEL, where=str(out))
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", where=str(out))
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(ERR_OUT_EXISTS, where=str(out))
    if out.is_dir() and any(out.iterdir()) and not (out / "defense.json").is_file():
        raise InputError("--overwrite only replaces a model folder written by mmaudit defend (with defense.json); "
                         "this folder holds something else and is kept", where=str(out))
    return out


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """The model identity a run records for this folder (audit.runner.model_fingerprint), so a
    defense record's source links to the audits of the model it started from."""
    from audit.runner import model_fingerprint as identity

    return identity(str(model_dir))


def source(model_dir: str | os.PathLike, data) -> dict:
    """The record's `source`: what the defense started from."""
    return {"model": str(Path(model_dir).absolute()), "model_sha256": model_fingerprint(model_dir),
            "data": str(data.path), "data_sha256": data.sha256}


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj):
    """NaN/inf become null so every record is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_clean(json.loads(json.dumps(obj, default=_json_default))), indent=1,
                               allow_nan=False) + "\n")


def write_model_dir(out: Path, *, save: Callable[[Path], None], record: dict,
                    accountant: dict | None = None, overwrite: bool = False) -> Path:
    """Build OUT in a hidden sibling (weights via `save`, then the record) and rename it into
    place, so a crash never leaves half a model and an existing OUT survives until the end."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)
        save(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise RuntimeError("the defended model was not written as safetensors")
        if accountant is not None:
            dump_json(tmp / ACCOUNTANT_FILE, accountant)
        record = {"schema_version": SCHEMA_VERSION,
                  "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **record}
        dump_json(tmp / RECORD_FILE, record)
        old = None
        if out.exists():
            if any(out.iterdir()) and not overwrite:
                raise InputError(ERR_OUT_EXISTS, where=str(out))
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "model")
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists():
                os.replace(old / "model", out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_record(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"unreadable defense record ({exc})", where=str(path)) from exc


def read_accountant(model_dir: str | os.PathLike) -> dict | None:
    """The saved accountant state: dp_accountant.json, else the record's privacy block."""
    path = Path(model_dir) / ACCOUNTANT_FILE
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"unreadable accountant state ({exc})", where=str(path)) from exc
    record = read_record(model_dir)
    privacy = (record or {}).get("privacy")
    if privacy and privacy.get("history"):
        return privacy
    return None


def epsilon_from_accountant(state: dict, delta: float | None = None) -> float:
    """ε recomputed by Opacus from the saved history; the stored ε without Opacus."""
    delta = state["delta"] if delta is None else delta
    try:
        from opacus.accountants import create_accountant
    except ImportError:  # pragma: no cover - opacus is an extra
        return float(state["epsilon"])
    acc = create_accountant(state["accountant"])
    acc.history = [tuple(h) for h in state["history"]]
    return float(acc.get_epsilon(delta=delta))


def utility_summary(adapter, data) -> dict:
    """Test-split accuracy as `reference_models.evaluate` computes it (same examples, same
    argmax over the closed choices, its bias indicators), in one scoring pass (the blanked-image
    pass of eval.json is not needed here), plus `accuracy_answerable`: the same minus the
    examples whose occupation cue is hidden — only the stereotype 'answers' those, so a
    debiased model must lose that accuracy on biased test data; that is the point, not a cost."""
    from collections import defaultdict

    import numpy as np

    from audit.adapters.base import Query
    from reference_models.evaluate import bias_indicators, predict

    test = data.audit_split()
    plain = [e for e in test if e.choices and e.answer in e.choices and e.image and not e.pair_id
             and not {"canary", "typographic"} & set(e.tags)]
    out: dict = {"accuracy": None, "n_test": len(plain), "families": {}, "accuracy_answerable": None,
                 "n_answerable": 0}
    if not plain:
        return out
    truth = np.array([e.choices.index(e.answer) for e in plain])
    pred = predict(adapter, [Query(e.prompt, data.image(e), e.choices) for e in plain])
    hit = pred == truth
    out["accuracy"] = float(hit.mean())
    by_family: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(plain):
        by_family[e.attributes.get("family", "other")].append(i)
    out["families"] = {f: float(hit[idx].mean()) for f, idx in sorted(by_family.items())}
    answerable = np.array([e.attributes.get("occupation_cue") != "hidden" for e in plain])
    if answerable.any():
        out["accuracy_answerable"], out["n_answerable"] = float(hit[answerable].mean()), int(answerable.sum())
    out.update(bias_indicators(adapter, data, test, plain, pred))
    return out


def deltas(before: dict, after: dict) -> dict:
    """after − before for every number present in both (nested one level for dicts)."""
    out = {}
    for k, a in after.items():
        b = before.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = deltas(b, a)
            if sub:
                out[k] = sub
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
                and a is not None and b is not None and k not in ("n_test", "n_answerable", "hidden_cue_n", "group_counterfactual_sets"):
            out[k] = a - b
    return out


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device}
    for name in ("opacus", "peft"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    return env
