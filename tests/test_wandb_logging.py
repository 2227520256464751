"""The W&B mirror, offline: what reaches W&B is read back from the run's own ``.wandb`` file.

The pure routing/naming functions are tested directly; three real offline runs (synthetic rows, a resumed
run, a short ``run_training``) check what wandb itself recorded, with ``biollm_cls.wandb_offline``.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
import torch

from biollm_cls.config.schema import RunConfig
from biollm_cls.wandb_logging import (
    WandbMirror,
    auto_group,
    boundary_payload,
    derive_run_id,
    init_kwargs,
    open_wandb_mirror,
    resolve_mode,
    run_group,
    run_name,
    scrub,
    step_payload,
)
from biollm_cls.wandb_offline import read_finished_run, run_files

MARKER = "MARKERKEY-0123456789abcdef0123456789abcdef"




def make_cfg(run_dir: Path, **logging_overrides) -> RunConfig:
    cfg = RunConfig(suite_name="unit", ablation_name="no_sleep", seed=7)
    cfg.logging.output_dir = str(run_dir)
    cfg.logging.use_wandb = True
    for key, value in logging_overrides.items():
        setattr(cfg.logging, key, value)
    return cfg


def step_row(step: int, slept: bool = False) -> dict:
    return {"kind": "step", "step": step, "task_id": 0, "task_name": "copy", "task_loss": 2.0 / step,
            "sleep_pressure": 0.1 * step, "sleep_count": int(slept), "sleep_steps": 3 if slept else 0,
            "skipped_steps": 0, "distill_kl": 0.4 if slept else 0.0, "ewc_penalty": 0.01 if slept else 0.0,
            "fisher_source_mode": "replay_only" if slept else "none", "fast_update_applied": True,
            "old_task_loss": None, "non_finite_step_count": 0, "first_non_finite_step": -1}


def boundary_row(index: int, tasks: list[str]) -> dict:
    row = {"kind": "boundary", "step": 10 * (index + 1), "boundary_index": index, "boundary_step": 10 * (index + 1),
           "task_id": index, "task_name": tasks[index], "tasks_completed": index + 1}
    for view in ("system", "base"):
        row.update({f"{view}/seen_acc_avg": 0.5, f"{view}/forgetting": 0.1, f"{view}/bwt": -0.1,
                    f"{view}/uncovered_tasks": []})
        for t in tasks[: index + 1]:
            row.update({f"{view}/task_acc/{t}": 0.6, f"{view}/task_loss/{t}": 1.2, f"{view}/task_tokens/{t}": 40})
    row["base/task_acc/copy"] = None  # an uncovered score: must not become 0
    return row


# ------------------------------------------------------------------------------------------ pure parts


def test_resolve_mode(caplog):
    env = {"WANDB_API_KEY": "k" * 40}
    assert resolve_mode("offline", "WANDB_API_KEY", {}) == "offline"
    assert resolve_mode("offline", "WANDB_API_KEY", {"WANDB_MODE": "disabled"}) == "disabled"
    assert resolve_mode("disabled", "WANDB_API_KEY", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("online", "WANDB_API_KEY", env) == "online"
    with caplog.at_level(logging.WARNING):
        assert resolve_mode("online", "WANDB_API_KEY", {}) == "offline"
        assert resolve_mode("offline", "X", {"WANDB_MODE": "bogus"}) == "offline"
    assert len(caplog.records) == 2 and "offline instead" in caplog.text and "ignoring WANDB_MODE" in caplog.text


def test_names_groups_and_ids(tmp_path):
    cfg = make_cfg(tmp_path / "a")
    assert run_name(cfg) == "no_sleep-seed7" and run_group(cfg) == "unit"
    cfg.suite_name = None
    assert run_name(cfg) is None
    assert run_group(cfg, dt.date(2025, 3, 9)) == "auto-toy-tiny-20250309"
    cfg.model.provider, cfg.model.hf_model_name = "hf", "Qwen/Qwen2.5-0.5B-Instruct"
    assert auto_group(cfg, dt.date(2025, 3, 9)) == "auto-toy-qwen2-5-0-5b-instruct-20250309"
    cfg.logging.wandb_auto_group = False
    assert run_group(cfg) is None
    cfg.logging.wandb_group, cfg.logging.wandb_run_name = "g", "n"
    assert (run_group(cfg), run_name(cfg)) == ("g", "n")
    one, same, other = make_cfg(tmp_path / "a"), make_cfg(tmp_path / "a"), make_cfg(tmp_path / "b")
    assert derive_run_id(one, tmp_path / "a") == derive_run_id(same, tmp_path / "a")
    assert derive_run_id(one, tmp_path / "a") != derive_run_id(other, tmp_path / "b")
    one.logging.wandb_run_id = "fixed"
    assert derive_run_id(one, tmp_path / "a") == "fixed"


def test_scrub_and_init_kwargs_hold_no_secret(tmp_path):
    data = {"a": f"x{MARKER}y", "api_key": "short", "wandb_api_key_env_var": "WANDB_API_KEY",
            "nested": [{"token": 1}, MARKER, 3]}
    assert scrub(data, [MARKER]) == {"a": "<redacted>", "api_key": "<redacted>",
                                     "wandb_api_key_env_var": "WANDB_API_KEY",
                                     "nested": [{"token": "<redacted>"}, "<redacted>", 3]}
    cfg = make_cfg(tmp_path, wandb_notes=f"note {MARKER}")
    kwargs = init_kwargs(cfg, tmp_path, {"env": {"WANDB_API_KEY": MARKER}, "device": "cpu"}, "offline", [MARKER])
    assert MARKER not in repr(kwargs)
    assert kwargs["config"]["runtime"]["device"] == "cpu" and kwargs["resume"] == "allow"
    assert kwargs["dir"] == str(tmp_path) and kwargs["group"] == "unit" and kwargs["name"] == "no_sleep-seed7"


def test_step_payload_curated_and_full():
    quiet, slept = step_row(2), step_row(3, slept=True)
    curated = step_payload(quiet, full_history=False)
    assert curated["core/task_loss"] == 1.0 and curated["core/fast_update_applied"] == 1
    assert "core/distill_kl" not in curated  # sleep metrics only on steps that slept
    assert "core/old_task_loss" not in curated  # null is left out, never 0
    assert "core/fisher_source_mode" not in curated and "task_loss" not in curated
    assert step_payload(slept, full_history=False)["core/distill_kl"] == 0.4
    full = step_payload(quiet, full_history=True)
    assert full["task_loss"] == 1.0 and full["core/task_loss"] == 1.0 and full["distill_kl"] == 0.0


def test_boundary_payload_has_per_task_keys_for_both_views():
    payload = boundary_payload(boundary_row(1, ["copy", "sort"]), full_history=False)
    for view in ("system", "base"):
        assert payload[f"boundary/{view}/seen_acc_avg"] == 0.5
        assert payload[f"boundary/{view}/task_loss/sort"] == 1.2
        assert payload[f"boundary/{view}/task_tokens/copy"] == 40
    assert payload["boundary/system/task_acc/copy"] == 0.6
    assert "boundary/base/task_acc/copy" not in payload  # null score: left out
    assert payload["boundary/boundary_index"] == 1 and "boundary/task_name" not in payload
    assert "system/seen_acc_avg" not in payload
    assert boundary_payload(boundary_row(0, ["copy"]), full_history=True)["system/seen_acc_avg"] == 0.5


# ------------------------------------------------------------------------------------------ no W&B at all


def test_off_and_disabled_write_nothing(tmp_path, wandb_env, monkeypatch):
    assert open_wandb_mirror(make_cfg(tmp_path / "off", use_wandb=False), tmp_path / "off", {}) is None
    assert open_wandb_mirror(make_cfg(tmp_path / "d", wandb_mode="disabled"), tmp_path / "d", {}) is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert open_wandb_mirror(make_cfg(tmp_path / "e"), tmp_path / "e", {}) is None
    assert not any(tmp_path.glob("*/wandb")) and not (tmp_path / "off").exists()


class _BrokenRun:
    id = "broken"
    finished = False

    def log(self, payload):
        raise ConnectionError("W&B is down")

    def finish(self, exit_code=0):
        self.finished = True


def test_a_wandb_failure_warns_once_and_switches_off(tmp_path, caplog):
    run = _BrokenRun()
    mirror = WandbMirror(wandb=None, run=run, cfg=make_cfg(tmp_path), run_dir=tmp_path, secrets=[])
    with caplog.at_level(logging.WARNING):
        mirror.log(step_row(1))
        mirror.log(step_row(2))
        mirror.log_checkpoint(tmp_path / "x.pt", 2)
        mirror.finish({}, {})
    assert not mirror.active and run.finished
    assert len([r for r in caplog.records if "continuing without W&B" in r.message]) == 1


def test_init_failure_returns_none(tmp_path, wandb_env, monkeypatch, caplog):
    import wandb

    def boom(**kwargs):
        raise RuntimeError("no service")

    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING):
        assert open_wandb_mirror(make_cfg(tmp_path), tmp_path, {}) is None
    assert "init failed" in caplog.text


# ------------------------------------------------------------------------------------------ offline runs


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


def test_offline_mirror_records_curated_history_summary_and_artifacts(tmp_path, wandb_env, monkeypatch, caplog):
    """Online without a key falls back to offline once; the API key never reaches a file; resume keeps the id."""
    monkeypatch.setenv("WANDB_API_KEY", MARKER)  # set, but the configured variable is unset: fall back
    run_dir = tmp_path / "run"
    cfg = make_cfg(run_dir, wandb_mode="online", wandb_api_key_env_var="BIOLLM_TEST_UNSET_KEY",
                   upload_checkpoints=True, wandb_watch_model=True, wandb_watch_log_freq=1)
    for name, text in [("validated_config.json", "{}"), ("run_metadata.json", "{}"), ("metrics.jsonl", "{}\n")]:
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text(text)
    (run_dir / "step_0000010.pt").write_bytes(b"weights")
    with caplog.at_level(logging.WARNING):
        mirror = open_wandb_mirror(cfg, run_dir, {"device": "cpu", "leak": MARKER})
    assert mirror is not None
    assert len([r for r in caplog.records if "offline instead" in r.message]) == 1
    net = torch.nn.Linear(3, 2)
    mirror.watch(net)
    net(torch.ones(1, 3)).sum().backward()  # gradient histograms go out with the next row
    tasks = ["copy", "sort"]
    for row in (step_row(1), step_row(2, slept=True), boundary_row(0, tasks), step_row(11), boundary_row(1, tasks)):
        mirror.log(row)
    mirror.log_checkpoint(run_dir / "step_0000010.pt", 10)
    mirror.log_checkpoint(run_dir / "step_0000010.pt", 10)  # the final save of the same step: not again
    summary = {"views": {"system": {"final_seen_acc_avg": 0.5, "final_bwt": float("nan")}},
               "counters": {"sleep_count": 1}, "final_seen_acc_avg": 0.5}
    mirror.log({"kind": "summary", "step": 20, **summary})
    mirror.finish(summary, {"config": run_dir / "validated_config.json", "metadata": run_dir / "run_metadata.json",
                            "metrics": run_dir / "metrics.jsonl", "task_matrix": run_dir / "missing.csv"})
    assert not mirror.active
    net(torch.ones(1, 3)).sum().backward()  # the hooks are gone with the run: training goes on

    (first,) = run_files(run_dir)
    assert first.parent.parent == run_dir / "wandb" and first.parent.name.startswith("offline-run-")
    rec = read_finished_run(first)
    assert (rec.run_id, rec.name, rec.group, rec.exit_code) == (mirror.run_id, "no_sleep-seed7", "unit", 0)
    keys = rec.keys()
    assert {"step", "core/task_loss", "core/sleep_pressure", "core/distill_kl", "boundary/system/seen_acc_avg",
            "boundary/system/task_acc/sort", "boundary/base/task_loss/copy", "boundary/base/task_tokens/sort",
            "boundary/boundary_index", "gradients/weight/values"} <= keys
    assert not {"task_loss", "system/seen_acc_avg", "core/fisher_source_mode"} & keys
    kl_steps = [row["step"] for row in rec.history if "core/distill_kl" in row]
    assert kl_steps == [2]
    assert [row["step"] for row in rec.history if "boundary/system/task_acc/copy" in row] == [10, 20]
    assert rec.summary["core/fisher_source_mode"] == "replay_only" and rec.summary["boundary/task_name"] == "sort"
    assert rec.summary["views/system/final_seen_acc_avg"] == 0.5 and rec.summary["counters/sleep_count"] == 1
    assert rec.summary["views/system/final_bwt"] is None  # NaN is missing, not 0
    assert rec.config["runtime"]["leak"] == "<redacted>"
    artifacts = {a["name"]: a for a in rec.artifacts}
    prefix = mirror.run_id
    assert artifacts[f"{prefix}-validated-config"]["files"] == ["validated_config.json"]
    assert artifacts[f"{prefix}-run-metadata"]["type"] == "metadata"
    assert artifacts[f"{prefix}-metrics-history"]["files"] == ["metrics.jsonl"]
    assert set(artifacts["metric-glossary"]["files"]) >= {"metric_glossary.json", "metric_glossary.md"}
    checkpoints = [a for a in rec.artifacts if a["name"] == f"{prefix}-checkpoint"]
    assert len(checkpoints) == 1 and set(checkpoints[0]["aliases"]) >= {"latest", "step-10"}
    assert _files_containing(run_dir, MARKER) == []

    again = open_wandb_mirror(cfg, run_dir, {"device": "cpu"})  # a retried run: same directory, same W&B run
    again.log(step_row(12))
    again.finish({}, {})
    assert again.run_id == mirror.run_id
    files = run_files(run_dir)
    assert len(files) == 2 and {read_finished_run(f).run_id for f in files} == {mirror.run_id}
    assert _files_containing(run_dir, MARKER) == []


TINY = ["benchmark.num_tasks=2", "benchmark.switch_every=3", "benchmark.heldout_size=4", "model.hidden_size=16",
        "model.num_layers=2", "model.injection_layer=0", "model.num_heads=2", "model.seq_len=8",
        "experts.num_experts=2", "experts.top_k=1", "experts.expert_hidden=8", "train.batch_size=2",
        "train.eval_batch_size=8", "replay.batch_size=2", "replay.capacity=16", "consolidation.sleep_min_interval=1",
        "consolidation.sleep_max_interval=2", "consolidation.min_sleep_steps=1", "consolidation.max_sleep_steps=1",
        "ewc.fisher_samples=2", "scheduler.probe_interval=2", "scheduler.probe_size=2",
        "consolidation.refresh.samples_per_expert=1", "train.progress=false", "logging.use_wandb=true",
        "suite_name=unit"]


def test_real_run_training_is_mirrored(tmp_path, wandb_env, caplog):
    """A 6-step toy run with W&B on: every numeric key it logs is documented and charted."""
    from biollm_cls.config import load_config
    from biollm_cls.train import run_training

    run_dir = tmp_path / "run"
    cfg = load_config([*TINY, f"logging.output_dir={run_dir}"])
    with caplog.at_level(logging.WARNING, logger="biollm_cls.wandb_logging"):
        summary = run_training(cfg)
    assert "not charted" not in caplog.text, "a metric the trainer logs is missing from metric_glossary.py"
    (path,) = run_files(run_dir)
    rec = read_finished_run(path)
    assert rec.name == "full_cls-seed42" and rec.group == "unit" and rec.exit_code == 0
    keys = rec.keys()
    assert {"core/task_loss", "core/sleep_pressure", "core/sleep_count", "core/replay_size",
            "core/expert_util_entropy", "core/non_finite_step_count"} <= keys
    for view in ("system", "base"):
        for task in summary["run"]["task_names"]:
            assert {f"boundary/{view}/task_acc/{task}", f"boundary/{view}/task_loss/{task}",
                    f"boundary/{view}/task_tokens/{task}"} <= keys
    if summary["counters"]["sleep_count"]:
        assert "core/distill_kl" in keys
    assert rec.summary["final_seen_acc_avg"] == pytest.approx(summary["final_seen_acc_avg"])
    names = {a["name"] for a in rec.artifacts}
    assert {f"{rec.run_id}-validated-config", f"{rec.run_id}-run-metadata", f"{rec.run_id}-metrics-history",
            "metric-glossary"} <= names
