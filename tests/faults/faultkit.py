"""Helpers of the fault-injection suite: the tiny run, the in-process CLI, the driver, output comparison.

The run (3 tasks x 10 steps, width 16, 5 sleeps of 3 steps, a checkpoint every 4 steps, 3 kept) takes
about a second in-process; a subprocess adds ~4 s of imports, so the killed runs (subprocesses, through
``fault_driver.py``) are started together, two at a time, and every rerun happens in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from biollm_cls.cli import main as cli_main

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "fault_driver.py"

TINY = [
    "benchmark.num_tasks=3", "benchmark.switch_every=10", "benchmark.heldout_size=8",
    "model.seq_len=8", "model.hidden_size=16", "model.vocab_size=16", "model.num_layers=3", "model.num_heads=2",
    "model.injection_layer=1", "experts.num_experts=4", "experts.expert_hidden=8",
    "replay.capacity=64", "replay.batch_size=8", "replay.teacher_topk=4", "ewc.fisher_samples=8",
    "train.batch_size=4", "train.eval_batch_size=8",
    "consolidation.sleep_min_interval=3", "consolidation.sleep_max_interval=6",
    "consolidation.min_sleep_steps=3", "consolidation.max_sleep_steps=4",
    "scheduler.probe_interval=4", "scheduler.probe_size=8",
    "logging.checkpoint_interval=4", "logging.checkpoint_keep_last=3",
    "train.num_threads=1", "train.progress=false", "device=cpu",
]
STEPS = 30
SAVES = 9  # steps 4 8 10 12 16 20 24 28 30 (the end of the run does not save step 30 again)
SLEEP_UPDATES = 15  # 5 sleeps x 3 consolidation updates
COMPARED = ("summary.json", "task_matrix.csv", "metrics.jsonl")


def train_args(out: Path) -> list[str]:
    return ["train", *TINY, f"logging.output_dir={out}"]


def run_cli(out: Path) -> int:
    """`python -m biollm_cls.cli train` in-process (its summary goes to stdout)."""
    return cli_main(train_args(out))


def outputs(out: Path) -> dict[str, object]:
    """What must match an uninterrupted run: summary.json and task_matrix.csv byte for byte, and every
    metrics.jsonl row. summary.json holds no wall time (that is in run_metadata.json's timing)."""
    return {
        "summary.json": (out / "summary.json").read_text(),
        "task_matrix.csv": (out / "task_matrix.csv").read_text(),
        "metrics.jsonl": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
    }


def assert_same_as_reference(out: Path, reference: Path) -> None:
    got, want = outputs(out), outputs(reference)
    for name in COMPARED:
        assert got[name] == want[name], f"{out}: {name} differs from the uninterrupted run"
    assert not list((out / "checkpoints").glob("*.tmp")), "temp files left in checkpoints/"


def assert_quiet_rerun(err: str) -> None:
    """A rerun's stderr: at most one line, saying from which checkpoint it resumed (none for a fresh start);
    no warning (a skipped, torn checkpoint) and no error."""
    lines = err.splitlines()
    assert len(lines) <= 1 and all(line.startswith("note: resuming ") for line in lines), lines


def driver_command(fault: dict, out: Path) -> list[str]:
    return [sys.executable, str(DRIVER), json.dumps(fault), *TINY, f"logging.output_dir={out}"]


PYCACHE: dict[str, str] = {}  # set by the `warm_driver` fixture: a session-wide bytecode cache


def driver_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if PYCACHE:  # without bytecode every process recompiles torch's sources (~6 s)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE["dir"]
    return env


def run_driver(fault: dict, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(driver_command(fault, out), capture_output=True, text=True, env=driver_env(), timeout=240)
