"""The probe protocol, work units and the probe registry.

A probe is stateless between its verbs (configuration passed to the constructor is not
state):

    plan(adapter, data, *, max_examples=None) -> Plan     what to do: self-contained units
    run(adapter, unit, *, seed) -> rows                    one unit -> long-form rows
    summarize(rows, *, seed) -> metrics                    rows of every unit -> metric rows
    findings(metrics) -> [finding]                         metric rows -> warnings / fails

A `Unit` carries its examples and whatever else `run` needs (`params`), so it can be
pickled to another process (the Ray executor) and resumed alone. The runner derives each
unit's seed from (run seed, probe, unit index), never from order or time.

Probes are found through the catalog (`audit.catalog`, which names each built-in probe's
module, imported only when the probe is asked for) and through the `mmaudit.probes`
entry-point group for third-party packages: an entry point names a Probe subclass whose
`spec` is its catalog entry.
"""
from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from audit.adapters.base import ModelAdapter
from audit.catalog import ProbeSpec, all_specs, register_spec, spec_of, suite_probes
from audit.dataset import Dataset, Example
from audit.errors import InputError
from audit.schema import METRIC_COLUMNS, ROW_COLUMNS, metrics_frame, rows_frame

__all__ = ["Probe", "Plan", "Unit", "register", "get_probe", "probe_class", "available", "resolve_names",
           "ROW_COLUMNS", "METRIC_COLUMNS", "rows_frame", "metrics_frame", "finding", "ENTRY_POINT_GROUP",
           "ERR_EXTRA"]

ENTRY_POINT_GROUP = "mmaudit.probes"
DUPLICATE = "a probe named {name!r} is already registered"
UNKNOWN = "unknown probe {name!r}; available: {names}"
ERR_EXTRA = "probe {name!r} needs {missing}: install it with pip install 'mmaudit[{extra}]'"


def finding(probe: str, severity: str, message: str) -> dict:
    if severity not in ("info", "warning", "fail"):
        raise ValueError(f"unknown severity {severity!r}")
    return {"probe": probe, "severity": severity, "message": message}


@dataclass(frozen=True)
class Unit:
    """One resumable, self-contained piece of a probe's work."""

    probe: str
    index: int
    examples: tuple[Example, ...]
    data_root: str
    max_image_pixels: int = 4096 * 4096
    params: Mapping[str, Any] = field(default_factory=dict)
    cost: float = 0.0  # declared forward passes
    shared: float = 0.0  # of those, passes that re-read an image another pass of the unit reads first

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", dict(self.params))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.examples)

    def dataset(self) -> Dataset:
        """The unit's examples as a Dataset (images read from `data_root`, cached per process)."""
        return Dataset.view(self.data_root, self.examples, max_image_pixels=self.max_image_pixels)


@dataclass(frozen=True)
class Plan:
    """A probe's units plus what planning found (e.g. incomplete sets, a skipped attack)."""

    probe: str
    units: tuple[Unit, ...] = ()
    findings: tuple[dict, ...] = ()
    skipped: tuple[str, ...] = ()  # reasons the probe cannot run at all (then `units` is empty)
    n_selected: int | None = None  # examples that fit the probe before --max-examples cut them

    @property
    def n_examples(self) -> int:
        return sum(len(u.examples) for u in self.units)

    @property
    def cost(self) -> float:
        return sum(u.cost for u in self.units)

    @property
    def shared(self) -> float:
        return sum(u.shared for u in self.units)


