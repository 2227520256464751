"""Mean and 95% t-interval over seeds."""

import math

import pytest

from biollm_cls.suite.stats import mean_ci, t_critical_975


def test_t_critical_values():
    assert t_critical_975(1) == pytest.approx(12.7062)
    assert t_critical_975(2) == pytest.approx(4.3027)
    assert t_critical_975(40) == pytest.approx(2.0211, abs=2e-4)
    assert t_critical_975(120) == pytest.approx(1.9799, abs=2e-4)
    with pytest.raises(ValueError):
        t_critical_975(0)


def test_mean_ci_three_seeds():
    ci = mean_ci([1.0, 2.0, 3.0])  # sd = 1
    assert ci.mean == 2.0 and ci.n == 3
    half = 4.3027 / math.sqrt(3)
    assert ci.low == pytest.approx(2.0 - half) and ci.high == pytest.approx(2.0 + half)


def test_mean_ci_skips_missing_and_has_no_interval_for_one_value():
    ci = mean_ci([0.5, float("nan"), None])
    assert ci.mean == 0.5 and ci.n == 1 and math.isnan(ci.low) and math.isnan(ci.high)
    assert mean_ci([]).n == 0 and math.isnan(mean_ci([]).mean)
