"""Progress of an audit weighted by each unit's declared cost (forward passes), so the
remaining-time estimate does not swing when cheap and expensive units alternate."""
from __future__ import annotations

import sys
import time
from collections.abc import Sequence

__all__ = ["CostProgress", "format_seconds"]


def format_seconds(s: float) -> str:
    if s != s or s < 0:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


class CostProgress:
    def __init__(self, tasks: Sequence, *, enabled: bool = True, stream=None) -> None:
        self.total = sum(max(float(t.unit.cost), 1.0) for t in tasks)
        self.n_units = len(tasks)
        self.enabled = enabled and self.n_units > 0
        self.stream = stream or sys.stderr
        self.done_cost = 0.0
        self.done_units = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> "CostProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled and self.done_units and self.stream.isatty():
            self._print(final=True)

    def done(self, task) -> None:
        self.done_cost += max(float(task.unit.cost), 1.0)
        self.done_units += 1
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 2.0 or self.done_units == self.n_units):
            self._last = now
            self._print()

    def _print(self, *, final: bool = False) -> None:
        elapsed = time.perf_counter() - self.t0
        frac = self.done_cost / self.total if self.total else 1.0
        eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
        end = "\n" if final or not self.stream.isatty() else "\r"
        self.stream.write(f"audit: {self.done_units}/{self.n_units} units, {frac:6.1%} of the work, "
                          f"{format_seconds(elapsed)} elapsed, ~{format_seconds(eta)} left   {end}")
        self.stream.flush()
