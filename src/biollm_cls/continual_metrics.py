"""Continual-learning metrics on the accuracy and loss matrices of one view.

Row ``i`` of ``A`` (accuracy) and ``L`` (loss) is the evaluation at the boundary after task ``i`` (training
order); column ``j`` is task ``j``. Only seen tasks (``j <= i``) are ever evaluated or used: a future task
never enters an "old task" signal. Definitions (Lopez-Paz & Ranzato, 2017; Chaudhry et al., 2018):

* ``seen_acc_avg_i  = mean_{j<=i} A[i][j]`` and ``seen_loss_avg_i = mean_{j<=i} L[i][j]``
* ``forgetting_i    = mean_{j<i} (max_{j<=k<i} A[k][j] - A[i][j])``  (0 when i = 0)
* ``bwt_i           = mean_{j<i} (A[i][j] - A[j][j])``                (0 when i = 0)
* ``plasticity      = mean_i A[i][i]``
* ``seen_acc_auc    = trapezoid(seen_acc_avg_0..n-1) / (n - 1)``      (the single value when n = 1)

A task with no held-out tokens is recorded as NaN ("uncovered"), is skipped by every mean and is listed,
never scored as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class ContinualMatrix:
    """Accuracy and loss matrices of one view, filled one boundary row at a time."""

    num_tasks: int
    acc: list[list[float]] = field(default_factory=list)
    loss: list[list[float]] = field(default_factory=list)

    def record(self, boundary_index: int, acc_row: list[float], loss_row: list[float]) -> None:
        """Add row `boundary_index` (must be the next one) with one value per seen task 0..boundary_index."""
        if boundary_index != len(self.acc):
            raise ValueError(f"boundary {boundary_index} recorded out of order (expected {len(self.acc)})")
        if len(acc_row) != boundary_index + 1 or len(loss_row) != boundary_index + 1:
            raise ValueError("a boundary row must hold exactly the seen tasks 0..boundary_index")
        self.acc.append([float(v) for v in acc_row])
        self.loss.append([float(v) for v in loss_row])

    def seen_acc_avg(self, i: int) -> float:
        return _nanmean(self.acc[i][: i + 1])

    def seen_loss_avg(self, i: int) -> float:
        return _nanmean(self.loss[i][: i + 1])

    def forgetting(self, i: int) -> float:
        if i == 0:
            return 0.0
        drops = []
        for j in range(i):
            best = [self.acc[k][j] for k in range(j, i) if not math.isnan(self.acc[k][j])]
            if best and not math.isnan(self.acc[i][j]):
                drops.append(max(best) - self.acc[i][j])
        return float(np.mean(drops)) if drops else float("nan")

    def bwt(self, i: int) -> float:
        if i == 0:
            return 0.0
        return _nanmean([self.acc[i][j] - self.acc[j][j] for j in range(i)])

    def plasticity(self) -> float:
        return _nanmean([self.acc[i][i] for i in range(len(self.acc))])

    def seen_acc_auc(self) -> float:
        curve = [self.seen_acc_avg(i) for i in range(len(self.acc))]
        if not curve:
            return float("nan")
        if len(curve) == 1:
            return curve[0]
        return float(np.trapezoid(curve, dx=1.0) / (len(curve) - 1))

    def uncovered(self, i: int) -> list[int]:
        return [j for j in range(i + 1) if math.isnan(self.acc[i][j])]

    def boundary_metrics(self, i: int) -> dict[str, float]:
        return {
            "seen_acc_avg": self.seen_acc_avg(i),
            "seen_loss_avg": self.seen_loss_avg(i),
            "forgetting": self.forgetting(i),
            "bwt": self.bwt(i),
            "plasticity": self.plasticity_upto(i),
        }

    def plasticity_upto(self, i: int) -> float:
        return _nanmean([self.acc[k][k] for k in range(i + 1)])

    def summary(self) -> dict[str, float | int | list[int]]:
        last = len(self.acc) - 1
        if last < 0:
            return {"tasks_completed": 0}
        return {
            "final_seen_acc_avg": self.seen_acc_avg(last),
            "final_seen_loss_avg": self.seen_loss_avg(last),
            "final_forgetting": self.forgetting(last),
            "final_bwt": self.bwt(last),
            "seen_acc_auc": self.seen_acc_auc(),
            "plasticity": self.plasticity(),
            "tasks_completed": last + 1,
            "uncovered_tasks": self.uncovered(last),
        }

    def state_dict(self) -> dict:
        return {"num_tasks": self.num_tasks, "acc": self.acc, "loss": self.loss}

    @classmethod
    def from_state_dict(cls, state: dict) -> ContinualMatrix:
        return cls(num_tasks=state["num_tasks"], acc=state["acc"], loss=state["loss"])
