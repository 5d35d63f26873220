"""Intervals for the numbers the project prints: every score comes with n and a 95% interval.

- ``wilson(k, n)``: the Wilson score interval of a proportion (accuracies, exact matches).
  Unlike the normal approximation it stays inside [0, 1] and is honest at k = 0 or k = n.
- ``bootstrap(values, stat)``: a percentile bootstrap over items (samples, episodes, seeds)
  for any statistic of them: a mean, chrF over a corpus, a ratio of sums. The resampling is
  seeded, so the same inputs always give the same interval.
- ``bootstrap_ratio(a, b)``: the interval of mean(a) / mean(b) resampling both independently
  (e.g. generalist over specialist across seeds).
- ``stratified_mean(parts)``: the mean of several groups' means (a family's tasks), resampling
  within each group.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
N_BOOT = 1000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials (NaN, NaN for n = 0).

    >>> [round(x, 4) for x in wilson(8, 10)]
    [0.4902, 0.9433]
    """
    if n <= 0:
        return (math.nan, math.nan)
    if not 0 <= k <= n:
        raise ValueError(f"wilson: k = {k} is not within 0..{n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or k = n one end is exactly 0 or 1; rounding must not put it outside
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def bootstrap(items: Sequence, stat: Callable[[list], float] | None = None, n_boot: int = N_BOOT,
              seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(items)`` (default: the mean), resampling the
    items with replacement ``n_boot`` times. NaN, NaN for no items; one item gives (x, x)."""
    items = list(items)
    n = len(items)
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if stat is None:
        arr = np.asarray(items, dtype=np.float64)
        values = arr[idx].mean(axis=1)
    else:
        values = np.array([stat([items[i] for i in row]) for row in idx], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return (math.nan, math.nan)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def bootstrap_ratio(a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(a) / mean(b), resampling a and b independently (e.g. the seeds of
    two arms). Resamples whose denominator is <= 0 are dropped."""
    a, b = np.asarray(list(a), np.float64), np.asarray(list(b), np.float64)
    if not len(a) or not len(b):
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    mb = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    ok = mb > 0
    if not ok.any():
        return (math.nan, math.nan)
    r = ma[ok] / mb[ok]
    lo, hi = np.quantile(r, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


def stratified_mean(parts: Sequence[Sequence[float]], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, int, tuple[float, float]]:
    """The mean of the parts' means, with a percentile bootstrap interval that resamples the
    items within each part (the tasks stay fixed, their episodes or samples vary)."""
    rng = np.random.default_rng(seed)
    arrs = [np.asarray(g, np.float64) for g in parts]
    means = [a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1) for a in arrs]  # each (n_boot,)
    lo, hi = np.quantile(np.mean(means, axis=0), [0.025, 0.975])
    return float(np.mean([a.mean() for a in arrs])), sum(map(len, arrs)), (float(lo), float(hi))
