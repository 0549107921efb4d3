"""`--batch-size auto`: the largest batch that fits, found the way lm-eval does it.

Start from a cap and halve on an out-of-memory error, scoring the longest prompt of the
data (with its image) so the chosen size fits every batch of the run. Endpoints batch on
the server: auto means the default there.
"""
from __future__ import annotations

from audit.adapters.base import ModelAdapter, Query
from audit.dataset import Dataset

__all__ = ["auto_batch_size", "CAP_CPU", "CAP_GPU", "DEFAULT"]

CAP_CPU = 64
CAP_GPU = 512
DEFAULT = 16


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower()


def auto_batch_size(adapter: ModelAdapter, data: Dataset, *, cap: int | None = None) -> int:
    if not adapter.capabilities.white_box:
        return DEFAULT
    candidates = [e for e in data if e.image is not None and (e.choices or e.answer)]
    if not candidates:
        return DEFAULT
    longest = max(candidates, key=lambda e: (len(e.prompt), len(e.choices or ())))
    q = Query(longest.prompt, data.image(longest), tuple(longest.choices or (longest.answer,)))
    size = cap or (CAP_GPU if str(adapter.device).startswith("cuda") else CAP_CPU)
    while size >= 1:
        try:
            adapter.score([q] * size, batch_size=size)
            return size
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are a reason to halve
            if not _is_oom(exc):
                raise
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            size //= 2
    raise MemoryError("even a batch of one does not fit in memory")
