"""Continual-learning tables: one run's tables from its run directory, and the suite tables merged from many.

A run directory follows ``docs/run_outputs.md``: ``summary.json`` (written last, so its presence means the
run completed), ``metrics.jsonl`` (one ``boundary`` row per task boundary) and ``task_matrix.csv``.
Each run gives three tidy tables, one row per view (``system`` = base + hippocampus as deployed,
``base`` = the consolidated neocortex alone):

- ``summary``: final metrics per view (``final_seen_acc_avg``, ``final_forgetting``, ``final_bwt``,
  ``seen_acc_auc``, ...) and the run's counters;
- ``boundary_metrics``: the continual metrics after each task boundary;
- ``task_matrix``: the accuracy/loss matrix, one row per (boundary, seen task).

Every row starts with the run's identity: ``run_id`` (the run directory unless given), ``run_name``
(``<ablation>-seed<seed>``), ``baseline`` (the ablation) and ``seed``, then ``view``.

Missing values stay missing. A run without ``summary.json`` (failed or still running) yields no rows at
all, and a score the run did not produce (``null`` in JSON, an empty CSV cell) is written as an empty
cell, never as 0, so a failed or uncovered measurement cannot pull a mean towards zero.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biollm_cls.suite.io import atomic_path

VIEWS = ("system", "base")
ID_COLUMNS = ["run_id", "run_name", "baseline", "seed", "view"]

# The first columns follow the reference publisher's suite CSVs (REFERENCE.md §5) with `view` added;
# the rest are extras appended after them, so a reader of the reference's columns finds them in place.
SUMMARY_METRICS = ["final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc"]
SUMMARY_EXTRA_METRICS = ["final_seen_loss_avg", "plasticity", "tasks_completed", "uncovered_tasks"]
COUNTERS = [
    "sleep_count", "refresh_count_total", "base_updates_in_sleep", "non_finite_step_count",
    "first_non_finite_step", "replay_size", "replay_bytes_per_episode", "replay_bytes_total", "wall_time_s",
    "steps_per_s", "non_finite_sleep_step_count",
]
# The budget ledger (summary.json "budget", see biollm_cls/budget.py): what each run spent.
BUDGET = [
    "fast_optimizer_steps", "base_optimizer_steps", "fast_gradient_rows", "base_gradient_rows", "replayed_rows",
    "pseudo_rows", "forward_only_passes", "fisher_backwards", "buffer_episodes", "buffer_bytes",
]
TIMING = ("wall_time_s", "steps_per_s")  # in summary.json counters, else in run_metadata.json "timing"
RUN_FACTS = ["suite_name", "benchmark", "num_tasks", "steps"]
SUMMARY_COLUMNS = ID_COLUMNS + SUMMARY_METRICS + SUMMARY_EXTRA_METRICS + COUNTERS + BUDGET + RUN_FACTS

BOUNDARY_METRICS = ["seen_acc_avg", "seen_loss_avg", "forgetting", "bwt"]
BOUNDARY_COLUMNS = (
    ID_COLUMNS
    + ["step", "boundary_index", "boundary_step"]
    + BOUNDARY_METRICS
    + ["tasks_completed", "plasticity", "task_id", "task_name"]  # task_* = the task just completed
)

TASK_SCORES = ["token_acc", "loss", "n_tokens", "exact_match"]
TASK_MATRIX_COLUMNS = ID_COLUMNS + ["boundary_index", "task_id", "task_name"] + TASK_SCORES + ["boundary_step"]

# Integer columns are written without a decimal point; a missing one stays an empty cell.
INT_COLUMNS = {
    "seed", "step", "boundary_index", "boundary_step", "tasks_completed", "task_id", "n_tokens", "num_tasks",
    "steps", "sleep_count", "refresh_count_total", "base_updates_in_sleep", "non_finite_step_count",
    "first_non_finite_step", "replay_size", "replay_bytes_total", "non_finite_sleep_step_count", *BUDGET,
}

TABLE_COLUMNS = {
    "summary": SUMMARY_COLUMNS,
    "boundary_metrics": BOUNDARY_COLUMNS,
    "task_matrix": TASK_MATRIX_COLUMNS,
}
# File names of the merged suite tables (the per-run tables are <name>.csv).
SUITE_FILES = {"summary": "suite_summary.csv", "boundary_metrics": "boundary_metrics.csv",
               "task_matrix": "task_matrix.csv"}


class TablesError(RuntimeError):
    """A run directory that breaks the contract (unreadable summary, malformed metrics line, ...)."""


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    run_name: str
    baseline: str
    seed: int

    def columns(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "run_name": self.run_name, "baseline": self.baseline, "seed": self.seed}


@dataclass
class RunTables:
    """The three tables of one run (or of a merged suite)."""

    summary: pd.DataFrame
    boundary_metrics: pd.DataFrame
    task_matrix: pd.DataFrame

    def items(self) -> list[tuple[str, pd.DataFrame]]:
        return [("summary", self.summary), ("boundary_metrics", self.boundary_metrics),
                ("task_matrix", self.task_matrix)]


# ----------------------------------------------------------------------------------------------- one run


def is_complete(run_dir: str | os.PathLike) -> bool:
    """A run completed iff its summary.json exists (the trainer writes it last, atomically)."""
    return (Path(run_dir) / "summary.json").is_file()


def run_tables(run_dir: str | os.PathLike, run_id: str | None = None) -> RunTables | None:
    """The three tables of one run directory, or None when the run did not complete (no summary.json)."""
    run_dir = Path(run_dir)
    if not is_complete(run_dir):
        return None
    summary = _read_json(run_dir / "summary.json")
    identity = _identity(summary, run_id or str(run_dir))
    counters = {**_timing(run_dir), **(summary.get("counters") or {}), **(summary.get("budget") or {})}
    return RunTables(
        summary=_summary_table(summary, counters, identity),
        boundary_metrics=_boundary_table(_boundary_rows(run_dir / "metrics.jsonl"), identity),
        task_matrix=_task_matrix_table(run_dir / "task_matrix.csv", identity),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TablesError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TablesError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _identity(summary: dict[str, Any], run_id: str) -> RunIdentity:
    run = summary.get("run") or {}
    baseline, seed = run.get("ablation"), run.get("seed")
    if not isinstance(baseline, str) or not isinstance(seed, int):
        raise TablesError(f"summary.json of {run_id}: run.ablation and run.seed are required, got {run!r}")
    return RunIdentity(run_id=run_id, run_name=f"{baseline}-seed{seed}", baseline=baseline, seed=seed)


def _value(x: Any) -> Any:
    """A JSON value as a table cell: null and non-finite floats become NaN (an empty cell), never 0."""
    if x is None:
        return math.nan
    if isinstance(x, float) and not math.isfinite(x):
        return math.nan
    return x


def _timing(run_dir: Path) -> dict[str, Any]:
    """Wall time and steps/s from run_metadata.json's "timing" (where the trainer records them); {} if absent."""
    path = run_dir / "run_metadata.json"
    if not path.is_file():
        return {}
    timing = _read_json(path).get("timing") or {}
    return {key: timing[key] for key in TIMING if key in timing}


