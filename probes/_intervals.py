"""Percentile bootstrap intervals of vectorised statistics.

`audit.stats.bootstrap_stat` calls a Python statistic once per resample; for statistics
that numpy can evaluate on every resample at once (counts, means, ranks), the probes draw
the same resamples here — one (n_boot, n) draw equals bootstrap_stat's n_boot draws of n
from the same seed — and take the same quantiles, so the intervals are bootstrap_stat's
to the last bit (tests/test_safety_probes.py, tests/test_interp_probes.py).
"""
from __future__ import annotations

import numpy as np

from audit.stats import LEVEL

__all__ = ["resamples", "percentile_interval"]


def resamples(n: int, *, seed: int, n_boot: int = 1000) -> np.ndarray:
    """Row indices of every resample, shape (n_boot, n): bootstrap_stat's draws."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(values: np.ndarray, *, level: float = LEVEL) -> tuple[float, float]:
    """bootstrap_stat's interval from the statistic of every resample (NaN resamples skipped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    alpha = (1 - level) / 2
    return (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha)))
