"""Continual benchmarks: the toy token stream and instruction streams (JSONL/HF datasets, NI8 packs)."""

from __future__ import annotations

from biollm_cls.benchmarks.base import IGNORE, Batch, ContinualStream, is_boundary, task_at
from biollm_cls.config.schema import RunConfig

__all__ = ["IGNORE", "Batch", "ContinualStream", "build_stream", "is_boundary", "task_at"]


def build_stream(cfg: RunConfig) -> ContinualStream:
    if cfg.benchmark.name == "toy":
        from biollm_cls.benchmarks.toy import ToyStream

        return ToyStream(cfg)
    from biollm_cls.benchmarks.instruction import build_instruction_stream

    return build_instruction_stream(cfg)
