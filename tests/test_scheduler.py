"""Sleep pressure: EMA of the normalised weighted signals, interval rules, sleep length, state."""

from __future__ import annotations

import pytest

from biollm_cls.config.schema import ConsolidationConfig, SchedulerConfig
from biollm_cls.scheduler import PressureSignals, SleepScheduler, clip01


def make(**kw) -> SleepScheduler:
    cons = ConsolidationConfig(sleep_min_interval=10, sleep_max_interval=50, min_sleep_steps=10, max_sleep_steps=40)
    return SleepScheduler(SchedulerConfig(**kw), cons)


def test_pressure_is_an_ema_of_the_weighted_signals():
    s = make(saturation_weight=0.4, forgetting_weight=0.4, novelty_weight=0.2, pressure_decay=0.9)
    # raw = 0.4*1 + 0.4*0.25 + 0.2*0.5 = 0.6 -> p = 0.1 * 0.6
    assert s.update(PressureSignals(saturation=1.0, novelty=0.5, forgetting=0.25)) == pytest.approx(0.06)
    # raw = 0.4*0.5 = 0.2 -> p = 0.9*0.06 + 0.1*0.2
    assert s.update(PressureSignals(saturation=0.5)) == pytest.approx(0.074)
    assert s.pressure == pytest.approx(0.074)
    assert s.signals == PressureSignals(saturation=0.5)


def test_pressure_normalises_by_the_weight_sum():
    s = make(saturation_weight=2.0, forgetting_weight=1.0, novelty_weight=1.0, pressure_decay=0.5)
    assert s.update(PressureSignals(saturation=1.0)) == pytest.approx(0.5 * 2.0 / 4.0)
    t = make(saturation_weight=2.0, forgetting_weight=1.0, novelty_weight=1.0, pressure_decay=0.0)
    assert t.update(PressureSignals(1.0, 1.0, 1.0)) == pytest.approx(1.0)  # all signals full -> pressure 1


def test_constant_signals_converge_to_their_weighted_mean():
    s = make(pressure_decay=0.5)
    for _ in range(60):
        s.update(PressureSignals(saturation=0.5, novelty=0.5, forgetting=0.5))
    assert s.pressure == pytest.approx(0.5)


def test_min_and_max_interval_rules():
    s = make(pressure_threshold=0.5)
    s.pressure = 0.9
    assert not s.should_sleep(9)  # high pressure, but before sleep_min_interval
    assert s.should_sleep(10)
    s.pressure = 0.1
    assert not s.should_sleep(49)
    assert s.should_sleep(50)  # always after sleep_max_interval
    s.pressure = 0.5
    assert s.should_sleep(10)  # threshold is inclusive
    s.mark_slept(100)
    assert s.pressure == 0.0 and s.last_sleep_step == 100
    s.pressure = 0.9
    assert not s.should_sleep(109) and s.should_sleep(110)
    s.pressure = 0.0
    assert not s.should_sleep(149) and s.should_sleep(150)


def test_recommended_steps_monotone_and_bounded():
    s = make(pressure_threshold=0.5)
    expected = {0.0: 10, 0.25: 25, 0.5: 40, 1.0: 40}
    for p, n in expected.items():
        s.pressure = p
        assert s.recommended_steps() == n
    steps = []
    for i in range(101):
        s.pressure = i / 100
        steps.append(s.recommended_steps())
    assert steps == sorted(steps) and min(steps) == 10 and max(steps) == 40
    flat = SleepScheduler(SchedulerConfig(), ConsolidationConfig(min_sleep_steps=7, max_sleep_steps=7))
    flat.pressure = 1.0
    assert flat.recommended_steps() == 7


def test_state_dict_round_trip():
    s = make()
    s.update(PressureSignals(0.3, 0.2, 0.1))
    s.mark_slept(12)
    s.update(PressureSignals(0.9, 0.8, 0.7))
    other = make()
    other.load_state_dict(s.state_dict())
    assert (other.pressure, other.last_sleep_step, other.signals) == (s.pressure, 12, PressureSignals(0.9, 0.8, 0.7))
    assert other.update(PressureSignals(1, 1, 1)) == s.update(PressureSignals(1, 1, 1))


def test_clip01():
    assert clip01(float("nan")) == 0.0
    assert clip01(-0.5) == 0.0 and clip01(1.7) == 1.0 and clip01(0.25) == 0.25


def test_a_non_finite_forgetting_probe_is_no_reading(tiny_cfg, tmp_path):
    """Issue 11.2: a NaN probe loss went through clip01 and became a forgetting signal of 0.0 ("nothing is
    forgotten"), which lowers the sleep pressure; it must leave the last reading in place instead."""
    import math

    from biollm_cls.train import build_run, pressure_signals, remember, wake_batch
    from biollm_cls.wake import wake_step

    cfg = tiny_cfg
    cfg.logging.output_dir = str(tmp_path / "run")
    cfg.scheduler.probe_interval = 1  # every step probes
    run = build_run(cfg)
    steps = cfg.benchmark.switch_every  # task 0, then one step of task 1
    for step in range(1, steps + 2):
        batch, rows, teacher = wake_batch(run, step)
        wake = wake_step(run.learner, batch, cfg, run.ewc, rows, keep_teacher=False, replay_teacher=teacher)
        remember(run, batch, rows, wake, step)
    task = 1
    signals = pressure_signals(run, wake, steps + 1, task)  # a real reading on task-0 episodes
    assert math.isfinite(signals.forgetting) and math.isfinite(run.state.old_task_loss)
    run.state.forgetting_signal = 0.4  # the last reading, as a value the probe cannot produce by chance
    real_logits = run.learner.logits
    run.learner.logits = lambda hidden: real_logits(hidden) * float("nan")  # the system's output is NaN
    try:
        signals = pressure_signals(run, wake, steps + 2, task)
    finally:
        del run.learner.logits
    assert signals.forgetting == 0.4, "a NaN probe must not read as 'nothing forgotten'"
    assert run.state.forgetting_signal == 0.4 and run.scheduler.signals.forgetting == 0.4
    assert math.isfinite(run.scheduler.pressure)