def _summary_table(summary: dict[str, Any], counters: dict[str, Any], who: RunIdentity) -> pd.DataFrame:
    run = summary.get("run") or {}
    facts = {"suite_name": run.get("suite_name"), "benchmark": run.get("benchmark"),
             "num_tasks": run.get("num_tasks"), "steps": run.get("steps")}
    rows = []
    for view, metrics in (summary.get("views") or {}).items():
        metrics = metrics or {}
        row: dict[str, Any] = {**who.columns(), "view": view}
        for key in SUMMARY_METRICS + SUMMARY_EXTRA_METRICS:
            row[key] = _value(metrics.get(key))
        uncovered = metrics.get("uncovered_tasks") or []
        row["uncovered_tasks"] = ";".join(str(t) for t in uncovered)
        row.update({key: _value(counters.get(key)) for key in COUNTERS + BUDGET})
        row.update({key: _value(value) for key, value in facts.items()})
        rows.append(row)
    return _frame(rows, SUMMARY_COLUMNS)


def _boundary_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise TablesError(f"{path}: missing (a completed run writes metrics.jsonl)")
    rows = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TablesError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
            if isinstance(row, dict) and row.get("kind") == "boundary":
                rows.append(row)
    return rows


def _boundary_table(rows: list[dict[str, Any]], who: RunIdentity) -> pd.DataFrame:
    out = []
    for row in rows:
        for view in VIEWS:
            if not any(key.startswith(f"{view}/") for key in row):
                continue  # this run logged no such view
            out.append({
                **who.columns(), "view": view,
                **{key: _value(row.get(key)) for key in ("step", "boundary_index", "boundary_step")},
                **{key: _value(row.get(f"{view}/{key}")) for key in BOUNDARY_METRICS},
                "tasks_completed": _value(row.get("tasks_completed")),
                "plasticity": _value(row.get(f"{view}/plasticity")),
                "task_id": _value(row.get("task_id")),
                "task_name": _value(row.get("task_name")),
            })
    return _frame(out, BOUNDARY_COLUMNS)


