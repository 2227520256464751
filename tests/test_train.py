"""Integration: short toy runs through the real loop (CPU), with pinned expectations.

These check that learning is real (the system view learns each task far above chance), that sleep
moves knowledge into the base, that outputs are complete, that runs are reproducible, and that a
killed run resumes to the same summary as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import biollm_cls.train as train_module
from biollm_cls.config import load_config
from biollm_cls.train import RunError, run_training

# 3 conflicting toy tasks x 60 steps on a 32-wide, 4-layer model: ~4 s per run on one CPU thread.
SMALL = [
    "benchmark.num_tasks=3", "benchmark.switch_every=60", "benchmark.heldout_size=32",
    "model.seq_len=16", "model.hidden_size=32", "model.vocab_size=32", "experts.expert_hidden=64",
    "train.num_threads=1", "train.progress=false", "device=cpu",
]
CHANCE = 1.0 / (32 - 3)  # content tokens after the 3 cue ids


def _run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    out = tmp_path / name
    cfg = load_config([*SMALL, *overrides, f"logging.output_dir={out}"])
    return run_training(cfg), out


def _matrix(out: Path) -> dict[tuple[str, int, int], float]:
    with (out / "task_matrix.csv").open() as f:
        return {(r["view"], int(r["boundary_index"]), int(r["task_id"])): float(r["token_acc"])
                for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def no_sleep_run(tmp_path_factory) -> tuple[dict, Path]:
    return _run(tmp_path_factory.mktemp("runs"), "no_sleep", "ablation=no_sleep")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[dict, Path]:
    return _run(tmp_path_factory.mktemp("runs"), "full", "ablation=full_cls",
                "consolidation.target_ce_weight=1.0", "logging.checkpoint_interval=30")


def test_system_view_learns_every_task_far_above_chance(no_sleep_run):
    summary, out = no_sleep_run
    acc = _matrix(out)
    for task in range(3):
        assert acc[("system", task, task)] >= 0.8, f"task {task} right after training"
    assert summary["views"]["system"]["plasticity"] >= 0.8
    assert summary["views"]["system"]["final_forgetting"] > 0.5  # the tasks conflict: forgetting is real


def test_base_view_never_moves_without_sleep(no_sleep_run):
    summary, out = no_sleep_run
    acc = _matrix(out)
    for task in range(3):
        first = acc[("base", task, task)]
        assert all(acc[("base", b, task)] == first for b in range(task, 3))
        assert first < 4 * CHANCE
    assert summary["counters"]["sleep_count"] == 0
    assert summary["counters"]["base_updates_in_sleep"] == 0


def test_sleep_consolidates_into_the_base(full_run):
    summary, out = full_run
    acc = _matrix(out)
    assert summary["counters"]["sleep_count"] >= 1
    assert summary["counters"]["base_updates_in_sleep"] > 0
    # tasks 0 and 1 were learned by the hippocampus and slept on: the base alone now knows them
    assert max(acc[("base", 2, 0)], acc[("base", 2, 1)]) > 10 * CHANCE
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    sleeps = [r for r in rows if r["kind"] == "step" and r["sleep_steps"] > 0]
    # (the KL to the stored teachers is not asserted to fall: with ground-truth CE beside it, sleep may move
    # the base away from a teacher that was wrong; what consolidation must do is checked above and below)
    assert sleeps and all(r["target_ce"] > 0 for r in sleeps)
    assert summary["views"]["base"]["final_seen_acc_avg"] > 10 * CHANCE
    assert 0 < summary["counters"]["replay_bytes_per_episode"] < 84_000


def test_run_outputs_are_complete(full_run):
    summary, out = full_run
    for name in ("metrics.jsonl", "summary.json", "task_matrix.csv", "validated_config.json", "run_metadata.json"):
        assert (out / name).is_file(), name
    assert list((out / "checkpoints").glob("step_*.pt"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("step") == 180 and kinds.count("boundary") == 3 and kinds[-1] == "summary"
    boundary = next(r for r in rows if r["kind"] == "boundary")
    for key in ("system/seen_acc_avg", "base/seen_acc_avg", "system/task_acc/toy_0", "base/task_loss/toy_0",
                "system/task_tokens/toy_0", "system/forgetting", "base/bwt"):
        assert key in boundary, key
    step = next(r for r in rows if r["kind"] == "step")
    for key in ("batch_supervised_tokens", "batch_supervised_fraction", "replay_added_this_step",
                "non_finite_step_count", "first_non_finite_step", "sleep_pressure"):
        assert key in step, key
    meta = json.loads((out / "run_metadata.json").read_text())
    assert meta["status"] == "complete" and meta["seed"] == 42
    assert {"git_commit", "version"} <= set(meta["library"]) and meta["versions"]["torch"]
    assert set(summary["views"]) == {"system", "base"}
    with (out / "task_matrix.csv").open() as f:
        header = f.readline().strip().split(",")
    assert header == ["boundary_index", "boundary_step", "view", "task_id", "task_name", "token_acc", "loss",
                      "n_tokens", "exact_match"]


def _assert_phase_times(out: Path) -> dict[str, float]:
    """run_metadata.json timing.phase_s: every phase, none negative, adding up to the loop's wall time."""
    timing = json.loads((out / "run_metadata.json").read_text())["timing"]
    phases = timing["phase_s"]
    assert list(phases) == list(train_module.PHASES)
    assert all(v >= 0 for v in phases.values()), phases
    wall = timing["wall_time_s"]
    assert 0 < sum(phases.values()) <= wall + 0.001 * len(phases), (phases, wall)  # rounded to 1 ms each
    assert sum(phases.values()) >= 0.95 * wall, (phases, wall)  # nothing of the loop is left out
    return phases


