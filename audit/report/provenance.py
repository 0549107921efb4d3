"""What a run says about the audited model, the audit's environment and each probe's examples.

- `model_items`: the model's own provenance from summary.json's `model` (path, identity,
  Hub id, revision, commit, dtype, device map, trust_remote_code, ...), with `model_notes`:
  a warning when its own code ran (trust_remote_code), a fail when weights were freshly
  initialised (weights_not_loaded).
- `environment`: versions of the audit's software, without anything describing the audit
  tool's own source checkout (version-1 runs recorded the git revision of the folder mmaudit
  ran from as `model_git_revision`: it says nothing about the model and must not read as if
  it did).
- `probe_counts` / `examples_line`: how many examples each probe audited and how many fit
  it (summary.json's `probes`), never a sum over probes nor the dataset size.
Torch-free: the dashboard uses it too.
"""
from __future__ import annotations

import re

__all__ = ["model_items", "model_notes", "environment", "is_tool_checkout", "probe_counts", "examples_line",
           "MODEL_FIELDS"]

# summary.json `model` keys in display order, with their labels.
MODEL_FIELDS = (
    ("path", "model path"), ("architecture", "architecture (adapter)"),
    ("sha256", "identity (content fingerprint of weights and configs, or Hub commit)"),
    ("hub_id", "Hugging Face Hub id"), ("revision", "revision asked for"), ("commit", "Hub commit resolved"),
    ("endpoint_model", "served model (endpoint)"), ("dtype", "dtype"), ("device_map", "device map"),
    ("score_mode", "score mode"), ("trust_remote_code", "trust_remote_code (the model's own code ran)"),
    ("weights_not_loaded", "weights not loaded from the checkpoint"),
)
_TOOL_CHECKOUT = re.compile(r"git|commit|revision|checkout|branch", re.I)


def is_tool_checkout(key: str) -> bool:
    """Whether an environment (or unknown model) key describes a source checkout rather than the model."""
    return bool(_TOOL_CHECKOUT.search(str(key)))


def _weights_text(value) -> str:
    if not isinstance(value, dict):
        return str(value)
    parts = []
    for kind, names in value.items():
        names = list(names) if isinstance(names, (list, tuple)) else [names]
        example = f" (e.g. {names[0]})" if names else ""
        parts.append(f"{len(names)} {str(kind).replace('_', ' ')}{example}")
    return "; ".join(parts) or "none"


def model_items(model: dict) -> list[tuple[str, object]]:
    """(label, value) of the model's provenance: the known fields in order, then any other field
    the run recorded about the model, except ones that name a source checkout."""
    model = model if isinstance(model, dict) else {}
    known = dict(MODEL_FIELDS)
    items = []
    for key, label in MODEL_FIELDS:
        if key not in model:
            continue
        value = model[key]
        if key == "identity" or (key == "sha256" and value is None and model.get("identity")):
            value = model.get("identity")
        if key == "weights_not_loaded":
            value = _weights_text(value) if value else "none: every weight came from the checkpoint"
        elif key == "trust_remote_code":
            value = "yes" if value else "no"
        elif value is None and key in ("hub_id", "revision", "commit"):
            value = "none (a local folder)"
        items.append((label, value))
    for key, value in model.items():
        if key not in known and key != "identity" and not is_tool_checkout(key):
            items.append((str(key), value))
    return items


def model_notes(model: dict) -> list[tuple[str, str, str]]:
    """(level, short, text) notes about how the model was loaded: fail when weights were not
    loaded, warning when its own code ran."""
    model = model if isinstance(model, dict) else {}
    out = []
    if model.get("weights_not_loaded"):
        out.append(("fail", "weights not loaded from the checkpoint",
                    "Some weights did not match the checkpoint and were freshly initialised (--allow-missing-weights): "
                    f"{_weights_text(model['weights_not_loaded'])}. This audit does not describe the released model."))
    if model.get("trust_remote_code"):
        out.append(("warning", "the model's own code ran (trust_remote_code)",
                    "The model was loaded with trust_remote_code: its own Python code ran inside the audit, so the "
                    "audited behaviour depends on that code as well as on the weights."))
    return out


def environment(env: dict | None) -> dict:
    """The run's environment without keys that describe a source checkout."""
    return {str(k): v for k, v in (env or {}).items() if not is_tool_checkout(k)} if isinstance(env, dict) else {}


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def probe_counts(summary: dict) -> list[dict]:
    """Per probe of summary.json's `probes`: status, examples audited, examples that fit it, capped."""
    out = []
    for name, info in (summary.get("probes") or {}).items():
        if not isinstance(info, dict):
            continue
        examples, selected = _int(info.get("examples")), _int(info.get("selected"))
        out.append({"probe": str(name), "status": str(info.get("status") or "unknown"), "examples": examples,
                    "selected": selected if selected is not None else examples,
                    "capped": selected is not None and examples is not None and selected > examples,
                    "units": _int(info.get("units"))})
    return out


def examples_line(summary: dict) -> str:
    """One sentence: how many examples the probes audited, of how many in the audited split."""
    counts = [c for c in probe_counts(summary) if c["status"] == "ok" and c["examples"] is not None]
    n = (summary.get("data") or {}).get("n")
    split = f" of the {n} examples in the audited split" if isinstance(n, int) else ""
    if not counts:
        if summary.get("probes") is None:
            return ("This run does not record how many examples each probe audited (a run of an older mmaudit)."
                    + (f" The audited split holds {n} examples." if isinstance(n, int) else ""))
        return "No probe ran on any example."
    lo, hi = min(c["examples"] for c in counts), max(c["examples"] for c in counts)
    span = f"{hi}" if lo == hi else f"between {lo} and {hi}"
    capped = [c for c in counts if c["capped"]]
    cap = (summary.get("config") or {}).get("max_examples")
    why = (f"; {len(capped)} of {len(counts)} probe(s) capped by --max-examples {cap}" if capped and cap is not None
           else f"; {len(capped)} of {len(counts)} probe(s) capped" if capped else "")
    return f"Each probe audited {span} examples{split}{why}."
