"""Command line: ``python -m biollm_cls.cli <command> [...]``.

Commands:
  train [group=preset ...] [dotted.key=value ...]   run one continual-learning run
  show-config [overrides] [--flat]                  print the resolved config (YAML, or dotted keys)
  check-device [--require-cuda]                     JSON facts about the accelerator (exit 1: CUDA required but absent)
  build-pack ...                                    build a data pack (NI8, local NI tasks, JSONL, synthetic)
  pretrain ...                                      pretrain the tiny neocortex on a pack's pretrain.jsonl
  run-metrics / merge / plots ...                   suite tables and figures (used by the Snakemake pipeline)
  publish-dashboard ...                             publish a suite's CSVs and plots to one W&B analysis run

Usage errors print one line and exit with code 2.
"""

from __future__ import annotations

import importlib
import json
import sys

USAGE_ERROR = 2

# command -> (module, function taking argv). Imported lazily so `show-config` stays fast.
_DELEGATED = {
    "build-pack": ("biollm_cls.benchmarks.packs.cli", "main"),
    "pretrain": ("biollm_cls.neocortex.pretrain", "main"),
    "run-metrics": ("biollm_cls.suite.cli", "run_metrics_main"),
    "merge": ("biollm_cls.suite.cli", "merge_main"),
    "plots": ("biollm_cls.suite.cli", "plots_main"),
    "publish-dashboard": ("biollm_cls.suite.dashboard", "main"),
}


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _train(argv: list[str]) -> int:
    from biollm_cls.config import ConfigError, load_config

    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        return _fail(str(exc))
    from biollm_cls.benchmarks.errors import DataError
    from biollm_cls.train import RunError, run_training

    try:
        summary = run_training(cfg)
    except (ConfigError, DataError, RunError) as exc:
        return _fail(str(exc))
    print(json.dumps(summary["views"], indent=2))
    return 0


def _show_config(argv: list[str]) -> int:
    from biollm_cls.config import ConfigError, flatten, load_config, to_dict, to_yaml

    flat = "--flat" in argv
    try:
        cfg = load_config([a for a in argv if a != "--flat"])
    except ConfigError as exc:
        return _fail(str(exc))
    if flat:
        for key, value in flatten(to_dict(cfg)).items():
            print(f"{key}: {json.dumps(value)}")
    else:
        print(to_yaml(cfg), end="")
    return 0


def _check_device(argv: list[str]) -> int:
    from biollm_cls.device import device_facts

    facts = device_facts()
    print(json.dumps(facts, indent=2))
    if "--require-cuda" in argv and not facts["cuda_available"]:
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["train", "show-config", "check-device", *_DELEGATED]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else USAGE_ERROR
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "show-config":
        return _show_config(rest)
    if command == "check-device":
        return _check_device(rest)
    if command in _DELEGATED:
        module, func = _DELEGATED[command]
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    return _fail(f"unknown command {command!r}; choose one of: {', '.join(commands)}")


if __name__ == "__main__":
    sys.exit(main())