def test_phase_times_add_up_to_the_wall_time(full_run):
    _, out = full_run
    phases = _assert_phase_times(out)
    for name in ("wake", "sleep", "fisher", "evaluation", "checkpoint"):  # full_cls sleeps, with EWC
        assert phases[name] > 0, name


def test_phase_clock_synchronises_cuda_only_when_the_phase_changes(monkeypatch):
    import torch

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    state = train_module.RunState(wall_time_s=5.0, phase_s={"wake": 5.0})  # as a resumed run's state
    clock = train_module.PhaseClock(state, torch.device("cuda"))
    clock.enter("wake")
    clock.tick()
    assert syncs == [] and state.phase_s == {"wake": 5.0} and state.wall_time_s >= 5.0
    with clock.timed("sleep"):
        with clock.timed("fisher"):
            pass
    assert len(syncs) == 4 and clock.phase == "wake"
    assert set(state.phase_s) == {"wake", "sleep", "fisher"} and min(state.phase_s.values()) >= 0
    assert abs(sum(state.phase_s.values()) - state.wall_time_s) < 1e-6  # both continue from the resumed state
    cpu = train_module.PhaseClock(train_module.RunState(), torch.device("cpu"))
    with cpu.timed("evaluation"):
        pass
    assert len(syncs) == 4  # never on the CPU


def test_same_config_and_seed_give_identical_summaries(tmp_path, full_run):
    summary, out = full_run
    again, out2 = _run(tmp_path, "again", "ablation=full_cls", "consolidation.target_ce_weight=1.0",
                       "logging.checkpoint_interval=30")
    assert (out2 / "summary.json").read_text() == (out / "summary.json").read_text()


def test_completed_run_directory_is_not_appended_to(full_run):
    _, out = full_run
    cfg = load_config([*SMALL, "ablation=full_cls", "consolidation.target_ce_weight=1.0",
                       "logging.checkpoint_interval=30", f"logging.output_dir={out}"])
    with pytest.raises(RunError, match="already holds a completed run"):
        run_training(cfg)


def test_killed_run_resumes_to_the_same_summary(tmp_path, full_run, monkeypatch):
    summary, out = full_run
    overrides = ["ablation=full_cls", "consolidation.target_ce_weight=1.0", "logging.checkpoint_interval=30"]
    real_sleep = train_module.maybe_sleep

    def killed_at_95(run, step, task, bar):
        if step == 95:
            raise KeyboardInterrupt  # as if the process were killed mid-task, after the step-90 checkpoint
        return real_sleep(run, step, task, bar)

    monkeypatch.setattr(train_module, "maybe_sleep", killed_at_95)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "resumed", *overrides)
    monkeypatch.setattr(train_module, "maybe_sleep", real_sleep)
    resumed, out2 = _run(tmp_path, "resumed", *overrides)
    assert (out2 / "summary.json").read_text() == (out / "summary.json").read_text()
    steps = [json.loads(line)["step"] for line in (out2 / "metrics.jsonl").open()
             if json.loads(line)["kind"] == "step"]
    assert steps == list(range(1, 181))  # no duplicated or missing rows after the resume
    _assert_phase_times(out2)  # the totals continue from the checkpoint's


@pytest.mark.parametrize("ablation", ["no_ewc", "no_refresh", "no_hippocampus", "seq_ft", "er", "ewc_only",
                                      "joint"])
