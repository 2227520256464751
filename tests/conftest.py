"""Shared fixtures of the core unit tests: a tiny run config and a learner built from it.

Configs are built from the schema dataclasses directly (no Hydra compose), so they cost nothing; only
tests/config/ composes presets. Sizes are tiny (vocab 16, width 16, T 8) to keep the suite fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from biollm_cls.config.schema import RunConfig, validate
from biollm_cls.learner import Learner

# The tensors here are tiny: intra-op threads only add synchronisation (on a 2-core runner a [10,8,16]
# LayerNorm takes ~1 ms with 2 threads and ~20 us with 1), so the unit tests run single-threaded.
torch.set_num_threads(1)


def _tiny_config() -> RunConfig:
    cfg = RunConfig()
    cfg.device = "cpu"
    m = cfg.model
    m.vocab_size, m.hidden_size, m.num_layers, m.num_heads, m.seq_len, m.injection_layer = 16, 16, 3, 2, 8, 1
    e = cfg.experts
    e.num_experts, e.expert_hidden, e.top_k = 4, 8, 2
    b = cfg.benchmark
    b.num_tasks, b.switch_every, b.heldout_size = 2, 4, 8
    cfg.replay.capacity, cfg.replay.batch_size, cfg.replay.teacher_topk = 64, 8, 4
    cfg.ewc.fisher_samples = 8
    cfg.train.batch_size, cfg.train.eval_batch_size, cfg.train.progress = 4, 8, False
    cfg.logging.output_dir = "unused"
    return validate(cfg)


@pytest.fixture
def tiny_cfg() -> RunConfig:
    """A fresh, validated tiny config (tests may mutate it)."""
    return _tiny_config()


@pytest.fixture
def make_learner() -> Callable[[RunConfig], Learner]:
    """Build the learner of a config on the CPU, seeded so every test sees the same initial weights."""
    from biollm_cls.train import build_learner

    def make(cfg: RunConfig, seed: int = 0) -> Learner:
        torch.manual_seed(seed)
        return build_learner(cfg, torch.device("cpu"))

    return make


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """W&B tests: wandb's own state (cache, config, artifact staging) in tmp; no mode or key from the outside."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
