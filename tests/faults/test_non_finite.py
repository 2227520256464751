"""NaN/Inf injected into one wake step and into one sleep update: counted, nothing kept from it, the run completes.

Each case runs the tiny run in-process through the CLI with one non-finite fault armed (``fault_driver.py``:
``nonfinite_wake`` puts the value into the hidden state entering the hippocampus at one wake step, so that
step's routing, usage statistics, delta, loss and post-update teacher are all non-finite; ``nonfinite_sleep``
puts it into the base's logits of one consolidation update). The step and the update are drawn with
``random.Random(BIOLLM_FAULT_SEED + 1)`` (default seed 11; they are in the test ids). Each run must:

* complete (exit 0, summary.json) with every other step applied: the skipped step must not poison what follows
  (the hippocampus's usage statistics, the routing averages, the scheduler's signals);
* count the fault: ``non_finite_step_count`` / ``first_non_finite_step`` (wake) or
  ``non_finite_sleep_step_count`` (sleep) in the step rows and in summary.json;
* keep nothing from it: no episode of that step in replay (the memory was offered exactly the other steps'
  rows), no non-finite teacher or wake loss in replay, no non-finite weight, optimizer moment, Fisher or
  scheduler value in the final checkpoint, no NaN sleep loss in the metrics;
* match the uninterrupted run exactly up to the faulty step.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import fault_driver
import pytest
import torch
from faultkit import SLEEP_UPDATES, STEPS, run_cli

from biollm_cls.checkpoint import list_checkpoints, load_checkpoint

SEED = int(os.environ.get("BIOLLM_FAULT_SEED", "11"))
_rng = random.Random(SEED + 1)
WAKE_STEP = _rng.randint(2, STEPS - 1)
SLEEP_CALL = _rng.randint(1, SLEEP_UPDATES)
BATCH = 4  # train.batch_size of the tiny run: the new rows of one step
VALUES = ("nan", "inf")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def faulty_run(tmp_path: Path, fault: dict, monkeypatch) -> tuple[Path, dict, dict]:
    fault_driver.install(fault, patch=monkeypatch.setattr)
    out = tmp_path / "run"
    assert run_cli(out) == 0
    monkeypatch.undo()
    summary = json.loads((out / "summary.json").read_text())
    state = load_checkpoint(list_checkpoints(out)[-1], "cpu")
    assert state["step"] == STEPS
    return out, summary, state


def _non_finite(obj, where: str = "") -> list[str]:
    """Paths of every non-finite float or float tensor inside `obj`."""
    if torch.is_tensor(obj):
        return [where] if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _non_finite(v, f"{where}/{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _non_finite(v, f"{where}[{i}]")]
    return []


def assert_nothing_non_finite_kept(state: dict) -> None:
    kept = {name: state[name] for name in ("neocortex", "base_optimizer", "hippocampus", "fast_optimizer", "replay",
                                           "ewc", "scheduler")}
    run_state = state["run_state"]
    kept["run_state"] = {k: run_state[k] for k in ("routing_ema", "routing_fast", "loss_ema", "forgetting_signal")}
    assert _non_finite(kept) == []


def assert_same_rows_before(out: Path, reference: Path, step: int) -> None:
    got = [r for r in rows(out) if r.get("step", 0) < step and r["kind"] != "summary"]
    want = [r for r in rows(reference) if r.get("step", 0) < step and r["kind"] != "summary"]
    assert got == want, f"the rows before step {step} differ from the uninterrupted run"


@pytest.mark.parametrize("value", VALUES, ids=[f"wake-step{WAKE_STEP}-{v}" for v in VALUES])
def test_non_finite_wake_step(value, reference, tmp_path, monkeypatch):
    step = WAKE_STEP
    out, summary, state = faulty_run(tmp_path, {"point": "nonfinite_wake", "step": step, "value": value},
                                     monkeypatch)
    counters = summary["counters"]
    assert (counters["non_finite_step_count"], counters["first_non_finite_step"]) == (1, step)
    assert counters["non_finite_sleep_step_count"] == 0
    steps = {r["step"]: r for r in rows(out) if r["kind"] == "step"}
    assert len(steps) == STEPS
    bad = steps[step]
    assert bad["task_loss"] is None  # NaN/Inf is written as null, never as a number
    assert (bad["fast_update_applied"], bad["replay_added_this_step"], bad["non_finite_step_count"]) == (0, 0, 1)
    # every other step learned: the skipped one left no NaN in the usage statistics or the routing averages
    assert [s for s, r in steps.items() if s != step and r["fast_update_applied"] != 1] == []
    assert all(r["task_loss"] is not None for s, r in steps.items() if s != step)
    # nothing of that step was stored: replay was offered exactly the other steps' new rows
    replay = state["replay"]
    assert replay["seen"] + len(replay.get("staged", [])) == BATCH * (STEPS - 1)
    assert not [e for e in replay["episodes"] + replay.get("staged", []) if e["step"] == step]
    assert_nothing_non_finite_kept(state)
    assert all(v is not None for view in summary["views"].values() for v in view.values())
    assert_same_rows_before(out, reference, step)


def _sleep_step_of_update(reference: Path, call: int) -> int:
    """The wake step whose sleep makes the `call`-th consolidation update of the uninterrupted run."""
    done = 0
    for r in rows(reference):
        if r["kind"] == "step" and r["sleep_steps"]:
            done += r["sleep_steps"]
            if done >= call:
                return r["step"]
    raise AssertionError(f"the uninterrupted run makes fewer than {call} consolidation updates")


@pytest.mark.parametrize("value", VALUES, ids=[f"sleep-update{SLEEP_CALL}-{v}" for v in VALUES])
def test_non_finite_sleep_update(value, reference, tmp_path, monkeypatch):
    out, summary, state = faulty_run(tmp_path, {"point": "nonfinite_sleep", "call": SLEEP_CALL, "value": value},
                                     monkeypatch)
    counters = summary["counters"]
    assert counters["non_finite_sleep_step_count"] == 1
    assert counters["base_updates_in_sleep"] == SLEEP_UPDATES - 1
    assert (counters["non_finite_step_count"], counters["first_non_finite_step"]) == (0, -1)
    sleep_step = _sleep_step_of_update(reference, SLEEP_CALL)
    slept = [r for r in rows(out) if r["kind"] == "step" and (r["sleep_steps"] or r["skipped_steps"])]
    assert [(r["step"], r["skipped_steps"]) for r in slept if r["skipped_steps"]] == [(sleep_step, 1)]
    assert slept[-1]["non_finite_sleep_step_count"] == 1
    # the skipped update adds no NaN to the cycle's logged losses (they average the applied updates)
    for r in slept:
        assert all(r[k] is not None and math.isfinite(r[k]) for k in ("distill_loss", "distill_kl", "target_ce")), r
    assert sum(b for _, b, _ in summary["sleep_log"]) == SLEEP_UPDATES - 1
    assert_nothing_non_finite_kept(state)
    assert all(v is not None for view in summary["views"].values() for v in view.values())
    assert_same_rows_before(out, reference, sleep_step)

