"""The budget ledger: what a run spent, counted the same way for the learner and every baseline.

Comparisons between continual learners are only fair at a matched budget (Prabhu et al., CVPR 2023: under a
fixed compute budget plain replay is hard to beat). Every run counts, and writes to summary.json:

* optimizer steps of the fast learner (hippocampus) and of the base, and the rows in each one's gradients;
* replayed rows (replay episodes in any gradient, wake or sleep) and pseudo-rehearsal rows;
* forward-only passes outside boundary evaluation (post-update teachers, pseudo teachers, probes, refresh)
  and the per-sequence backwards of the EWC Fisher;
* the episodic buffer at the end (episodes, bytes including stored teachers).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class BudgetLedger:
    fast_optimizer_steps: int = 0
    base_optimizer_steps: int = 0
    fast_gradient_rows: int = 0
    base_gradient_rows: int = 0
    replayed_rows: int = 0
    pseudo_rows: int = 0
    forward_only_passes: int = 0
    fisher_backwards: int = 0
    buffer_episodes: int = 0
    buffer_bytes: int = 0

    def add_wake(self, rows: int, replay_rows: int, fast: bool, base: bool, forward_passes: int) -> None:
        """One applied wake update on `rows` rows (`replay_rows` of them replayed)."""
        self.fast_optimizer_steps += int(fast)
        self.fast_gradient_rows += rows if fast else 0
        self.base_optimizer_steps += int(base)
        self.base_gradient_rows += rows if base else 0
        self.replayed_rows += replay_rows if (fast or base) else 0
        self.forward_only_passes += forward_passes

    def add_sleep(self, steps: int, replay_rows: int, pseudo_rows: int, forward_passes: int, fisher_backwards: int,
                  hippocampal_steps: int = 0, hippocampal_rows: int = 0) -> None:
        self.base_optimizer_steps += steps
        self.base_gradient_rows += replay_rows + pseudo_rows
        self.replayed_rows += replay_rows
        self.pseudo_rows += pseudo_rows
        self.forward_only_passes += forward_passes
        self.fisher_backwards += fisher_backwards
        self.fast_optimizer_steps += hippocampal_steps
        self.fast_gradient_rows += hippocampal_rows

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
