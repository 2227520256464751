"""The suite commands behind ``python -m biollm_cls.cli run-metrics | merge | plots``.

  run-metrics RUN_DIR [--output-dir DIR] [--run-id ID]
      one run's tables: DIR (default RUN_DIR/tables)/{summary,boundary_metrics,task_matrix}.csv
  merge (RUN_DIR ... | --runs-root DIR) --output-dir DIR
      the suite tables: DIR/{suite_summary,boundary_metrics,task_matrix}.csv; runs without summary.json
      (failed or incomplete) are left out and named on stderr
  plots --tables-dir DIR --output-dir DIR [--reference full_cls] [--views system base]
      the suite figures: DIR/{seen_acc_trajectory,final_metrics,paired_deltas,task_matrix}_<view>.png

Exit codes: 0 done, 1 the data cannot be used (a run that did not complete, a malformed file), 2 usage error.
Each error is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2
DATA_ERROR = 1


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (the CLI's convention) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _run(build: Callable[[], argparse.ArgumentParser], body: Callable[[argparse.Namespace], int],
         argv: list[str]) -> int:
    from biollm_cls.suite.tables import TablesError

    try:
        args = build().parse_args(argv)
        return body(args)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except TablesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return DATA_ERROR
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


# ------------------------------------------------------------------------------------------ run-metrics


def _run_metrics_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="biollm-cls run-metrics", description="Continual-metrics tables of one run directory.")
    p.add_argument("run_dir", type=Path, help="a run directory (logging.output_dir of one run)")
    p.add_argument("--output-dir", type=Path, default=None, help="where to write the tables (default RUN_DIR/tables)")
    p.add_argument("--run-id", default=None, help="identifier in the run_id column (default: RUN_DIR as given)")
    return p


def _run_metrics(args: argparse.Namespace) -> int:
    from biollm_cls.suite.tables import run_tables, write_tables

    if not args.run_dir.is_dir():
        raise _UsageError(f"biollm-cls run-metrics: {args.run_dir} is not a directory")
    tables = run_tables(args.run_dir, run_id=args.run_id)
    if tables is None:
        print(f"error: {args.run_dir} has no summary.json (the run failed or is still running); no tables written",
              file=sys.stderr)
        return DATA_ERROR
    output_dir = args.output_dir or args.run_dir / "tables"
    write_tables(tables, output_dir)
    name = tables.summary["run_name"].iloc[0] if len(tables.summary) else args.run_dir
    print(f"run-metrics: {name}: {len(tables.boundary_metrics)} boundary rows, "
          f"{len(tables.task_matrix)} task-matrix rows -> {output_dir}")
    return 0


def run_metrics_main(argv: list[str]) -> int:
    return _run(_run_metrics_parser, _run_metrics, argv)


# ------------------------------------------------------------------------------------------------ merge


def _merge_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="biollm-cls merge", description="Merge run tables into the suite tables.")
    p.add_argument("run_dirs", nargs="*", type=Path, help="run directories, in the order of the suite's rows")
    p.add_argument("--runs-root", type=Path, default=None,
                   help="instead of RUN_DIRs: every <runs-root>/<ablation>/seed<seed>/ directory")
    p.add_argument("--output-dir", type=Path, required=True, help="where to write the suite tables")
    return p


def _merge(args: argparse.Namespace) -> int:
    from biollm_cls.suite.tables import SUITE_FILES, find_run_dirs, merge_runs, write_tables

    if bool(args.run_dirs) == (args.runs_root is not None):
        raise _UsageError("biollm-cls merge: give either RUN_DIRs or --runs-root, not both and not neither")
    if args.runs_root is not None and not args.runs_root.is_dir():
        raise _UsageError(f"biollm-cls merge: --runs-root {args.runs_root} is not a directory")
    run_dirs = args.run_dirs or find_run_dirs(args.runs_root)
    result = merge_runs(run_dirs)
    for run_dir in result.absent:
        print(f"warning: left out {run_dir}: no summary.json (failed or incomplete run)", file=sys.stderr)
    if not result.merged:
        print(f"error: none of the {len(run_dirs)} run directories completed; no suite tables written",
              file=sys.stderr)
        return DATA_ERROR
    write_tables(result.tables, args.output_dir, SUITE_FILES)
    print(f"merge: {len(result.merged)} runs merged, {len(result.absent)} left out -> {args.output_dir}")
    return 0


def merge_main(argv: list[str]) -> int:
    return _run(_merge_parser, _merge, argv)


# ------------------------------------------------------------------------------------------------ plots


def _plots_parser() -> argparse.ArgumentParser:
    from biollm_cls.suite.plots import DEFAULT_REFERENCE
    from biollm_cls.suite.tables import VIEWS

    p = _Parser(prog="biollm-cls plots", description="Suite figures (PNG) from the merged suite tables.")
    p.add_argument("--tables-dir", type=Path, required=True, help="directory holding the merge command's CSVs")
    p.add_argument("--output-dir", type=Path, required=True, help="where to write the PNG files")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help=f"ablation the paired per-seed deltas are taken against (default {DEFAULT_REFERENCE})")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS), help="views to plot (default: both)")
    return p


def _plots(args: argparse.Namespace) -> int:
    from biollm_cls.suite.plots import plot_suite

    if not args.tables_dir.is_dir():
        raise _UsageError(f"biollm-cls plots: --tables-dir {args.tables_dir} is not a directory")
    written = plot_suite(args.tables_dir, args.output_dir, views=args.views, reference=args.reference)
    print(f"plots: {len(written)} figures -> {args.output_dir}")
    return 0


def plots_main(argv: list[str]) -> int:
    return _run(_plots_parser, _plots, argv)
