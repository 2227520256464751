"""``python -m biollm_cls.cli build-pack ...``: build a continual instruction pack.

Examples:
  build-pack --source synthetic --output-dir results/data/synthetic8
  build-pack --source ni-tasks --path ../shared/ni-sample/tasks --output-dir D \\
      --min-usable-per-task 100 --train-per-task 50 --eval-per-task 20
  build-pack --source hf --output-dir data/ni8            # Muennighoff/natural-instructions, NI8

Usage errors exit 2 (argparse); data errors print one line ``error: ...`` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.packs.builder import BuildOptions, build_pack
from biollm_cls.benchmarks.packs.sources import Source, open_hf, open_jsonl, open_ni_tasks
from biollm_cls.benchmarks.packs.synthetic import open_synthetic

USAGE_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biollm-cls build-pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, choices=("hf", "ni-tasks", "jsonl", "synthetic"))
    p.add_argument("--path", type=Path, help="ni-tasks: folder of task files; jsonl: the file")
    p.add_argument("--dataset-name", default="Muennighoff/natural-instructions", help="hf: dataset id")
    p.add_argument("--dataset-config", default=None, help="hf: dataset config name")
    p.add_argument("--split", default="train", help="hf: split to read")
    p.add_argument("--output-dir", required=True, type=Path)
    p.add_argument("--num-tasks", type=int, default=8)
    p.add_argument("--task-selection-seed", type=int, default=42,
                   help="seeds task selection, the per-task shuffles and (synthetic) generation")
    p.add_argument("--min-usable-per-task", type=int, default=700,
                   help="tasks need this many distinct instructions (synthetic: rows generated per task)")
    p.add_argument("--train-per-task", type=int, default=500)
    p.add_argument("--eval-per-task", type=int, default=200)
    p.add_argument("--include-definition", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend the task definition to each instruction (default: on; synthetic: off, "
                        "its prompts carry a one-line instruction and the definition goes to metadata.json)")
    p.add_argument("--pretrain-per-task", type=int, default=2000,
                   help="synthetic: rows of each pretraining family in pretrain.jsonl (0: no pretrain.jsonl)")
    p.add_argument("--verification-mode", choices=("auto", "strict", "no_checks"), default="auto",
                   help="hf: datasets verification (auto: strict, retried without checks on ExpectedMoreSplitsError)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar over rows (default: only when stderr is a TTY)")
    return p


def open_source(args: argparse.Namespace) -> Source:
    if args.source == "synthetic":
        rows = max(args.min_usable_per_task, args.train_per_task + args.eval_per_task)
        return open_synthetic(rows, args.task_selection_seed, args.pretrain_per_task)
    if args.source == "hf":
        return open_hf(args.dataset_name, args.dataset_config, args.split, args.verification_mode)
    if args.path is None:
        raise DataError(f"--source {args.source} needs --path "
                        f"{'DIR (the tasks/ folder of natural-instructions)' if args.source == 'ni-tasks' else 'FILE.jsonl'}")
    return open_ni_tasks(args.path) if args.source == "ni-tasks" else open_jsonl(args.path)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    include = args.include_definition if args.include_definition is not None else args.source != "synthetic"
    options = BuildOptions(args.num_tasks, args.task_selection_seed, args.min_usable_per_task,
                           args.train_per_task, args.eval_per_task, include)
    try:
        options.check()
        metadata = build_pack(open_source(args), args.output_dir, options, args.progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    summary = {k: metadata[k] for k in ("selected_tasks", "totals", "checksums")}
    print(json.dumps({"output_dir": str(args.output_dir), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
