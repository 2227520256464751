"""Synthetic run directories written per docs/run_outputs.md, for the suite's table and plot tests."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

TASKS = ["copy", "reverse", "sort"]


def accuracy_matrix(ablation: str, seed: int, view: str, n: int) -> np.ndarray:
    """A[i][j] for j <= i (NaN above the diagonal): reproducible numbers that differ by run and view."""
    rng = np.random.default_rng(abs(hash((ablation, seed, view))) % 2**32)
    a = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1):
            a[i, j] = round(float(rng.uniform(0.3, 0.9)), 4)
    return a


def continual_metrics(a: np.ndarray, i: int) -> dict[str, float]:
    """The contract's formulas for boundary i (finite entries only)."""
    with warnings.catch_warnings():  # an uncovered task makes all-NaN slices: NaN is the intended result
        warnings.simplefilter("ignore", RuntimeWarning)
        return _continual_metrics(a, i)


def _continual_metrics(a: np.ndarray, i: int) -> dict[str, float]:
    seen = a[i, : i + 1]
    forgetting = [np.nanmax(a[j:i, j]) - a[i, j] for j in range(i)]
    bwt = [a[i, j] - a[j, j] for j in range(i)]
    return {
        "seen_acc_avg": float(np.nanmean(seen)),
        "seen_loss_avg": float(np.nanmean(1.0 - seen)),
        "forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "bwt": float(np.mean(bwt)) if bwt else 0.0,
        "plasticity": float(np.nanmean(np.diag(a)[: i + 1])),
    }


def write_run(run_dir: Path, ablation: str, seed: int, *, complete: bool = True, uncovered: str | None = None,
              null_final_bwt: bool = False, views: tuple[str, ...] = ("system", "base"),
              timing_in_metadata: bool = False) -> Path:
    """Write one run directory. complete=False leaves out summary.json (a failed run).

    uncovered: a task name with 0 held-out tokens (null scores, listed in uncovered_tasks).
    """
    n, switch = len(TASKS), 10
    run_dir.mkdir(parents=True, exist_ok=True)
    mats = {v: accuracy_matrix(ablation, seed, v, n) for v in views}
    if uncovered is not None:
        k = TASKS.index(uncovered)
        for m in mats.values():
            m[:, k] = np.nan
    lines = [{"kind": "step", "step": s, "loss": 1.0 / s} for s in range(1, n * switch + 1, 5)]
    matrix_rows = []
    for i in range(n):
        row = {"kind": "boundary", "step": (i + 1) * switch, "boundary_index": i,
               "boundary_step": (i + 1) * switch, "task_id": i, "task_name": TASKS[i], "tasks_completed": i + 1}
        for v in views:
            a = mats[v]
            for key, value in continual_metrics(a, i).items():
                row[f"{v}/{key}"] = value
            for j in range(i + 1):
                acc = a[i, j]
                covered = bool(np.isfinite(acc))
                row[f"{v}/task_acc/{TASKS[j]}"] = float(acc) if covered else None
                matrix_rows.append({
                    "boundary_index": i, "boundary_step": (i + 1) * switch, "view": v, "task_id": j,
                    "task_name": TASKS[j], "token_acc": f"{acc:.4f}" if covered else "",
                    "loss": f"{1 - acc:.4f}" if covered else "", "n_tokens": 50 if covered else 0,
                    "exact_match": f"{acc / 2:.4f}" if covered else "",
                })
            row[f"{v}/uncovered_tasks"] = [uncovered] if uncovered and TASKS.index(uncovered) <= i else []
        lines.append(row)
    with (run_dir / "metrics.jsonl").open("w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    with (run_dir / "task_matrix.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["boundary_index", "boundary_step", "view", "task_id", "task_name",
                                                "token_acc", "loss", "n_tokens", "exact_match"])
        writer.writeheader()
        writer.writerows(matrix_rows)
    if not complete:
        return run_dir
    view_summaries = {}
    for v in views:
        last = continual_metrics(mats[v], n - 1)
        curve = [continual_metrics(mats[v], i)["seen_acc_avg"] for i in range(n)]
        view_summaries[v] = {
            "final_seen_acc_avg": last["seen_acc_avg"], "final_seen_loss_avg": last["seen_loss_avg"],
            "final_forgetting": last["forgetting"], "final_bwt": None if null_final_bwt else last["bwt"],
            "seen_acc_auc": float(np.trapezoid(curve) / (n - 1)), "plasticity": last["plasticity"],
            "tasks_completed": n, "uncovered_tasks": [uncovered] if uncovered else [],
        }
    summary = {
        "run": {"ablation": ablation, "seed": seed, "suite_name": "unit", "benchmark": "instruction",
                "num_tasks": n, "task_names": TASKS, "steps": n * switch},
        "views": view_summaries,
        "counters": {"sleep_count": 2 if ablation != "no_sleep" else 0, "refresh_count_total": 1,
                     "base_updates_in_sleep": 20, "non_finite_step_count": 0, "first_non_finite_step": -1,
                     "replay_bytes_per_episode": 512, "replay_bytes_total": 5120, "wall_time_s": 1.5,
                     "steps_per_s": 20.0},
        **{k: view_summaries["system"][k] for k in
           ("final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc")},
    }
    if timing_in_metadata:  # the trainer may record timing in run_metadata.json instead of the counters
        timing = {k: summary["counters"].pop(k) for k in ("wall_time_s", "steps_per_s")}
        (run_dir / "run_metadata.json").write_text(json.dumps({"status": "complete", "timing": timing}))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


@pytest.fixture
def make_run(tmp_path):
    def make(ablation: str, seed: int, **kwargs) -> Path:
        return write_run(tmp_path / "runs" / ablation / f"seed{seed}", ablation, seed, **kwargs)

    return make


@pytest.fixture
def suite_runs(make_run):
    """A small suite: 3 ablations x 3 seeds, complete, plus one failed run."""
    dirs = [make_run(a, s) for a in ("full_cls", "no_sleep", "seq_ft") for s in (7, 42, 123)]
    failed = make_run("no_ewc", 7, complete=False)
    return dirs, failed
