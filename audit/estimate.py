"""How long an audit will take, before it starts.

White box: the declared forward passes of the units still to run (each probe's
`cost_of`, catalogued per probe) times the time of one forward, measured once on a
full batch of the first unit's first example after a warm-up call. Endpoints: the number
of requests (no timed call: it would cost the user a request and says little about a
shared server).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from audit.adapters.base import ModelAdapter, Query
from audit.progress import format_seconds

__all__ = ["estimate", "Estimate"]


class Estimate:
    def __init__(self, forward_passes: float, seconds: float | None, text: str) -> None:
        self.forward_passes = forward_passes
        self.seconds = seconds
        self.text = text


def _first_query(tasks) -> Query | None:
    for t in tasks:
        data = t.unit.dataset()
        for e in t.unit.examples:
            if e.image is not None and (e.choices or e.answer):
                return Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,)))
    return None


def estimate(adapter: ModelAdapter, tasks: Sequence, *, batch_size: int) -> Estimate:
    passes = float(sum(t.unit.cost for t in tasks))
    if not tasks:
        return Estimate(0.0, 0.0, "nothing left to do")
    if not adapter.capabilities.white_box:
        return Estimate(passes, None, f"about {passes:,.0f} requests to {adapter.architecture}")
    q = _first_query(tasks)
    if q is None or passes == 0:
        return Estimate(passes, None, f"~{passes:,.0f} forward passes")
    batch = [q] * batch_size
    adapter.score(batch[:1], batch_size=1)  # warm-up (allocations, lazy init)
    t0 = time.perf_counter()
    adapter.score(batch, batch_size=batch_size)
    per_pass = (time.perf_counter() - t0) / batch_size
    seconds = passes * per_pass
    return Estimate(passes, seconds, f"~{passes:,.0f} forward passes, about {format_seconds(seconds)} "
                                     f"at {per_pass * 1000:.1f} ms per pass (batch {batch_size})")
