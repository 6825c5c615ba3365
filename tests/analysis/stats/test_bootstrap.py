"""Context and cluster bootstraps against hand-written loops on the same generator and scipy.stats.bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mechicl.analysis.stats import (
    bootstrap_counts,
    bootstrap_indices,
    bootstrap_means,
    check_draws,
    cluster_counts,
    mean_ci,
    paired_test,
    ratio_ci,
)
from mechicl.errors import ConfigError


def _loop_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Brute force: one draw of n contexts at a time from the same generator, the mean of each draw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        rows = rng.integers(0, len(x), size=len(x))
        out.append(sum(x[i] for i in rows) / len(x))
    return np.array(out)


def test_mean_ci_equals_a_hand_written_bootstrap_loop():
    x = np.random.default_rng(0).normal(0.2, 1.0, size=37)
    m, lo, hi = mean_ci(x, n_boot=500, seed=3)
    ref = np.percentile(_loop_means(x, 500, 3), [2.5, 97.5])
    assert m == pytest.approx(x.mean(), rel=1e-12)
    assert (lo, hi) == pytest.approx(tuple(ref), rel=1e-12)
    assert bootstrap_means(x, n_boot=500, seed=3) == pytest.approx(_loop_means(x, 500, 3), rel=1e-12)


def test_row_by_row_draws_equal_one_draw():
    """``bootstrap_indices`` draws all rows at once; drawing them one by one from the generator gives the same
    rows (callers that refit per draw rely on it to keep their numbers)."""
    for n in (5, 8, 33):
        rng = np.random.default_rng(11)
        rows = np.stack([rng.integers(0, n, size=n) for _ in range(40)])
        assert np.array_equal(bootstrap_indices(n, 40, 11), rows)
        counts = np.stack([np.bincount(r, minlength=n) for r in rows]).astype(float)
        assert np.array_equal(bootstrap_counts(n, 40, 11), counts)


def test_mean_ci_matches_scipy_percentile_bootstrap():
    x = np.random.default_rng(1).normal(0.3, 1.0, size=200)
    m, lo, hi = mean_ci(x, n_boot=20000, seed=2)
    ref = sps.bootstrap((x,), np.mean, n_resamples=20000, method="percentile", random_state=3).confidence_interval
    assert m == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.02) and hi == pytest.approx(ref.high, abs=0.02)


def test_ratio_ci_equals_a_hand_written_loop_and_scipy():
    rng = np.random.default_rng(4)
    den = rng.uniform(0.2, 1.0, size=150)
    num = 0.4 * den + rng.normal(0, 0.1, size=150)
    est, lo, hi = ratio_ci(num, den, n_boot=400, seed=5)
    loop = _loop_means(num, 400, 5) / _loop_means(den, 400, 5)  # same seed: the same contexts in both
    assert est == pytest.approx(num.mean() / den.mean())
    assert (lo, hi) == pytest.approx(tuple(np.percentile(loop, [2.5, 97.5])), rel=1e-12)
    _, lo, hi = ratio_ci(num, den, n_boot=20000, seed=5)
    ref = sps.bootstrap(
        (num, den),
        lambda a, b: a.mean() / b.mean(),
        paired=True,
        n_resamples=20000,
        method="percentile",
        random_state=6,
    ).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.01) and hi == pytest.approx(ref.high, abs=0.01)


def test_ratio_rows_share_context_draws():
    """Leading axes are resampled with the same contexts: a row's interval equals its own bootstrap."""
    rng = np.random.default_rng(0)
    den = rng.uniform(0.5, 1, size=40)
    num = rng.normal(size=(3, 40))
    est, lo, hi = ratio_ci(num, den, seed=9)
    e1, l1, h1 = ratio_ci(num[1], den, seed=9)
    assert (float(est[1]), float(lo[1]), float(hi[1])) == pytest.approx((float(e1), float(l1), float(h1)))


def test_ratio_without_a_positive_denominator_is_nan():
    est, lo, hi = ratio_ci(np.ones(5), -np.ones(5))
    assert np.isnan(est) and np.isnan(lo) and np.isnan(hi)


def _loop_cluster_means(x: np.ndarray, clusters: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Brute force: draw as many clusters as there are (sorted ids, with replacement), pool their observations."""
    ids = np.unique(clusters)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(ids), size=len(ids))
        pooled = np.concatenate([x[clusters == ids[g]] for g in drawn])
        out.append(pooled.mean())
    return np.array(out)


def test_cluster_bootstrap_equals_a_hand_written_loop():
    rng = np.random.default_rng(5)
    clusters = rng.choice([3, 7, 8, 20, 21, 40], size=50)  # unequal cluster sizes, ids not 0..G-1
    x = rng.normal(size=50) + clusters / 10
    boot = bootstrap_means(x, n_boot=300, seed=6, clusters=clusters)
    assert boot == pytest.approx(_loop_cluster_means(x, clusters, 300, 6), rel=1e-12)
    m, lo, hi = mean_ci(x, n_boot=300, seed=6, clusters=clusters)
    assert m == pytest.approx(x.mean()) and (lo, hi) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])))


def test_singleton_clusters_are_the_context_bootstrap():
    x = np.random.default_rng(2).normal(size=30)
    assert np.allclose(
        mean_ci(x, n_boot=200, seed=1, clusters=np.arange(30) * 3), mean_ci(x, n_boot=200, seed=1), rtol=1e-12
    )
    assert np.array_equal(cluster_counts(np.arange(30), 200, 1), bootstrap_counts(30, 200, 1))


def test_cluster_bootstrap_widens_when_contexts_share_rows():
    """Contexts that share a task row share its effect: resampling contexts alone understates the spread."""
    rng = np.random.default_rng(3)
    rows = np.repeat(np.arange(8), 16)  # 8 task rows, 16 contexts each
    x = rng.normal(0, 1, 8)[rows] + rng.normal(0, 0.2, rows.size)
    _, lo_c, hi_c = mean_ci(x, n_boot=2000, seed=0, clusters=rows)
    _, lo, hi = mean_ci(x, n_boot=2000, seed=0)
    assert hi_c - lo_c > 2.5 * (hi - lo)


def test_cluster_ids_must_cover_every_observation():
    with pytest.raises(ValueError, match="one id per observation"):
        mean_ci(np.ones(5), clusters=np.arange(4))


@pytest.mark.parametrize("n_boot", [0, 1, 19, 2.5])
def test_degenerate_draw_counts_are_config_errors(n_boot):
    """Issue 30: n_boot = 1 gave a CI [0.469, 0.469] that excluded its own estimate 0.481."""
    x = np.random.default_rng(0).normal(size=20)
    with pytest.raises(ConfigError, match=r"n_boot = .*use n_boot >= 20"):
        mean_ci(x, n_boot=n_boot)
    with pytest.raises(ConfigError, match="n_boot"):
        ratio_ci(x, np.ones(20), n_boot=n_boot)
    with pytest.raises(ConfigError, match="n_boot"):
        paired_test(x, x[::-1], n_boot=n_boot)
    with pytest.raises(ConfigError, match="--n-boot"):
        check_draws(n_boot, "--n-boot")
    assert check_draws(20) == 20
