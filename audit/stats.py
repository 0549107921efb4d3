"""Intervals and tests shared by the probes, built on `scipy.stats`.

- `proportion_ci`: Wilson (default) or Clopper-Pearson ("exact") interval of k/n
  (`scipy.stats.binomtest(...).proportion_ci`); never zero width: 0/20 -> [0, 0.161] (Wilson).
- `mean_ci`: interval of a mean. 0/1 data on the unit scale (bounds=(0, 1)) ->
  `proportion_ci`; values on a bounded scale that all sit at one end (a blind model's image
  reliance: every value 0) -> the exact bound P(value > 0) <= Clopper-Pearson upper limit,
  times the scale's width; otherwise a seeded BCa bootstrap (`scipy.stats.bootstrap`).
  Every value equal on an unbounded scale has no honest interval: (nan, nan).
- `sign_flip_test`: paired permutation test of one or several differences per set
  (`scipy.stats.permutation_test`, permutation_type="samples"; exact when the 2^n sign
  patterns fit the budget, Monte Carlo with the +1 correction otherwise, so p is never 0).
- `within_set_permutation_test`: the same for sets of k > 2 members (labels permuted
  inside each set).
- `group_difference_test`: are k independent groups' means equal? Permutation of the group
  labels with statistic max - min of the group means (the signed, valid test behind a
  "difference" warning; a percentile bootstrap of max - min almost never covers 0).
- `benjamini_hochberg`: `scipy.stats.false_discovery_control` over the finite p-values.
- `bootstrap_stat`: percentile bootstrap of an arbitrary statistic of resampled row indices,
  for statistics scipy cannot vectorise (fairness ratios, rankings).
- `seed_for`: a stable 32-bit seed from a run seed and labels (never Python's `hash`).
"""
from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = ["LEVEL", "proportion_ci", "mean_ci", "sign_flip_test", "within_set_permutation_test",
           "group_difference_test", "benjamini_hochberg", "bootstrap_stat", "seed_for"]

LEVEL = 0.95
N_RESAMPLES = 2000
NAN2 = (float("nan"), float("nan"))


def seed_for(seed: int, *labels: str) -> int:
    """A 32-bit seed derived from `seed` and string labels (stable across processes)."""
    h = zlib.crc32(str(int(seed)).encode())
    for label in labels:
        h = zlib.crc32(str(label).encode(), h)
    return int(h)


def proportion_ci(k: int, n: int, *, level: float = LEVEL, method: str = "wilson") -> tuple[float, float]:
    """Interval for a binomial proportion k/n ("wilson" or "exact" = Clopper-Pearson)."""
    if n <= 0:
        return NAN2
    return _proportion_ci(int(k), int(n), float(level), method)


@functools.lru_cache(maxsize=65536)
def _proportion_ci(k: int, n: int, level: float, method: str) -> tuple[float, float]:
    # binomtest builds a full result object (~5 ms); fairness summaries ask for the same k/n often
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method=method)
    return (float(ci.low), float(ci.high))


def _bounded_degenerate(v: np.ndarray, bounds, level: float) -> tuple[float, float] | None:
    lo, hi = bounds
    width = hi - lo
    if not np.isfinite(width) or width <= 0:
        return None
    # Every value at one end of [lo, hi]: the mean is at most width * P(value away from that end),
    # and that probability's exact upper limit after 0 of n is 1 - (alpha/2)^(1/n).
    upper = proportion_ci(0, v.size, level=level, method="exact")[1] * width
    if v[0] == lo:
        return (float(lo), float(lo + upper))
    if v[0] == hi:
        return (float(hi - upper), float(hi))
    return None


