"""Mean and Student-t 95% confidence interval over seeds (no SciPy needed).

For n seeds with sample standard deviation s, the interval is ``mean ± t_{0.975, n-1} · s / sqrt(n)``.
With one seed there is no interval (NaN bounds), and missing values (NaN) are left out, never counted as 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

# Two-sided 95% critical values t_{0.975, df} for df = 1..30 (standard tables).
_T975 = [
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
]
_Z975 = 1.959964


def t_critical_975(df: int) -> float:
    """t_{0.975, df}: exact table up to df = 30, Cornish-Fisher expansion beyond (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))


@dataclass(frozen=True)
class MeanCI:
    mean: float
    low: float  # NaN when n < 2
    high: float
    n: int  # finite values used


def mean_ci(values: Iterable[float]) -> MeanCI:
    """Mean and t-based 95% interval of the finite values in ``values``."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return MeanCI(math.nan, math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_critical_975(n - 1) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n)
