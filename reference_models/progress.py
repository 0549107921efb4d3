"""Training progress with a time estimate measured on the run's own first steps.

The first step is left out of the measurement (it allocates and warms caches); once
`CALIBRATE` more steps are timed, one line states the remaining time, then a status line
follows as the run goes (rewritten in place on a terminal, every ~10% otherwise), each
with the estimate recomputed from every timed step so far.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

from audit.progress import format_seconds

__all__ = ["TrainProgress", "CALIBRATE"]

CALIBRATE = 5  # timed steps behind the first estimate


class TrainProgress:
    def __init__(self, total: int, *, done: int = 0, desc: str = "train", enabled: bool = True, stream=None,
                 on_estimate: Callable[[float, float], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        """`on_estimate(seconds_left, seconds_per_step)` is called once, with the first estimate."""
        self.total, self.done, self.desc = total, done, desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.on_estimate = on_estimate
        self.clock = clock
        self._started = False
        self._timed = 0
        self._timed_s = 0.0
        self._last = clock()
        self._printed = 0.0
        self._next_frac = 0.1
        self.estimated_s: float | None = None

    @property
    def per_step(self) -> float | None:
        return self._timed_s / self._timed if self._timed else None

    def left_s(self) -> float | None:
        return self.per_step * (self.total - self.done) if self._timed else None

    def update(self, loss: float | None = None) -> None:
        now = self.clock()
        if self._started:  # the first step paid for allocation and warm-up: not timed
            self._timed += 1
            self._timed_s += now - self._last
        self._started = True
        self._last = now
        self.done += 1
        if self._timed == CALIBRATE and self.estimated_s is None:
            self.estimated_s = self.left_s()
            if self.enabled:
                self._line(f"{self.desc}: {self.total} steps, about {format_seconds(self.estimated_s)} left "
                           f"(measured on {CALIBRATE} steps at {self.per_step:.2f} s/step; updated below)", final=True)
            if self.on_estimate:
                self.on_estimate(self.estimated_s, self.per_step)
        elif self.enabled and self._timed > CALIBRATE:
            self._status(now, loss)

    def _status(self, now: float, loss: float | None) -> None:
        frac = self.done / self.total
        tty = self.stream.isatty()
        if tty and now - self._printed < 1.0 and self.done < self.total:
            return
        if not tty and frac < self._next_frac and self.done < self.total:
            return
        self._next_frac = (int(frac * 10) + 1) / 10
        self._printed = now
        text = f"{self.desc}: {self.done}/{self.total} steps ({frac:.0%}), ~{format_seconds(self.left_s())} left"
        self._line(text + (f", loss {loss:.3f}" if loss is not None else ""), final=not tty or self.done == self.total)

    def _line(self, text: str, *, final: bool) -> None:
        if self.stream.isatty():
            self.stream.write(f"\r{text:<78}" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.stream.isatty() and self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()
