"""`mmaudit run --config FILE.yaml`: the run flags as a file (safe YAML, validated by pydantic).

Errors name the file and the field, e.g. `run.yaml: field 'seed': Input should be a valid integer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from audit.errors import InputError

__all__ = ["RunConfig", "load_run_config", "MAX_SEED"]

MAX_SEED = 2**32 - 1


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    endpoint: str | None = None
    data: str | list[str] | None = None
    suite: Literal["quick", "standard", "full"] | None = None
    probes: list[str] | None = None
    out: str | None = None
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda|cuda:\d+|auto)$")
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    store: str | None = None
    on_error: Literal["stop", "skip"] = "stop"
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 16
    max_examples: int | None = Field(default=None, ge=1)
    parent: str | None = None
    yes: bool = False
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device_map: Literal["auto", "balanced", "sequential"] | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    allow_missing_weights: bool = False
    force: bool = False
    log_samples: bool = False
    score_mode: Literal["logprob", "generate"] = "logprob"
    max_new_tokens: int = Field(default=32, ge=1)
    api_key_env: str | None = None
    endpoint_model: str | None = None
    concurrency: int = Field(default=4, ge=1)
    timeout: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    header: list[str] | None = None
    executor: Literal["local", "ray"] = "local"
    workers: int = Field(default=2, ge=1)
    ray_address: str | None = None
    gpus_per_worker: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_retries: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> "RunConfig":
        if self.model is not None and self.endpoint is not None:
            raise ValueError("give 'model' or 'endpoint', not both")
        if self.suite and self.probes:
            raise ValueError("give 'suite' or 'probes', not both")
        return self


def load_run_config(path: str | Path) -> RunConfig:
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read config ({exc.strerror})", where=str(p)) from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not a text file (byte {exc.start} is not UTF-8)", where=str(p)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"not valid YAML{at} ({getattr(exc, 'problem', None) or 'unreadable'})", where=str(p)) from exc
    if not isinstance(raw, dict):
        raise InputError("the config must be a mapping of field: value", where=str(p))
    try:
        return RunConfig(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "config"
        raise InputError(f"field {field!r}: {err['msg']}", where=str(p)) from exc