def test_every_ablation_runs(tmp_path, ablation):
    summary, out = _run(tmp_path, ablation, f"ablation={ablation}", "benchmark.num_tasks=2",
                        "benchmark.switch_every=30")
    assert summary["run"]["ablation"] == ablation
    assert summary["views"]["system"]["tasks_completed"] == 2
    if ablation in ("seq_ft", "er", "ewc_only", "joint"):
        assert summary["counters"]["sleep_count"] == 0
        assert summary["views"]["base"]["plasticity"] > 5 * CHANCE  # the base itself learns
    if ablation == "no_refresh":
        assert summary["counters"]["refresh_count_total"] == 0
    phases = _assert_phase_times(out)
    if ablation == "ewc_only":
        assert phases["fisher"] > 0 and phases["sleep"] == 0  # the Fisher at each boundary, no sleep
    if ablation == "no_hippocampus":
        _assert_system_view_is_the_trained_base(out, summary, f"ablation={ablation}", "benchmark.num_tasks=2",
                                                "benchmark.switch_every=30")


def _assert_system_view_is_the_trained_base(out: Path, summary: dict, *overrides: str) -> None:
    """Without a hippocampus the deployed system is the base. Its recorded scores at the last boundary must be
    the trained neocortex's: re-evaluated here from the final checkpoint with the model's own full forward (not
    the trainer's evaluation path), and different from the untrained base's (so that the agreement is not two
    equal untrained models)."""
    import torch

    from biollm_cls.benchmarks import build_stream
    from biollm_cls.checkpoint import list_checkpoints, load_checkpoint
    from biollm_cls.neocortex import full_logits
    from biollm_cls.train import build_learner

    cfg = load_config([*SMALL, *overrides, f"logging.output_dir={out}"])
    stream = build_stream(cfg)
    torch.manual_seed(cfg.seed)
    learner = build_learner(cfg, torch.device("cpu"))
    assert learner.hippocampus is None

    @torch.no_grad()
    def accuracy(task: int) -> float:
        learner.neocortex.eval()
        hits = tokens = 0
        for batch in stream.heldout(task, 7):  # another batch size than the trainer's
            sup = batch.supervised
            logits = full_logits(learner.neocortex, batch.input_ids, batch.attention_mask)  # (B, T, V)
            hits += int((logits[sup].argmax(-1) == batch.targets[sup]).sum())
            tokens += int(sup.sum())
        return hits / tokens

    untrained = [accuracy(t) for t in range(2)]
    learner.neocortex.load_state_dict(load_checkpoint(list_checkpoints(out)[-1], "cpu")["neocortex"])
    last = summary["views"]["system"]["tasks_completed"] - 1
    recorded = {int(r["task_id"]): float(r["token_acc"]) for r in csv.DictReader((out / "task_matrix.csv").open())
                if r["view"] == "system" and int(r["boundary_index"]) == last}
    assert sorted(recorded) == [0, 1]
    for task, acc in recorded.items():
        assert acc == pytest.approx(accuracy(task), abs=1e-9), f"task {task}: the system view is not the base's"
    assert recorded[last] > 5 * CHANCE and recorded[last] > untrained[last] + 0.2  # the base itself learned


def test_seq_ft_forgets(tmp_path):
    summary, _ = _run(tmp_path, "seq_ft", "ablation=seq_ft")
    assert summary["views"]["base"]["final_forgetting"] > 0.5



def test_a_left_padded_stream_batch_is_refused_in_one_line(tmp_path, monkeypatch):
    """Replay and the HF neocortex's pure-causal attention need right padding: a custom stream that pads on
    the left is refused before its first step, not trained on silently."""
    from biollm_cls.benchmarks.errors import DataError

    real_build = train_module.build_stream

    def left_padded_stream(*args, **kwargs):
        stream = real_build(*args, **kwargs)
        train_batch = stream.train_batch

        def padded_on_the_left(step, batch_size):
            batch = train_batch(step, batch_size)
            batch.attention_mask[0, 0] = False  # a pad position before the row's real ones
            return batch

        stream.train_batch = padded_on_the_left
        return stream

    monkeypatch.setattr(train_module, "build_stream", left_padded_stream)
    with pytest.raises(DataError, match=r"batch of step 1 is left-padded .* need right padding") as err:
        _run(tmp_path, "left", "ablation=no_sleep")
    assert "\n" not in str(err.value)


def test_build_learner_compiles_the_neocortex_with_the_configured_scope_and_mode(monkeypatch):
    import torch

    from biollm_cls.train import build_learner

    calls = []
    monkeypatch.setattr(train_module, "compile_neocortex", lambda neo, scope, **options: calls.append((scope, options)))
    cfg = load_config([*SMALL, "train.compile_model=true", "train.compile_scope=trunk",
                       "train.compile_mode=max-autotune-no-cudagraphs"])
    build_learner(cfg, torch.device("cpu"))
    assert calls == [("trunk", {"mode": "max-autotune-no-cudagraphs"})]
    calls.clear()
    build_learner(load_config([*SMALL]), torch.device("cpu"))  # compile_model defaults to false
    assert calls == []
