"""Pretraining the tiny base: it learns, checkpoints round-trip, and a mismatching shape is refused clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from biollm_cls.benchmarks.packs.builder import BuildOptions, build_pack
from biollm_cls.benchmarks.packs.synthetic import open_synthetic
from biollm_cls.config import load_config
from biollm_cls.config.schema import ConfigError
from biollm_cls.neocortex import build_neocortex, full_logits
from biollm_cls.neocortex.pretrain import load_base_checkpoint, main, pretrain_base, save_base_checkpoint

SHAPE = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.injection_layer=0",
         "model.seq_len=64", "model.vocab_size=0"]


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "pack"
    options = BuildOptions(min_usable_per_task=12, train_per_task=8, eval_per_task=4, include_definition=False)
    build_pack(open_synthetic(12, 42, 60), out, options, progress=False)
    return out


def test_pretraining_lowers_the_loss_and_checkpoint_round_trips(pack: Path, tmp_path: Path):
    cfg = load_config(SHAPE)
    model, stats = pretrain_base(cfg, pack, steps=30, batch_size=8, lr=3e-3, progress=False)
    assert stats.loss_final < stats.loss_first
    assert stats.model["vocab_size"] == 258 and 0.0 <= stats.heldout_token_acc <= 1.0
    path = tmp_path / "base.pt"
    save_base_checkpoint(model, cfg.model.__class__(**stats.model), path)
    ckpt = torch.load(path, weights_only=True)  # safe load works
    assert ckpt["tokenizer"]["kind"] == "bytes"
    run_cfg = load_config([*SHAPE[:-1], "model.vocab_size=258", f"model.init_checkpoint={path}"])
    loaded = build_neocortex(run_cfg.model, torch.device("cpu")).eval()
    ids = torch.randint(0, 256, (2, 10))
    assert torch.allclose(full_logits(loaded, ids), full_logits(model, ids))


def test_mismatching_shape_names_the_keys(pack: Path, tmp_path: Path):
    cfg = load_config(SHAPE)
    model, stats = pretrain_base(cfg, pack, steps=2, batch_size=4, progress=False)
    path = tmp_path / "base.pt"
    save_base_checkpoint(model, cfg.model.__class__(**stats.model), path)
    from biollm_cls.neocortex.tiny import TinyNeocortex

    other = load_config([*SHAPE[:-1], "model.vocab_size=258", "model.hidden_size=64"]).model
    with pytest.raises(ConfigError, match=r"model.hidden_size: checkpoint 32 vs run 64") as info:
        load_base_checkpoint(TinyNeocortex(other), path)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_base_checkpoint(model, tmp_path / "missing.pt")


def test_cli_writes_checkpoint_and_stats(pack: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "ckpt" / "base.pt"
    assert main(["--pack-dir", str(pack), "--output", str(out), "--steps", "3", "--batch-size", "4",
                 "--no-progress", *SHAPE[:-1]]) == 0  # model.vocab_size defaults to the tokenizer's
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["steps"] == 3 and stats["model"]["hidden_size"] == 32 and stats["wall_time_s"] > 0
    assert main(["--pack-dir", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
