"""Executors run planned work units and hand each result back to the runner.

`LocalExecutor` runs them in this process, in plan order. `audit.executors.ray_executor`
(the `ray` extra) spreads them over Ray actors that each hold a model replica. Either way
only the runner writes files and the store, and the numbers cannot differ: a unit's
result depends only on the unit and its seed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd

__all__ = ["Task", "LocalExecutor", "OnResult"]


@dataclass(frozen=True)
class Task:
    """One unit to run: the probe's name and options, the unit, its seed (all picklable)."""

    probe: str
    unit: object  # probes.base.Unit
    seed: int
    options: dict = field(default_factory=dict)
    log_samples: bool = False  # record every scored query (rows.attrs["samples"], audit.samples)


OnResult = Callable[[Task, "pd.DataFrame | None", "BaseException | None"], None]


def run_task(adapter, task: Task) -> pd.DataFrame:
    """The unit's rows; with `log_samples`, its transcript rides along in `rows.attrs["samples"]`
    (pandas keeps attrs when a frame is pickled, so it crosses process boundaries too)."""
    from probes.base import get_probe

    from audit.adapters.generate_mode import GenerateModeAdapter

    probe = get_probe(task.probe, **task.options)
    # generate mode counts answers read / not parsed; no other adapter declares them
    counting = isinstance(adapter, GenerateModeAdapter)
    read0, failed0 = (adapter.answers_read, adapter.parse_failures) if counting else (0, 0)
    if task.log_samples:
        from audit.samples import recording, samples_frame

        wrapped, records = recording(adapter, probe=task.probe)
        rows = probe.run(wrapped, task.unit, seed=task.seed)
        rows.attrs["samples"] = samples_frame(records)
    else:
        rows = probe.run(adapter, task.unit, seed=task.seed)
    if counting:
        rows.attrs["answers"] = (adapter.answers_read - read0, adapter.parse_failures - failed0)
    return rows


class LocalExecutor:
    """Units one after another in this process; progress weighted by declared cost."""

    def __init__(self, adapter) -> None:
        self.adapter = adapter

    def run(self, tasks: Sequence[Task], *, on_result: OnResult, progress: bool = True) -> None:
        from audit.progress import CostProgress

        with CostProgress(tasks, enabled=progress) as bar:
            for task in tasks:
                try:
                    rows = run_task(self.adapter, task)
                except (KeyboardInterrupt, MemoryError):
                    raise
                except Exception as exc:  # noqa: BLE001 - the runner decides what an error means
                    on_result(task, None, exc)
                else:
                    on_result(task, rows, None)
                bar.done(task)
