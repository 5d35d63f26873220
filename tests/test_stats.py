"""The intervals every printed score carries, against independent references."""
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from unimodal.stats import bootstrap, bootstrap_ratio, wilson


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (87, 90), (1, 1000), (500, 1000)])
def test_wilson_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-9) and hi == pytest.approx(ref.high, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_rejects_impossible_counts_and_empty_is_nan():
    with pytest.raises(ValueError):
        wilson(11, 10)
    assert all(math.isnan(x) for x in wilson(0, 0))


def test_bootstrap_mean_matches_the_normal_interval_for_many_items():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    lo, hi = bootstrap(x, n_boot=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.2 * half)
    assert bootstrap(x) == bootstrap(x)  # seeded: the same interval every time


def test_bootstrap_of_a_corpus_statistic_and_degenerate_cases():
    pairs = [(1, 2)] * 50 + [(3, 4)] * 50  # ratio of sums, not a mean of ratios
    lo, hi = bootstrap(pairs, lambda ps: sum(a for a, _ in ps) / sum(b for _, b in ps))
    assert lo < 200 / 300 < hi and 0.6 < lo and hi < 0.72
    assert bootstrap([5.0]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in bootstrap([]))


def test_bootstrap_ratio_brackets_the_ratio_of_means():
    a, b = [0.9, 0.92, 0.88], [1.0, 0.98, 1.02]
    lo, hi = bootstrap_ratio(a, b)
    assert lo < np.mean(a) / np.mean(b) < hi and hi - lo < 0.1
    assert bootstrap_ratio([1.0], [1.0]) == (1.0, 1.0)
