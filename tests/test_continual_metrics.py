"""Continual-learning metrics on hand-computed 3x3 matrices (docs/run_outputs.md)."""

from __future__ import annotations

import math

import pytest

from biollm_cls.continual_metrics import ContinualMatrix

NAN = float("nan")
# Task 0's accuracy *rises* after task 1 (0.5 -> 0.9), so "max over earlier rows" differs from the diagonal.
ACC = [[0.5], [0.9, 0.8], [0.6, 0.4, 0.7]]
LOSS = [[1.0], [0.5, 0.7], [0.9, 1.2, 0.6]]


def matrix(acc=ACC, loss=LOSS) -> ContinualMatrix:
    m = ContinualMatrix(num_tasks=3)
    for i, (a, lo) in enumerate(zip(acc, loss, strict=True)):
        m.record(i, a, lo)
    return m


def test_seen_averages():
    m = matrix()
    assert [m.seen_acc_avg(i) for i in range(3)] == pytest.approx([0.5, 0.85, 1.7 / 3])
    assert [m.seen_loss_avg(i) for i in range(3)] == pytest.approx([1.0, 0.6, 0.9])


def test_forgetting_uses_the_max_over_earlier_rows():
    m = matrix()
    assert m.forgetting(0) == 0.0
    assert m.forgetting(1) == pytest.approx(0.5 - 0.9)  # task 0: best so far 0.5, now 0.9
    # task 0: max(0.5, 0.9) - 0.6 = 0.3 (not 0.5 - 0.6); task 1: 0.8 - 0.4 = 0.4
    assert m.forgetting(2) == pytest.approx((0.3 + 0.4) / 2)


def test_bwt():
    m = matrix()
    assert m.bwt(0) == 0.0
    assert m.bwt(1) == pytest.approx(0.9 - 0.5)
    assert m.bwt(2) == pytest.approx(((0.6 - 0.5) + (0.4 - 0.8)) / 2)


def test_plasticity_and_auc():
    m = matrix()
    assert m.plasticity() == pytest.approx((0.5 + 0.8 + 0.7) / 3)
    assert m.plasticity_upto(1) == pytest.approx((0.5 + 0.8) / 2)
    curve = [0.5, 0.85, 1.7 / 3]
    trapezoid = (curve[0] + curve[1]) / 2 + (curve[1] + curve[2]) / 2
    assert m.seen_acc_auc() == pytest.approx(trapezoid / 2)


def test_auc_of_a_single_boundary_is_its_value():
    m = ContinualMatrix(num_tasks=3)
    m.record(0, [0.42], [1.0])
    assert m.seen_acc_auc() == pytest.approx(0.42)
    assert math.isnan(ContinualMatrix(num_tasks=3).seen_acc_auc())


def test_boundary_metrics_and_summary():
    m = matrix()
    row = m.boundary_metrics(1)
    assert row == pytest.approx({"seen_acc_avg": 0.85, "seen_loss_avg": 0.6, "forgetting": -0.4, "bwt": 0.4,
                                 "plasticity": 0.65})
    s = m.summary()
    assert s["tasks_completed"] == 3 and s["uncovered_tasks"] == []
    assert s["final_seen_acc_avg"] == pytest.approx(1.7 / 3)
    assert s["final_forgetting"] == pytest.approx(0.35)
    assert s["final_bwt"] == pytest.approx(-0.15)
    assert s["final_seen_loss_avg"] == pytest.approx(0.9)
    assert ContinualMatrix(num_tasks=3).summary() == {"tasks_completed": 0}


def test_uncovered_task_is_skipped_and_listed():
    acc = [[0.5], [0.9, NAN], [0.6, NAN, 0.7]]
    loss = [[1.0], [0.5, NAN], [0.9, NAN, 0.6]]
    m = matrix(acc, loss)
    assert m.seen_acc_avg(1) == pytest.approx(0.9)  # not (0.9 + 0) / 2
    assert m.seen_acc_avg(2) == pytest.approx((0.6 + 0.7) / 2)
    assert m.seen_loss_avg(2) == pytest.approx((0.9 + 0.6) / 2)
    assert m.forgetting(2) == pytest.approx(0.9 - 0.6)  # task 1 contributes nothing
    assert m.bwt(2) == pytest.approx(0.6 - 0.5)
    assert m.plasticity() == pytest.approx((0.5 + 0.7) / 2)
    assert m.uncovered(1) == [1] and m.uncovered(2) == [1] and m.uncovered(0) == []
    assert m.summary()["uncovered_tasks"] == [1]


def test_every_task_uncovered_gives_nan_not_zero():
    m = ContinualMatrix(num_tasks=2)
    m.record(0, [NAN], [NAN])
    m.record(1, [NAN, NAN], [NAN, NAN])
    assert math.isnan(m.seen_acc_avg(1)) and math.isnan(m.forgetting(1)) and math.isnan(m.bwt(1))
    assert m.uncovered(1) == [0, 1]


def test_out_of_order_and_malformed_rows_raise():
    m = ContinualMatrix(num_tasks=3)
    with pytest.raises(ValueError, match="out of order"):
        m.record(1, [0.1, 0.2], [1.0, 1.0])
    m.record(0, [0.5], [1.0])
    with pytest.raises(ValueError, match="out of order"):
        m.record(0, [0.5], [1.0])
    with pytest.raises(ValueError, match="exactly the seen tasks"):
        m.record(1, [0.5, 0.6, 0.7], [1.0, 1.0, 1.0])
    assert len(m.acc) == 1


def test_state_dict_round_trip():
    m = matrix()
    back = ContinualMatrix.from_state_dict(m.state_dict())
    assert back.acc == m.acc and back.loss == m.loss and back.num_tasks == 3
    assert back.summary() == m.summary()