def _task_matrix_table(path: Path, who: RunIdentity) -> pd.DataFrame:
    if not path.is_file():
        raise TablesError(f"{path}: missing (a completed run writes task_matrix.csv)")
    try:
        # keep_default_na with no extra values: "", "nan", "null" -> NaN; a real 0 stays 0.
        raw = pd.read_csv(path, keep_default_na=True)
    except (OSError, pd.errors.ParserError) as exc:
        raise TablesError(f"{path}: cannot read CSV ({exc})") from None
    except pd.errors.EmptyDataError:
        raise TablesError(f"{path}: empty (expected a header line)") from None
    required = ["boundary_index", "boundary_step", "view", "task_id", "task_name", "token_acc", "loss", "n_tokens"]
    missing = [c for c in required if c not in raw.columns]
    if missing:
        raise TablesError(f"{path}: missing column(s) {', '.join(missing)}")
    if "exact_match" not in raw.columns:
        raw["exact_match"] = math.nan
    rows = [{**who.columns(), **record} for record in raw.to_dict("records")]
    return _frame(rows, TASK_MATRIX_COLUMNS)


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column in INT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    return frame


# ------------------------------------------------------------------------------------------------ output


def write_tables(tables: RunTables, output_dir: str | os.PathLike, names: dict[str, str] | None = None) -> list[Path]:
    """Write each table as CSV (atomically); ``names`` maps table -> file name (default ``<table>.csv``)."""
    written = []
    for table, frame in tables.items():
        path = Path(output_dir) / (names or {}).get(table, f"{table}.csv")
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, na_rep="", float_format="%.10g")
        written.append(path)
    return written


def read_tables(tables_dir: str | os.PathLike, names: dict[str, str] | None = None) -> RunTables:
    """Read CSVs written by ``write_tables`` (``names`` as given there), columns typed as when written."""
    frames = {}
    for table, columns in TABLE_COLUMNS.items():
        path = Path(tables_dir) / (names or {}).get(table, f"{table}.csv")
        try:
            raw = pd.read_csv(path, dtype={"run_id": str, "run_name": str, "baseline": str, "view": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise TablesError(f"{path}: cannot read ({exc})") from None
        missing = [c for c in columns if c not in raw.columns]
        if missing:
            raise TablesError(f"{path}: missing column(s) {', '.join(missing)}")
        frames[table] = _frame(raw[columns].to_dict("records"), columns)
    return RunTables(**frames)


def read_suite_tables(tables_dir: str | os.PathLike) -> RunTables:
    """Read the merged suite tables (``suite_summary.csv``, ``boundary_metrics.csv``, ``task_matrix.csv``)."""
    return read_tables(tables_dir, SUITE_FILES)


# ------------------------------------------------------------------------------------------------- merge


@dataclass
class MergeResult:
    tables: RunTables
    merged: list[str]  # run directories whose tables were merged
    absent: list[str]  # run directories without summary.json (failed or incomplete): no rows at all


def merge_runs(run_dirs: list[str | os.PathLike]) -> MergeResult:
    """Concatenate the tables of many runs, in the order given.

    A run's ``tables/`` (from ``run-metrics``) is used when present, otherwise its tables are computed
    from the run directory. A run without summary.json contributes no rows and is listed in ``absent``.
    """
    parts: dict[str, list[pd.DataFrame]] = {table: [] for table in TABLE_COLUMNS}
    merged, absent = [], []
    for run_dir in map(Path, run_dirs):
        if not is_complete(run_dir):
            absent.append(str(run_dir))
            continue
        tables_dir = run_dir / "tables"
        if all((tables_dir / f"{t}.csv").is_file() for t in TABLE_COLUMNS):
            tables = read_tables(tables_dir)
        else:
            tables = run_tables(run_dir)
        for table, frame in tables.items():
            if len(frame):
                parts[table].append(frame)
        merged.append(str(run_dir))
    frames = {
        table: _frame([], columns) if not parts[table] else pd.concat(parts[table], ignore_index=True)
        for table, columns in TABLE_COLUMNS.items()
    }
    return MergeResult(tables=RunTables(**frames), merged=merged, absent=absent)


def find_run_dirs(runs_root: str | os.PathLike) -> list[Path]:
    """Run directories under ``<runs_root>/<ablation>/seed<seed>/`` (the pipeline's layout), sorted."""
    root = Path(runs_root)
    return sorted(p for p in root.glob("*/seed*") if p.is_dir())
