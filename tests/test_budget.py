"""The budget ledger and the matched baseline: counts that add up, and er_matched replays to full_cls's budget."""

from __future__ import annotations

import json

import pytest

from biollm_cls.config import load_config
from biollm_cls.train import RunError, load_sleep_plan, run_training

SMALL = [
    "benchmark.num_tasks=2", "benchmark.switch_every=30", "benchmark.heldout_size=16", "model.seq_len=16",
    "model.hidden_size=32", "model.vocab_size=32", "experts.expert_hidden=32", "train.batch_size=8",
    "train.num_threads=1", "train.progress=false", "device=cpu",
]


def _run(tmp_path, name, *overrides):
    cfg = load_config([*SMALL, *overrides, f"logging.output_dir={tmp_path / name}"])
    return run_training(cfg)


@pytest.fixture(scope="module")
def cls_and_matched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("budget")
    full = _run(tmp, "full", "ablation=full_cls")
    plan = tmp / "full" / "summary.json"
    matched = _run(tmp, "matched", "ablation=er_matched", f"consolidation.sleep_plan={plan}")
    total = _run(tmp, "total", "ablation=er_matched_total", f"consolidation.sleep_plan={plan}")
    er = _run(tmp, "er", "ablation=er")
    return full, matched, total, er


def test_full_cls_ledger_adds_up(cls_and_matched):
    full = cls_and_matched[0]
    b, steps = full["budget"], full["run"]["steps"]
    assert b["fast_optimizer_steps"] == steps  # every wake step trains the hippocampus (nothing non-finite)
    assert b["base_optimizer_steps"] == full["counters"]["base_updates_in_sleep"] == sum(s for _, s, _ in
                                                                                          full["sleep_log"])
    assert b["base_gradient_rows"] == sum(s * r for _, s, r in full["sleep_log"])
    assert b["base_gradient_rows"] == b["replayed_rows"] - (b["fast_gradient_rows"] - 8 * steps) + b["pseudo_rows"]
    assert b["forward_only_passes"] >= steps  # one post-update teacher pass per wake step, plus probes
    assert b["fisher_backwards"] > 0 and b["buffer_episodes"] > 0 and b["buffer_bytes"] > 0


def test_er_matched_sleeps_where_full_cls_slept_to_its_base_rows(cls_and_matched):
    full, matched, total, er = cls_and_matched
    assert [s for s, _, _ in matched["sleep_log"]] == [s for s, _, _ in full["sleep_log"]]
    assert [n for _, n, _ in matched["sleep_log"]] == [n for _, n, _ in full["sleep_log"]]
    target = full["budget"]["base_gradient_rows"]
    assert abs(matched["budget"]["base_gradient_rows"] - target) <= len(full["sleep_log"]) * 40  # rounding
    assert matched["budget"]["fast_optimizer_steps"] == 0 and matched["budget"]["forward_only_passes"] == 0
    target_total = target + full["budget"]["fast_gradient_rows"]
    assert abs(total["budget"]["base_gradient_rows"] - target_total) <= len(full["sleep_log"]) * 40
    assert er["budget"]["base_optimizer_steps"] == er["run"]["steps"] and er["sleep_log"] == []


def test_a_missing_or_foreign_sleep_plan_is_one_clear_error(tmp_path):
    cfg = load_config([*SMALL, "ablation=er_matched", f"consolidation.sleep_plan={tmp_path / 'nope.json'}"])
    with pytest.raises(RunError, match="no such file"):
        load_sleep_plan(cfg)
    (tmp_path / "old.json").write_text(json.dumps({"run": {}}))
    cfg.consolidation.sleep_plan = str(tmp_path / "old.json")
    with pytest.raises(RunError, match="no sleep_log"):
        load_sleep_plan(cfg)


def test_sleep_rows_log_the_pressure_the_scheduler_decided_on(tmp_path):
    """Fix: sleep_pressure was logged after mark_slept reset it, so every sleep row showed 0."""
    _run(tmp_path, "full", "ablation=full_cls", "consolidation.sleep_min_interval=5",
         "consolidation.sleep_max_interval=200", "scheduler.pressure_threshold=0.01")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").open()]
    sleeps = [r for r in rows if r["kind"] == "step" and r["sleep_steps"] > 0]
    assert sleeps, "the low threshold must trigger pressure sleeps"
    assert all(r["sleep_pressure"] >= 0.01 for r in sleeps)  # what triggered them, not the reset value


def test_a_non_finite_wake_step_stores_nothing(tmp_path):
    """Issue 11.2: the episodes of a skipped (non-finite) wake step carried NaN teachers and losses into replay."""
    import dataclasses

    import torch

    from biollm_cls.train import build_run, remember, wake_batch
    from biollm_cls.wake import wake_step

    cfg = load_config([*SMALL, "ablation=full_cls", f"logging.output_dir={tmp_path / 'run'}"])
    run = build_run(cfg)
    batch, rows, teacher = wake_batch(run, 1)
    wake = wake_step(run.learner, batch, cfg, run.ewc, rows, keep_teacher=True, replay_teacher=teacher)
    poisoned = dataclasses.replace(wake, applied=False, row_loss=torch.full_like(wake.row_loss, float("nan")))
    remember(run, batch, rows, poisoned, 1)
    assert len(run.replay) == 0 and run.state.non_finite_step_count == 1
    remember(run, batch, rows, wake, 2)
    assert len(run.replay) == rows
