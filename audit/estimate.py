"""How long an audit will take, before it starts.

White box: the declared forward passes of the units still to run (each probe's
`cost_of`, catalogued per probe) times the time of one plain forward pass, measured on a
full batch of distinct queries from the units' examples (the faster of two calls after a
warm-up): for a generative model `forward` on the encoded batch (so neither the
adapter's caches nor its shared-prefix scoring make the timed pass cheaper than the
passes probes run with hooks or gradients), for a dual encoder `score`. The passes a probe
declares as re-reading an image of the same unit (`Unit.shared`: text variants, shared
blank images) are priced at the time `score` takes per query for prompts on one image, so
an adapter that reuses the image prefix is not overestimated. bench/run.py
(item "estimate") checks the declarations against counted forward passes per probe and
the estimate against the actual time. Endpoints: the number of requests (no timed call:
it would cost the user a request and says little about a shared server).
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from audit.adapters.base import GenerativeWhiteBox, ModelAdapter, Query
from audit.progress import format_seconds

__all__ = ["estimate", "Estimate", "sample_queries", "seconds_per_pass"]

TIMED_CALLS = 2
# The timed calls may cost at most this share of the audit's declared passes: on a large
# model with few examples, full timing batches were half the work (bench/run.py,
# suite_standard_small). Small audits then time smaller batches (a pessimistic per-pass time).
ESTIMATE_SHARE = 0.05


class Estimate:
    def __init__(self, forward_passes: float, seconds: float | None, text: str) -> None:
        self.forward_passes = forward_passes
        self.seconds = seconds
        self.text = text


def sample_queries(tasks, n: int) -> list[Query]:
    """Up to `n` distinct scoreable queries (image, prompt, choices) from the tasks' units."""
    out, seen = [], set()
    for t in tasks:
        data = t.unit.dataset()
        for e in t.unit.examples:
            if e.image is None or not (e.choices or e.answer) or e.id in seen:
                continue
            seen.add(e.id)
            out.append(Query(e.prompt, data.image(e), tuple(e.choices or (e.answer,))))
            if len(out) == n:
                return out
    return out


def seconds_per_pass(adapter: ModelAdapter, queries: Sequence[Query], *, batch_size: int,
                     shared: bool = False) -> float:
    """Seconds of one forward pass (one query), timed on a batch of `queries` after a warm-up.
    `shared`: the queries' prompts all on the first query's image, scored as probes score
    text variants (an adapter that reuses the image prefix runs their text only)."""
    import torch

    batch = list(queries)
    while len(batch) < batch_size:  # fewer distinct examples than a batch: repeat them
        batch += list(queries)[:batch_size - len(batch)]
    batch = batch[:batch_size]
    if shared:
        batch = [Query(q.prompt, batch[0].image, q.candidates) for q in batch]
    if isinstance(adapter, GenerativeWhiteBox) and not shared:
        enc = adapter.encode(batch)

        def call():
            with torch.no_grad():
                adapter.forward(enc)
    else:
        def call():
            adapter.score(batch, batch_size=batch_size)
    call()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(TIMED_CALLS):  # the fastest: a busy moment of a shared machine is not the model's speed
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return min(times) / len(batch)


def estimate(adapter: ModelAdapter, tasks: Sequence, *, batch_size: int) -> Estimate:
    passes = float(sum(t.unit.cost for t in tasks))
    if not tasks:
        return Estimate(0.0, 0.0, "nothing left to do")
    if not adapter.capabilities.white_box:
        return Estimate(passes, None, f"about {passes:,.0f} requests to {adapter.architecture}")
    shared = min(passes, float(sum(getattr(t.unit, "shared", 0.0) for t in tasks)))
    timings = (1 + TIMED_CALLS) * (2 if shared else 1)  # warm-up and timed calls, plain and shared
    timed_batch = int(min(batch_size, max(1, ESTIMATE_SHARE * passes // timings)))
    queries = sample_queries(tasks, timed_batch)
    if not queries or passes == 0:
        return Estimate(passes, None, f"~{passes:,.0f} forward passes")
    per_pass = seconds_per_pass(adapter, queries, batch_size=timed_batch)
    per_shared = seconds_per_pass(adapter, queries, batch_size=timed_batch, shared=True) if shared else per_pass
    seconds = (passes - shared) * per_pass + shared * per_shared
    note = f" ({shared:,.0f} on an image already read, {per_shared * 1000:.1f} ms each)" if shared else ""
    return Estimate(passes, seconds, f"~{passes:,.0f} forward passes{note}, about {format_seconds(seconds)} "
                                     f"at {per_pass * 1000:.1f} ms per pass (timed on batches of {timed_batch})")
