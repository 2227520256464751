"""Fixtures of the benchmark tests: config building, JSONL writing and a small synthetic pack."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from biollm_cls.benchmarks.packs.builder import BuildOptions, build_pack
from biollm_cls.benchmarks.packs.synthetic import open_synthetic
from biollm_cls.config import load_config
from biollm_cls.config.schema import RunConfig


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def instruction_cfg(*overrides: str) -> RunConfig:
    """A tiny-model instruction config (byte tokenizer); later overrides win."""
    base = ["benchmark=instruction", "model.vocab_size=0", "model.seq_len=64", "benchmark.switch_every=5",
            "benchmark.min_examples_per_task=1", "benchmark.heldout_per_task=4"]
    return load_config([*base, *overrides])


@pytest.fixture
def make_cfg() -> Callable[..., RunConfig]:
    return instruction_cfg


@pytest.fixture
def jsonl() -> Callable[[Path, list[dict]], Path]:
    return write_jsonl


@pytest.fixture(scope="session")
def synthetic_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic pack: 8 tasks x (24 train + 8 eval), 40 pretrain rows per family."""
    out = tmp_path_factory.mktemp("packs") / "synthetic"
    options = BuildOptions(num_tasks=8, min_usable_per_task=32, train_per_task=24, eval_per_task=8,
                           include_definition=False)
    build_pack(open_synthetic(32, options.task_selection_seed, 40), out, options, progress=False)
    return out
