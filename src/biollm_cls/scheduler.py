"""Sleep pressure: when to consolidate, and for how long.

Three signals, each in [0, 1] so the weights mean what they say:

* **saturation** — the fraction of experts whose capacity score (load + drift from init) exceeds
  ``experts.saturation_threshold``: the hippocampus is running out of fresh capacity.
* **novelty** — how different this batch is from recent experience: the total-variation distance between
  this batch's expert-routing shares and their running average (it rises again at every distribution shift,
  unlike the reference's "experts never used before", which stays 0 once all were used), or, without a
  hippocampus, the relative rise of the batch loss over its running average.
* **forgetting** — on a replay probe of *seen, non-current* tasks: the mean rise of the system's loss over
  the loss it had when each episode was experienced, divided by ``scheduler.forgetting_scale`` and clipped.

Pressure integrates the weighted sum: ``p <- d * p + (1 - d) * (w_s s + w_f f + w_n n) / (w_s + w_f + w_n)``.
Sleep happens when ``pressure >= threshold`` after ``sleep_min_interval`` steps, and always after
``sleep_max_interval``; its length grows with pressure from ``min_sleep_steps`` to ``max_sleep_steps``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from biollm_cls.config.schema import ConsolidationConfig, SchedulerConfig


@dataclass
class PressureSignals:
    saturation: float = 0.0
    novelty: float = 0.0
    forgetting: float = 0.0


class SleepScheduler:
    def __init__(self, cfg: SchedulerConfig, consolidation: ConsolidationConfig):
        self.cfg = cfg
        self.min_interval, self.max_interval = consolidation.sleep_min_interval, consolidation.sleep_max_interval
        self.min_steps, self.max_steps = consolidation.min_sleep_steps, consolidation.max_sleep_steps
        self.pressure = 0.0
        self.last_sleep_step = 0
        self.signals = PressureSignals()

    def update(self, signals: PressureSignals) -> float:
        c = self.cfg
        weights = c.saturation_weight + c.forgetting_weight + c.novelty_weight
        raw = (c.saturation_weight * signals.saturation + c.forgetting_weight * signals.forgetting
               + c.novelty_weight * signals.novelty) / max(weights, 1e-12)
        self.pressure = c.pressure_decay * self.pressure + (1.0 - c.pressure_decay) * raw
        self.signals = signals
        return self.pressure

    def should_sleep(self, step: int) -> bool:
        since = step - self.last_sleep_step
        if since >= self.max_interval:
            return True
        if since < self.min_interval:
            return False
        return self.pressure >= self.cfg.pressure_threshold

    def recommended_steps(self) -> int:
        if self.max_steps <= self.min_steps:
            return self.min_steps
        fraction = min(1.0, self.pressure / max(self.cfg.pressure_threshold, 1e-12))
        return self.min_steps + round(fraction * (self.max_steps - self.min_steps))

    def mark_slept(self, step: int) -> None:
        self.last_sleep_step = step
        self.pressure = 0.0

    def state_dict(self) -> dict:
        return {"pressure": self.pressure, "last_sleep_step": self.last_sleep_step, "signals": asdict(self.signals)}

    def load_state_dict(self, state: dict) -> None:
        self.pressure, self.last_sleep_step = state["pressure"], state["last_sleep_step"]
        self.signals = PressureSignals(**state["signals"])


def clip01(x: float) -> float:
    return 0.0 if x != x else min(1.0, max(0.0, x))  # NaN -> 0
