"""Small, seeded statistics shared by the fairness and safety probes.

- `sign_flip_test`: two-sided paired permutation test of mean differences (exact when the
  2^n sign patterns fit in the permutation budget, Monte-Carlo with the +1 correction
  otherwise, so p is never 0); several differences per set are combined by the maximum
  of their studentised sums, which keeps the test exact.
- `within_set_permutation_test`: the same idea for sets of k > 2 members (labels permuted
  inside each set; statistic = between-label sum of squares of the column means). For
  k = 2 it is the sign-flip test.
- `benjamini_hochberg`: step-up FDR-adjusted p-values (NaN kept as NaN).
- `bootstrap_stat`: percentile bootstrap of any statistic of resampled row indices.
- `seed_for`: a stable integer seed from a run seed and labels (never Python's `hash`).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

__all__ = ["sign_flip_test", "within_set_permutation_test", "benjamini_hochberg",
           "bootstrap_stat", "seed_for"]

_CHUNK = 512  # permutations evaluated per block (bounds memory for many sets)


def seed_for(seed: int, *labels: str) -> int:
    """A 32-bit seed derived from `seed` and string labels (stable across processes)."""
    h = zlib.crc32(str(int(seed)).encode())
    for label in labels:
        h = zlib.crc32(label.encode(), h)
    return int(h)


def _at_least(stats: np.ndarray, observed: float) -> np.ndarray:
    # Relative tolerance so that sign patterns giving the same statistic up to rounding count.
    return stats >= observed - 1e-9 * max(1.0, abs(observed))


def _studentised(sums: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """max over statistics j of |sum_j| / norm_j (norm_j = sqrt(sum of squares), 0 -> ignored)."""
    safe = np.where(norms > 0, norms, 1.0)
    return np.max(np.where(norms > 0, np.abs(sums) / safe, 0.0), axis=-1)


def sign_flip_test(diffs, *, n_perm: int = 2000, seed: int = 0) -> float:
    """Two-sided p-value of H0 "every set's paired differences are symmetric around 0".

    `diffs` is (n,) - one difference per set - or (m, n) - m differences per set that all
    change sign together when the set's two labels are swapped. Statistic:
    max_j |Σ_s d_js| / sqrt(Σ_s d_js²) (for one row: equivalent to |mean(d)|, because the
    denominator is the same for every sign pattern). The null flips each set's sign
    independently. Sets with a NaN are dropped; no set left gives NaN; all-zero gives 1.
    """
    d = np.atleast_2d(np.asarray(diffs, dtype=np.float64))
    d = d[:, np.all(np.isfinite(d), axis=0)]
    n = d.shape[1]
    if n == 0:
        return float("nan")
    norms = np.sqrt((d ** 2).sum(axis=1))
    observed = float(_studentised(d.sum(axis=1), norms))
    if observed == 0.0:
        return 1.0
    if n <= 20 and 2 ** n <= n_perm:  # exact: every sign pattern once
        bits = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1
        stats = _studentised((1 - 2 * bits) @ d.T, norms)
        return float(_at_least(stats, observed).mean())
    rng = np.random.default_rng(seed)
    hits, done = 0, 0
    while done < n_perm:
        b = min(_CHUNK, n_perm - done)
        signs = rng.integers(0, 2, size=(b, n)) * 2 - 1
        hits += int(_at_least(_studentised(signs @ d.T, norms), observed).sum())
        done += b
    return (hits + 1) / (n_perm + 1)


def within_set_permutation_test(cube, *, n_perm: int = 2000, seed: int = 0) -> float:
    """p-value of H0 "member labels are exchangeable inside each set".

    `cube` is (n_sets, k) or (m, n_sets, k): m scores per member that move together when
    labels are permuted. Statistic per score: Σ_labels (column mean)² of the row-centred
    matrix divided by its total sum of squares (fixed under permutation); the maximum
    over scores is compared with the null that permutes every set's labels. For k = 2 this
    is `sign_flip_test` of the differences.
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

    def stat(x):  # x: (..., m, n, k)
        between = (x.mean(axis=-2) ** 2).sum(axis=-1)
        return _studentised(between, total)

    observed = float(stat(c))
    if observed == 0.0:
        return 1.0
    rng = np.random.default_rng(seed)
    m, n, k = c.shape
    hits, done = 0, 0
    while done < n_perm:
        b = min(max(1, _CHUNK * 8 // max(n * m, 1)), n_perm - done)
        order = rng.random((b, 1, n, k)).argsort(axis=3)
        permuted = np.take_along_axis(np.broadcast_to(c, (b, m, n, k)), np.broadcast_to(order, (b, m, n, k)), axis=3)
        hits += int(_at_least(stat(permuted), observed).sum())
        done += b
    return (hits + 1) / (n_perm + 1)


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (step-up, monotone, capped at 1; NaN stays)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = ok.size
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out[order] = np.minimum(adjusted, 1.0)
    return out


def bootstrap_stat(n: int, statistic: Callable[[np.ndarray], float], *, seed: int,
                   n_boot: int = 1000, level: float = 0.95):
    """Percentile interval of `statistic(indices)` over `n_boot` resamples of range(n).

    A statistic may return one number (-> (low, high) floats) or a vector (-> two arrays,
    one interval per component). Resamples where a component is NaN are skipped for it.
    """
    if n == 0 or n_boot <= 0:
        first = np.asarray(statistic(np.arange(n)) if n else np.nan, dtype=np.float64)
        nan = np.full(first.shape, np.nan)
        return (float("nan"), float("nan")) if first.ndim == 0 else (nan, nan.copy())
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
