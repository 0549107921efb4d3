"""audit.stats against independent oracles: exact enumeration, scipy's own functions, and
simulation of the coverage / false-alarm rates the probes' findings rely on."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from audit import stats


def _exact_sign_flip(d: np.ndarray) -> float:
    d = np.atleast_2d(d)
    norms = np.sqrt((d ** 2).sum(1))
    obs = np.max(np.abs(d.sum(1)) / norms)
    hits = 0
    n = d.shape[1]
    for signs in itertools.product((1, -1), repeat=n):
        s = np.max(np.abs((d * np.array(signs)).sum(1)) / norms)
        hits += s >= obs - 1e-9 * max(1, obs)
    return hits / 2 ** n


@pytest.mark.parametrize("n,m", [(4, 1), (7, 1), (6, 2), (9, 3)])
def test_sign_flip_exact_matches_enumeration(n, m):
    rng = np.random.default_rng(n * 10 + m)
    d = rng.normal(0.4, 1.0, size=(m, n))
    assert stats.sign_flip_test(d, seed=0) == pytest.approx(_exact_sign_flip(d), abs=1e-12)


def test_sign_flip_monte_carlo_is_never_zero_and_close_to_exact_rate():
    rng = np.random.default_rng(0)
    d = rng.normal(3.0, 0.1, size=40)  # every sign the same: p tiny but not 0
    p = stats.sign_flip_test(d, n_perm=999, seed=1)
    assert p == pytest.approx(1 / 1000)


def test_sign_flip_degenerate_cases():
    assert stats.sign_flip_test(np.zeros(5)) == 1.0
    assert stats.sign_flip_test([0.7]) == 1.0 == _exact_sign_flip(np.array([0.7]))  # one set
    assert stats.within_set_permutation_test(np.array([[0.1, 0.5, 0.9]])) == 1.0
    assert np.isnan(stats.sign_flip_test([np.nan, np.nan]))


def test_within_set_two_members_equals_sign_flip():
    rng = np.random.default_rng(3)
    cube = rng.normal(size=(8, 2))
    assert stats.within_set_permutation_test(cube, seed=2) == stats.sign_flip_test(cube[:, 0] - cube[:, 1], seed=2)


def test_within_set_exact_enumeration_three_members():
    rng = np.random.default_rng(4)
    cube = rng.normal(size=(3, 3))
    cube[:, 0] += 1.0
    c = cube - cube.mean(1, keepdims=True)
    total = (c ** 2).sum()

    def stat(x):
        return ((x.mean(0)) ** 2).sum() / total

    obs = stat(c)
    perms = list(itertools.permutations(range(3)))
    hits = count = 0
    for choice in itertools.product(perms, repeat=3):
        x = np.stack([c[i, list(p)] for i, p in enumerate(choice)])
        hits += stat(x) >= obs - 1e-9 * max(1, obs)
        count += 1
    assert stats.within_set_permutation_test(cube, n_perm=10_000, seed=0) == pytest.approx(hits / count)


def test_benjamini_hochberg_matches_scipy_and_keeps_nan():
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    out = stats.benjamini_hochberg(p)
    assert np.isnan(out[2])
    ok = ~np.isnan(p)
    np.testing.assert_allclose(out[ok], sps.false_discovery_control(p[ok]))
    np.testing.assert_allclose(out[ok], [0.04, 0.05333333, 0.05333333, 0.5])


@pytest.mark.parametrize("k,n,method,low,high", [
    (0, 20, "exact", 0.0, 0.16843347), (0, 8, "exact", 0.0, 0.36941665), (20, 20, "exact", 0.83156653, 1.0),
    (0, 20, "wilson", 0.0, 0.16112516)])
def test_proportion_ci_known_values(k, n, method, low, high):
    lo, hi = stats.proportion_ci(k, n, method=method)
    assert (lo, hi) == (pytest.approx(low, abs=1e-7), pytest.approx(high, abs=1e-7))


def test_mean_ci_never_zero_width_on_small_samples():
    assert stats.mean_ci(np.zeros(20), seed=0, bounds=(0.0, 1.0)) == pytest.approx((0.0, 0.16112516))  # Wilson
    lo, hi = stats.mean_ci(np.zeros(20), seed=0, bounds=(0.0, 5.0))  # bounded scale, all at 0: exact bound
    assert lo == 0.0 and hi == pytest.approx(5 * (1 - 0.025 ** (1 / 20)))
    assert np.isnan(stats.mean_ci(np.ones(9), seed=0)[0])  # e.g. a ratio that is exactly 1 everywhere
    lo, hi = stats.mean_ci(np.ones(8) * 0.3, seed=0)  # unbounded scale, all equal: no honest interval
    assert np.isnan(lo) and np.isnan(hi)


def test_mean_ci_coverage_of_a_known_mean():
    rng = np.random.default_rng(11)
    covered = 0
    for r in range(200):
        v = rng.beta(2, 5, size=40)  # true mean 2/7
        lo, hi = stats.mean_ci(v, seed=r, n_resamples=999)
        covered += lo <= 2 / 7 <= hi
    assert covered / 200 >= 0.9


def test_group_difference_test_controls_false_alarms_and_has_power():
    rng = np.random.default_rng(5)
    groups = np.repeat([0, 1], 30)
    null_p = [stats.group_difference_test(rng.random(60) < 0.6, groups, n_perm=499, seed=i) for i in range(200)]
    assert np.mean(np.array(null_p) <= 0.05) <= 0.08
    alt = [stats.group_difference_test(np.r_[rng.random(30) < 0.9, rng.random(30) < 0.4], groups, n_perm=499, seed=i)
           for i in range(50)]
    assert np.mean(np.array(alt) <= 0.05) >= 0.9


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=3, max_size=30), st.integers(0, 1000))
def test_mean_ci_contains_the_mean_and_stays_in_bounds(values, seed):
    v = np.asarray(values)
    lo, hi = stats.mean_ci(v, seed=seed, bounds=(0.0, 1.0))
    if np.isfinite(lo):
        assert 0.0 <= lo <= hi <= 1.0
        assert lo - 1e-9 <= v.mean() <= hi + 1e-9 or np.ptp(v) > 0


def test_seed_for_is_stable():
    assert stats.seed_for(0, "a", "b") == stats.seed_for(0, "a", "b") != stats.seed_for(1, "a", "b")
    assert stats.seed_for(3, "probe") == 575687831  # the v1 value: reruns of old audits keep their seeds


def test_label_permutation_fallback_agrees_with_scipy_and_handles_singletons():
    rng = np.random.default_rng(8)
    v, g = rng.random(30), np.repeat([0, 1, 2], 10)
    p_scipy = stats.group_difference_test(v, g, n_perm=4000, seed=3)
    p_own = stats._label_permutation_test(v, g, n_perm=4000, seed=3)
    assert abs(p_scipy - p_own) < 0.03
    assert stats.group_difference_test([1.0, 0.0, 1.0], ["a", "b", "b"], seed=0) > 0.3  # a singleton group works
