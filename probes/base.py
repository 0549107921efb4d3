"""The probe protocol and registry.

A probe has metadata (`ProbeInfo`), a `check` that lists what it cannot do on a given
adapter, and one verb, `run(adapter, data, *, seed) -> rows`, returning a long-form frame.
`summarize(rows, *, seed)` turns the rows of all work units into metric rows with
confidence intervals. The runner splits `select(data)` into work units so that an
interrupted audit recomputes only unfinished units.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pandas as pd

from audit.adapters.base import ModelAdapter
from audit.dataset import Dataset

__all__ = ["ProbeInfo", "Probe", "register", "get_probe", "available", "SUITES", "ROW_COLUMNS",
           "METRIC_COLUMNS", "bootstrap_ci", "rows_frame"]

ROW_COLUMNS = ["probe", "metric", "value", "example_id", "group", "site", "variant"]
METRIC_COLUMNS = ["probe", "metric", "value", "ci_low", "ci_high", "group", "n"]
DUPLICATE = "a probe named {name!r} is already registered"
UNKNOWN = "unknown probe {name!r}; available: {names}"


@dataclass(frozen=True)
class ProbeInfo:
    name: str
    category: str  # "interpretability" | "fairness" | "safety" | "privacy"
    description: str
    citation: str
    cost_per_example: float  # forward passes per audited example
    needs_white_box: bool = False
    kinds: tuple[str, ...] = ("generative", "dual_encoder")
    metrics: tuple[str, ...] = ()


class Probe(ABC):
    info: ProbeInfo
    unit_size: int = 32  # examples per resumable work unit

    def check(self, adapter: ModelAdapter) -> list[str]:
        """Reasons this probe cannot run on `adapter` (empty when it can)."""
        problems = []
        if self.info.needs_white_box and not adapter.capabilities.white_box:
            problems.append(f"{self.info.name} needs white-box access (hooks or gradients); an endpoint cannot provide it")
        if adapter.capabilities.kind not in self.info.kinds:
            problems.append(f"{self.info.name} does not apply to {adapter.capabilities.kind} models")
        return problems

    def select(self, data: Dataset) -> Dataset:
        """The examples this probe audits (default: scoreable, non-canary, with an image)."""
        return data.select(predicate=lambda e: e.image is not None and bool(e.choices or e.answer),
                           exclude_tags=("canary",))

    @abstractmethod
    def run(self, adapter: ModelAdapter, data: Dataset, *, seed: int) -> pd.DataFrame:
        """Long-form rows (ROW_COLUMNS) for the examples in `data`."""

    @abstractmethod
    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        """Metric rows (METRIC_COLUMNS) from the rows of every unit."""


_REGISTRY: dict[str, type[Probe]] = {}

# Suites are lists of probe names; a name not yet registered is skipped with a finding.
SUITES: dict[str, tuple[str, ...]] = {
    "quick": ("modality_ablation",),
    "standard": ("modality_ablation", "attention", "counterfactual_bias", "group_fairness",
                 "hallucination", "typographic_attack"),
    "full": ("modality_ablation", "attention", "attention_knockout", "mm_shap", "attribution",
             "activation_patching", "counterfactual_bias", "group_fairness", "retrieval_skew", "hallucination",
             "typographic_attack", "robustness", "privacy_audit"),
}


def register(cls: type[Probe]) -> type[Probe]:
    """Class decorator; raises on a duplicate name (like Opacus' registries)."""
    name = cls.info.name
    if name in _REGISTRY:
        raise ValueError(DUPLICATE.format(name=name))
    _REGISTRY[name] = cls
    return cls


def _load_builtin() -> None:
    """Import every module of the `probes` package once; each registers its probe."""
    import importlib
    import pkgutil

    import probes

    for mod in pkgutil.iter_modules(probes.__path__):
        if not mod.name.startswith("_") and mod.name != "base":
            importlib.import_module(f"probes.{mod.name}")


def available() -> dict[str, type[Probe]]:
    _load_builtin()
    return dict(_REGISTRY)


def get_probe(name: str) -> Probe:
    registry = available()
    if name not in registry:
        raise KeyError(UNKNOWN.format(name=name, names=", ".join(sorted(registry))))
    return registry[name]()


def rows_frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=ROW_COLUMNS)
    return frame.astype({"value": "float64"})


def bootstrap_ci(values, *, seed: int, n_boot: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reruns agree exactly)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (float("nan"), float("nan"))
    if v.size == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