def mean_ci(values, *, seed: int, level: float = LEVEL, bounds: tuple[float, float] | None = None,
            n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Interval of the mean of `values` (NaNs dropped); see the module docstring."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return NAN2
    unit_scale = bounds is not None and tuple(bounds) == (0.0, 1.0)
    if unit_scale and np.all((v == 0) | (v == 1)):
        return proportion_ci(int(v.sum()), v.size, level=level)  # a proportion: Wilson
    if np.all(v == v[0]):
        got = _bounded_degenerate(v, bounds, level) if bounds is not None else None
        return got if got is not None else NAN2
    if v.size < 3:
        return NAN2
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on near-degenerate resamples; percentile is the fallback
        res = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=n_resamples, method="BCa",
                              random_state=rng, vectorized=True)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            res = stats.bootstrap((v,), np.mean, confidence_level=level, n_resamples=n_resamples,
                                  method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return (lo, hi)


def _studentised(sums: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """max over statistics j of |sum_j| / norm_j (norm_j = 0 -> ignored)."""
    safe = np.where(norms > 0, norms, 1.0)
    return np.max(np.where(norms > 0, np.abs(sums) / safe, 0.0), axis=-1)


def sign_flip_test(diffs, *, n_perm: int = N_RESAMPLES, seed: int = 0) -> float:
    """Two-sided p-value of H0 "every set's paired differences are symmetric around 0".

    `diffs` is (n,) - one difference per set - or (m, n) - m differences per set that all
    change sign together when the set's labels are swapped. Statistic
    max_j |sum_s d_js| / sqrt(sum_s d_js^2) (fixed denominators, so for one row it is
    |mean(d)| up to a constant). Sets with a NaN are dropped; none left gives NaN; all-zero
    differences give 1.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    d = d[:, np.all(np.isfinite(d), axis=0)]
    if d.shape[1] == 0:
        return float("nan")
    norms = np.sqrt((d ** 2).sum(axis=1))
    if not np.any(norms > 0) or d.shape[1] < 2:  # one set: both sign patterns give the same |statistic|
        return 1.0

    def statistic(x, y, axis):
        return _studentised(np.sum(x - y, axis=axis), norms)

    res = stats.permutation_test((d / 2, -d / 2), statistic, permutation_type="samples", vectorized=True,
                                 n_resamples=n_perm, alternative="greater", axis=-1,
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def within_set_permutation_test(cube, *, n_perm: int = N_RESAMPLES, seed: int = 0) -> float:
    """p-value of H0 "member labels are exchangeable inside each set".

    `cube` is (n_sets, k) or (m, n_sets, k): m scores per member that move together when
    labels are permuted. Statistic per score: sum over labels of the squared column means
    of the row-centred matrix, over its total sum of squares; max over scores. For k = 2
    this is `sign_flip_test` of the differences.
    """
    c = np.asarray(cube, dtype=np.float64)
    c = c[None] if c.ndim == 2 else c
    if c.ndim != 3 or c.shape[2] < 2:
        return float("nan")
    c = c[:, np.all(np.isfinite(c), axis=(0, 2))]
    if c.shape[1] == 0:
        return float("nan")
    if c.shape[2] == 2:
        return sign_flip_test(c[:, :, 0] - c[:, :, 1], n_perm=n_perm, seed=seed)
    c = c - c.mean(axis=2, keepdims=True)
    total = (c ** 2).sum(axis=(1, 2))
    if not np.any(total > 0) or c.shape[1] < 2:  # one set: every relabelling has the same statistic
        return 1.0

    def statistic(*cols, axis):  # each col: (..., m, n_sets) - one label's scores
        between = sum(np.mean(col, axis=axis) ** 2 for col in cols)
        return _studentised(between, total)

    samples = tuple(c[:, :, j] for j in range(c.shape[2]))
    res = stats.permutation_test(samples, statistic, permutation_type="samples", vectorized=True,
                                 n_resamples=n_perm, alternative="greater", axis=-1,
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def group_difference_test(values, groups, *, n_perm: int = N_RESAMPLES, seed: int = 0) -> float:
    """p-value of H0 "the groups' values are exchangeable" with statistic max - min of group means."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups)
    keys = [k for k in np.unique(g)]
    samples = tuple(v[g == k] for k in keys)
    if len(samples) < 2 or any(s.size == 0 for s in samples):
        return float("nan")
    if any(s.size < 2 for s in samples):  # scipy wants two per group; permute the labels here instead
        return _label_permutation_test(v, np.unique(g, return_inverse=True)[1], n_perm=n_perm, seed=seed)
    if np.all(v == v[0]):
        return 1.0

    def statistic(*xs, axis):
        means = np.stack([np.mean(x, axis=axis) for x in xs])
        return means.max(axis=0) - means.min(axis=0)

    res = stats.permutation_test(samples, statistic, permutation_type="independent", vectorized=True,
                                 n_resamples=n_perm, alternative="greater", axis=-1,
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


def _label_permutation_test(v: np.ndarray, codes: np.ndarray, *, n_perm: int, seed: int) -> float:
    """Monte Carlo permutation of group labels, statistic max - min of the group means."""
    k = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=k)

    def spread(c):  # c: (..., n) label codes
        sums = np.stack([np.where(c == j, v, 0.0).sum(-1) for j in range(k)])
        means = sums / counts[:, None] if sums.ndim == 2 else sums / counts
        return means.max(0) - means.min(0)

    observed = float(spread(codes))
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, v.size)), axis=1)
    stats_ = spread(codes[perms])
    hits = int(np.sum(stats_ >= observed - 1e-12 * max(1.0, abs(observed))))
    return (hits + 1) / (n_perm + 1)


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over the finite entries (NaN stays NaN)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def bootstrap_stat(n: int, statistic: Callable[[np.ndarray], float], *, seed: int,
                   n_boot: int = 1000, level: float = LEVEL):
    """Percentile interval of `statistic(indices)` over `n_boot` resamples of range(n).

    A statistic may return one number (-> (low, high) floats) or a vector (-> two arrays,
    one interval per component). Resamples where a component is NaN are skipped for it.
    """
    if n == 0 or n_boot <= 0:
        first = np.asarray(statistic(np.arange(n)) if n else np.nan, dtype=np.float64)
        nan = np.full(first.shape, np.nan)
        return NAN2 if first.ndim == 0 else (nan, nan.copy())
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(n_boot)], dtype=np.float64)
    alpha = (1 - level) / 2
    cols = values.reshape(n_boot, -1)
    lo, hi = np.full(cols.shape[1], np.nan), np.full(cols.shape[1], np.nan)
    for j in range(cols.shape[1]):
        v = cols[:, j][np.isfinite(cols[:, j])]
        if v.size:
            lo[j], hi[j] = np.quantile(v, alpha), np.quantile(v, 1 - alpha)
    if values.ndim == 1:
        return (float(lo[0]), float(hi[0]))
    return lo, hi
