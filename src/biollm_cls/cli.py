"""Command line: ``python -m biollm_cls.cli <command> [...]``.

Commands:
  train [--restart-stale] [group=preset ...] [dotted.key=value ...]
                                                    run one continual-learning run; the same command on
                                                    the same output dir resumes it. --restart-stale: a dir
                                                    it cannot resume (another config, library or input,
                                                    a completed run) is deleted and the run starts over
  show-config [overrides] [--flat]                  print the resolved config (YAML, or dotted keys)
  check-device [--require-cuda]                     JSON facts about the accelerator (exit 1: CUDA required but absent)
  build-pack ...                                    build a data pack (NI8, local NI tasks, JSONL, synthetic)
  pretrain ...                                      pretrain the tiny neocortex on a pack's pretrain.jsonl
  run-metrics / merge / plots ...                   suite tables and figures (used by the Snakemake pipeline)
  write-results --suite DIR ... --output FILE       docs/results.md: every ablation paired per seed vs a reference
  publish-dashboard ...                             publish a suite's CSVs and plots to one W&B analysis run

Usage errors, bad configs, bad data and refused writes print one line ``error: ...`` (naming the problem
and the fix) on stderr and exit with code 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import sys
from collections.abc import Iterator

USAGE_ERROR = 2

# command -> (module, function taking argv). Imported lazily so `show-config` stays fast.
_DELEGATED = {
    "build-pack": ("biollm_cls.benchmarks.packs.cli", "main"),
    "pretrain": ("biollm_cls.neocortex.pretrain", "main"),
    "run-metrics": ("biollm_cls.suite.cli", "run_metrics_main"),
    "merge": ("biollm_cls.suite.cli", "merge_main"),
    "plots": ("biollm_cls.suite.cli", "plots_main"),
    "write-results": ("biollm_cls.suite.results_doc", "main"),
    "publish-dashboard": ("biollm_cls.suite.dashboard", "main"),
}


def _fail(message: str) -> int:
    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "unknown error")
    print(f"error: {first}", file=sys.stderr)
    return USAGE_ERROR


def _os_error(exc: OSError) -> str:
    """One line for an OSError that no layer below turned into a message of its own."""
    what = f" {exc.filename}" if exc.filename else ""
    code = f" ({errno.errorcode[exc.errno]})" if exc.errno in errno.errorcode else ""
    fix = ("free space on that filesystem (or write elsewhere)" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
           else "check that the path exists and is readable/writable")
    return f"cannot access{what}: {exc.strerror or exc}{code}; {fix}, then rerun the same command"


def _expected_errors() -> tuple[type[BaseException], ...]:
    from biollm_cls.benchmarks.errors import DataError
    from biollm_cls.checkpoint import CheckpointError
    from biollm_cls.config import ConfigError
    from biollm_cls.run_io import OutputWriteError

    return ConfigError, DataError, OutputWriteError, CheckpointError


def _train(argv: list[str]) -> int:
    from biollm_cls.config import ConfigError, load_config

    restart_stale = "--restart-stale" in argv
    argv = [a for a in argv if a != "--restart-stale"]
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        return _fail(str(exc))
    from biollm_cls.train import RunError, run_training

    try:
        summary = run_training(cfg, restart_stale=restart_stale)
    except (*_expected_errors(), RunError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(_os_error(exc))
    print(json.dumps(summary["views"], indent=2))
    return 0


@contextlib.contextmanager
def _one_line_usage_errors(command: str) -> Iterator[None]:
    """argparse prints its usage block before the error; the delegated commands print one line instead."""
    original = argparse.ArgumentParser.error

    def error(self: argparse.ArgumentParser, message: str) -> None:
        self.exit(USAGE_ERROR, f"error: {message} (see `python -m biollm_cls.cli {command} --help`)\n")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _delegate(command: str, argv: list[str]) -> int:
    module, func = _DELEGATED[command]
    with _one_line_usage_errors(command):
        try:
            return int(getattr(importlib.import_module(module), func)(argv) or 0)
        except _expected_errors() as exc:
            return _fail(str(exc))
        except OSError as exc:
            return _fail(_os_error(exc))


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
        return _delegate(command, rest)
    return _fail(f"unknown command {command!r}; choose one of: {', '.join(commands)}")


if __name__ == "__main__":
    sys.exit(main())