class Probe(ABC):
    """Base class of every probe; `spec` is its catalog entry."""

    spec: ProbeSpec
    unit_size: int = 32  # examples per resumable work unit

    def __init__(self, *, batch_size: int = 16) -> None:
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}", where="--batch-size")
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        return self.spec.name

    # ------------------------------------------------------------------ planning
    def check(self, adapter: ModelAdapter) -> list[str]:
        """Reasons this probe cannot run on `adapter` (empty when it can), from the spec."""
        caps, spec, problems = adapter.capabilities, self.spec, []
        if caps.kind not in spec.kinds:
            problems.append(f"{spec.name} does not apply to {caps.kind.replace('_', ' ')} models")
        missing = [flag for flag in spec.needs if not getattr(caps, flag, False)]
        if missing and not problems:
            what = "white-box access" if "white_box" in missing else " and ".join(missing)
            if missing == ["logprobs"]:
                what = "log-probabilities of the choices (generate mode only gives the chosen answer)"
            problems.append(f"{spec.name} needs {what}; this adapter ({adapter.architecture}) does not provide it")
        if spec.fusions and caps.fusion not in spec.fusions and not problems:
            problems.append(f"{spec.name} needs image tokens in the sequence ({'/'.join(spec.fusions)} fusion); "
                            f"this model fuses the image by {caps.fusion.replace('_', '-')}")
        return problems

    def select(self, data: Dataset) -> list[Example]:
        """The examples this probe audits (default: scoreable, non-canary, with an image), in order."""
        return list(data.select(predicate=lambda e: e.image is not None and bool(e.choices or e.answer),
                                exclude_tags=("canary",)))

    def cost_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        """Declared forward passes for these examples (cost_per_example by default)."""
        return float(self.cost_per_example(adapter)) * len(examples)

    def cost_per_example(self, adapter: ModelAdapter) -> float:
        return 1.0

    def shared_of(self, adapter: ModelAdapter, examples: Sequence[Example]) -> float:
        """How many of `cost_of`'s passes score an image that an earlier query of the same call
        already scores (text variants, shared blank images): an adapter that reuses the image
        prefix runs only their text (audit.estimate prices them apart). Default: none."""
        return 0.0

    def plan(self, adapter: ModelAdapter, data: Dataset, *, max_examples: int | None = None) -> Plan:
        problems = self.check(adapter)
        if problems:
            return Plan(self.name, skipped=tuple(problems))
        examples = self.select(data)
        selected = len(examples)
        if max_examples is not None:
            examples = examples[:max_examples]
        return Plan(self.name, units=self.chunk(adapter, data, examples), n_selected=selected)

    def chunk(self, adapter: ModelAdapter, data: Dataset, examples: Sequence[Example], *,
              size: int | None = None, params: Mapping | None = None) -> tuple[Unit, ...]:
        size = size or self.unit_size
        return tuple(
            Unit(self.name, k, tuple(examples[i:i + size]), str(data.path), data.max_image_pixels,
                 dict(params or {}), self.cost_of(adapter, examples[i:i + size]),
                 self.shared_of(adapter, examples[i:i + size]))
            for k, i in enumerate(range(0, len(examples), size)))

    # ------------------------------------------------------------------ execution
    @abstractmethod
    def run(self, adapter: ModelAdapter, unit: Unit, *, seed: int) -> pd.DataFrame:
        """Long-form rows (audit.schema.ROW_COLUMNS) for the unit's examples."""

    @abstractmethod
    def summarize(self, rows: pd.DataFrame, *, seed: int) -> pd.DataFrame:
        """Metric rows (audit.schema.METRIC_COLUMNS) from the rows of every unit."""

    def findings(self, metrics: pd.DataFrame) -> list[dict]:
        """Warnings and failures the metrics support (each from a test with a stated error rate)."""
        return []


# ---------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Probe]] = {}
_PLUGINS_LOADED = False


def register(cls: type[Probe]) -> type[Probe]:
    """Class decorator; raises on a duplicate name (like Opacus' registries). A built-in
    class gets its catalog spec; a plugin class must carry its own `spec`."""
    if not isinstance(getattr(cls, "spec", None), ProbeSpec):
        raise TypeError(f"{cls.__name__} has no `spec` (a ProbeSpec)")
    name = cls.spec.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(DUPLICATE.format(name=name))
    register_spec(cls.spec)
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    from audit.plugins import entry_points

    for ep in entry_points(ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must name itself, not kill the run
            raise InputError(f"the probe plugin {ep.value!r} failed to import ({type(exc).__name__}: {exc})",
                             where=f"entry point {ENTRY_POINT_GROUP}:{ep.name}") from exc
        if cls.spec.name not in _REGISTRY:
            register(cls)


def available() -> dict[str, ProbeSpec]:
    """Every known probe's spec: built-ins and installed plugins (nothing heavy is imported)."""
    _load_plugins()
    return all_specs()


def probe_class(name: str) -> type[Probe]:
    """The class of probe `name`, importing its module now (fails with the extra to install)."""
    specs = available()
    if name not in specs:
        raise InputError(UNKNOWN.format(name=name, names=", ".join(sorted(specs))), where="--probes")
    if name not in _REGISTRY:
        spec = specs[name]
        missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise InputError(ERR_EXTRA.format(name=name, missing=", ".join(missing), extra=spec.extra or "all"),
                             where="--probes")
        module, _, _cls = spec.module.partition(":")
        importlib.import_module(module)  # the module's @register adds the class
        if name not in _REGISTRY:
            raise RuntimeError(f"module {module} did not register probe {name!r}")
    return _REGISTRY[name]


def get_probe(name: str, **options) -> Probe:
    return probe_class(name)(**options)


def resolve_names(*, suite: str | None = None, probes: str | Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """(probe names to run, duplicate names that were dropped), validated against the catalog."""
    if probes:
        raw = [p.strip() for p in (probes.split(",") if isinstance(probes, str) else probes) if p.strip()]
        specs = available()
        unknown = [p for p in raw if p not in specs]
        if unknown:
            raise InputError(f"unknown probe(s) {', '.join(unknown)}; available: {', '.join(sorted(specs))}",
                             where="--probes")
        names, dupes = [], []
        for p in raw:
            (dupes if p in names else names).append(p)
        return names, dupes
    if not suite:
        raise InputError("give --suite or --probes", where="mmaudit run")
    _load_plugins()
    try:
        return list(suite_probes(suite)), []
    except KeyError as exc:
        raise InputError(str(exc.args[0]), where="--suite") from None

