"""The statistics of a report: a configuration's difference in top-1 from its baseline, and its
train - val gap, each with a 95% confidence interval over seeds.

Seeds are the replicates. Where the configuration and its baseline were trained with the same
seeds, the differences are paired by seed (a seed fixes the initialisation and the data order of
both, so pairing removes that shared noise) and the interval is the paired Student-t interval
of their mean; otherwise it is Welch's t interval of the difference of the two means. One seed
on either side leaves the spread unknown: the difference is given without an interval.

The train - val gap (each run's top-1 on its fixed training subset minus its validation top-1)
belongs to one configuration: its interval is the one-sample Student-t interval of the mean
gap over seeds, and again one seed gives the mean alone.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional

from scipy.stats import t  # scipy comes with scikit-learn

LEVEL = 0.95
PAIRED = "paired t"
WELCH = "Welch t"
ONE_SAMPLE = "t"
NO_INTERVAL = "one seed: no interval"

LEGEND = ("Δ top-1: mean top-1 minus the baseline's, in percentage points, with a 95% Student-t "
          "confidence interval over seeds, paired by seed where both configurations have the same "
          "seeds and Welch's otherwise; * marks intervals that exclude zero, and with one seed no "
          "interval can be given.")


@dataclass(frozen=True)
class Difference:
    """``mean`` (row minus baseline) and its interval ``[low, high]`` (NaN when none can be given)."""
    mean: float
    low: float
    high: float
    method: str
    seeds: str  # "3" (paired) or "3 vs 2" (Welch)

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def excludes_zero(self) -> bool:
        return self.has_interval and (self.low > 0 or self.high < 0)


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(t.ppf((1 + level) / 2, df))


def _finite(values: Mapping[int, float]) -> dict[int, float]:
    return {s: v for s, v in values.items() if v is not None and math.isfinite(v)}


def difference(row: Mapping[int, float], base: Mapping[int, float], level: float = LEVEL) -> Difference:
    """The difference of ``row`` from ``base``, each a mapping seed -> metric.

    Raises ``ValueError`` when either side has no finite value.
    """
    row, base = _finite(row), _finite(base)
    if not row or not base:
        raise ValueError("both sides need at least one finite value")
    mean = statistics.fmean(row.values()) - statistics.fmean(base.values())
    if set(row) == set(base) and len(row) >= 2:
        d = [row[s] - base[s] for s in sorted(row)]
        n = len(d)
        half = t_quantile(n - 1, level) * statistics.stdev(d) / math.sqrt(n)
        return Difference(mean, mean - half, mean + half, PAIRED, str(n))
    seeds = f"{len(row)} vs {len(base)}"
    if len(row) < 2 or len(base) < 2:
        return Difference(mean, math.nan, math.nan, NO_INTERVAL, seeds)
    v1 = statistics.variance(row.values()) / len(row)
    v2 = statistics.variance(base.values()) / len(base)
    se = math.sqrt(v1 + v2)
    if se == 0:  # both spreads zero: the difference is exact
        return Difference(mean, mean, mean, WELCH, seeds)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (len(row) - 1) + v2 ** 2 / (len(base) - 1))
    half = t_quantile(df, level) * se
    return Difference(mean, mean - half, mean + half, WELCH, seeds)


def mean_interval(values: Mapping[int, float], level: float = LEVEL) -> Optional[Difference]:
    """The mean of ``values`` (seed -> metric) with its one-sample Student-t interval; ``None``
    when no value is finite (the metric was not recorded)."""
    xs = list(_finite(values).values())
    if not xs:
        return None
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Difference(mean, math.nan, math.nan, NO_INTERVAL, "1")
    half = t_quantile(len(xs) - 1, level) * statistics.stdev(xs) / math.sqrt(len(xs))
    return Difference(mean, mean - half, mean + half, ONE_SAMPLE, str(len(xs)))


def format_interval(d: Optional[Difference], missing: str = "") -> str:
    """``+12.34 [+10.10, +14.58]``, or the mean alone where there is no interval; ``missing``
    for no value at all."""
    if d is None:
        return missing
    return f"{d.mean:+.2f}" + (f" [{d.low:+.2f}, {d.high:+.2f}]" if d.has_interval else "")


def format_difference(d: Difference) -> str:
    """``+1.23 [+0.40, +2.06] *`` (``*``: the interval excludes zero), or ``+1.23`` alone."""
    text = f"{d.mean:+.2f}"
    if d.has_interval:
        text += f" [{d.low:+.2f}, {d.high:+.2f}]"
        if d.excludes_zero:
            text += " *"
    return text
