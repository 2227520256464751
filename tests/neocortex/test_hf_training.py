"""The learner's training paths on Hugging Face neocortices of five layouts (CPU, tiny random-init models).

Each model is built from a config, saved to a temporary directory once per module and loaded back through
``build_learner`` -> ``build_neocortex`` (the real ``from_pretrained`` path). A wake step, a sleep cycle
and an expert refresh then run through the library's own functions; the two ablations that change what
wake trains (``no_hippocampus`` and ``wake_base_lr_scale > 0``) run too, and a short ``run_training`` on the
toy benchmark checks the split facts recorded in ``run_metadata.json``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from tiny_hf_configs import tiny_configs
from transformers import AutoModelForCausalLM

from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.config import load_config
from biollm_cls.ewc import OnlineEWC
from biollm_cls.refresh import refresh_experts
from biollm_cls.replay import ReservoirReplay, episodes_from_batch
from biollm_cls.sleep import sleep_cycle
from biollm_cls.train import build_learner, run_training
from biollm_cls.wake import wake_step

V_MODEL, H, L = 96, 32, 4  # the saved models; runs cap the active vocabulary at V below
V, T, B = 40, 8, 4
CPU = torch.device("cpu")
CONFIGS = tiny_configs(V_MODEL, H, L)
ARCHS = list(CONFIGS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_train_models")
    dirs = {}
    for name, make in CONFIGS.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make()).save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _overrides(model_dir: Path, *extra: str) -> list[str]:
    return [
        "model=hf_causal_lm", f"model.hf_model_name={model_dir}", "model.hf_local_files_only=true",
        f"model.vocab_size={V}", f"model.seq_len={T}", "model.hf_injection_fraction=0.5",
        "benchmark.num_tasks=2", "benchmark.switch_every=3", "benchmark.heldout_size=4",
        f"train.batch_size={B}", "train.eval_batch_size=4", "train.progress=false", "device=cpu",
        "experts.num_experts=4", "experts.expert_hidden=8", "experts.top_k=2",
        f"replay.batch_size={B}", "replay.teacher_topk=4", "ewc.fisher_samples=4",
        "consolidation.refresh.samples_per_expert=2", *extra,
    ]


class Setup:
    """A learner over one saved model, its toy stream, an empty replay and an EWC state."""

    def __init__(self, model_dir: Path, *extra: str):
        self.cfg = load_config(_overrides(model_dir, *extra))
        torch.manual_seed(0)
        self.learner = build_learner(self.cfg, CPU)
        self.stream = ToyStream(self.cfg)
        self.replay = ReservoirReplay(self.cfg.replay.capacity, 1)
        self.ewc = OnlineEWC(self.cfg.ewc.lambda_, self.cfg.ewc.fisher_decay)
        self.generator = torch.Generator().manual_seed(7)

    def wake(self, step: int = 1):
        batch = self.stream.train_batch(step, B)
        out = wake_step(self.learner, batch, self.cfg, self.ewc, stream_rows=B, keep_teacher=True)
        for episode in episodes_from_batch(batch, step, out.expert_ids, out.expert_weights, out.row_loss,
                                           out.teacher_values, out.teacher_ids):
            self.replay.add(episode)
        return out

    def sleep(self, steps: int = 2):
        return sleep_cycle(self.learner, self.replay, self.ewc, steps, self.cfg, self.stream.pad_id,
                           self.stream.vocab_size, self.generator)


def _snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _changed(module: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


@pytest.mark.parametrize("arch", ARCHS)
def test_wake_sleep_refresh_on_every_layout(model_dirs, arch):
    s = Setup(model_dirs[arch], "consolidation.refresh.kl_threshold=1e9")  # every tested expert is absorbed
    learner = s.learner
    assert learner.neocortex.runtime_info()["hf_injection_mode"] == "decoder_split"
    assert learner.neocortex.vocab_size == V
    base, hip = _snapshot(learner.neocortex), _snapshot(learner.hippocampus)

    # wake: the hippocampus learns through the frozen upper layers; the base is neither moved nor given grads
    outcomes = [s.wake(step) for step in (1, 2)]
    assert all(o.applied and o.loss == o.loss for o in outcomes)
    assert outcomes[0].teacher_values.shape == (int(s.stream.train_batch(1, B).supervised.sum()), 4)
    assert _changed(learner.hippocampus, hip)
    assert learner.hippocampus.w_out.abs().sum() > 0  # the zero-initialised output layer learned
    assert not _changed(learner.neocortex, base)
    assert all(p.grad is None for p in learner.neocortex.parameters())
    assert all(p.requires_grad for p in learner.neocortex.parameters())  # sleep still trains the base
    assert len(s.replay) == 2 * B

    # sleep: the base moves, the hippocampus does not, and the Fisher is estimated at the end
    hip = _snapshot(learner.hippocampus)
    report = s.sleep(steps=2)
    assert report.steps == 2 and report.skipped_steps == 0
    assert report.distill_kl == report.distill_kl and report.distill_kl >= 0.0
    assert report.pseudo_batch_size >= 1  # pseudo-rehearsal is on by default
    assert _changed(learner.neocortex, base)
    assert not _changed(learner.hippocampus, hip)
    assert s.ewc.active and report.fisher_replay_samples > 0
    assert set(s.ewc.fisher) == {n for n, p in learner.neocortex.named_parameters() if p.requires_grad}

    # a second sleep runs with the EWC penalty active
    assert s.sleep(steps=1).steps == 1

    # refresh: every expert with routed episodes is tested in one batch; all are absorbed at this threshold
    refresh = refresh_experts(learner, s.replay, s.cfg, s.stream.pad_id)
    assert refresh.tested >= 1 and refresh.refresh_count == refresh.tested
    assert all(kl == kl and kl >= -1e-6 for kl in refresh.expert_kl.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_hippocampus_ablation_trains_the_base_in_wake(model_dirs, arch):
    s = Setup(model_dirs[arch], "train.ablation_disable_hippocampus=true", "consolidation.wake_base_lr_scale=1.0",
              "consolidation.pseudo_rehearsal=false", "consolidation.target_ce_weight=1.0")
    assert s.learner.hippocampus is None and s.learner.fast_optimizer is None
    base = _snapshot(s.learner.neocortex)
    out = s.wake()
    assert out.applied and out.expert_ids is None
    assert _changed(s.learner.neocortex, base)
    report = s.sleep(steps=2)
    assert report.steps == 2 and report.target_ce > 0
    assert refresh_experts(s.learner, s.replay, s.cfg, s.stream.pad_id).tested == 0  # nothing to refresh


@pytest.mark.parametrize("arch", ["qwen2", "opt"])
def test_wake_base_lr_scale_trains_base_and_hippocampus_together(model_dirs, arch):
    s = Setup(model_dirs[arch], "consolidation.wake_base_lr_scale=0.5")
    base, hip = _snapshot(s.learner.neocortex), _snapshot(s.learner.hippocampus)
    out = s.wake()
    assert out.applied
    assert _changed(s.learner.neocortex, base) and _changed(s.learner.hippocampus, hip)
    assert s.sleep(steps=1).steps == 1
    base = _snapshot(s.learner.neocortex)
    s.wake(step=2)  # a wake step with the EWC penalty active (the Fisher exists after the sleep)
    assert s.ewc.active and _changed(s.learner.neocortex, base)


def test_run_training_on_toy_records_the_split(model_dirs, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(_overrides(
        model_dirs["qwen2"], f"logging.output_dir={out}", "consolidation.sleep_min_interval=1",
        "consolidation.sleep_max_interval=2", "consolidation.min_sleep_steps=1", "consolidation.max_sleep_steps=1",
    ))
    summary = run_training(cfg)
    assert summary["counters"]["sleep_count"] >= 1
    assert summary["run"]["steps"] == 6
    meta = json.loads((out / "run_metadata.json").read_text())
    neo = meta["neocortex"]
    assert neo["hf_injection_mode"] == "decoder_split"
    assert neo["hf_injection_layer_idx"] == 1  # round(4 * 0.5) - 1
    assert neo["hf_num_decoder_layers"] == L
    assert neo["hf_injection_fraction"] == 0.5
    assert neo["hf_vocab_size"] == V
    assert (out / "summary.json").exists()
    first = json.loads((out / "metrics.jsonl").open().readline())  # logged at step 0 as well
    assert first["kind"] == "runtime" and first["step"] == 0
    assert first["hf_injection_mode"] == "decoder_split" and first["hf_injection_layer_idx"] == 1


@pytest.mark.parametrize(("arch", "checkpointing"), [("llama", False), ("gpt2", False), ("qwen2", True)])
def test_frozen_base_wake_learns_exactly_what_the_tracked_base_wake_learns(model_dirs, arch, checkpointing,
                                                                          monkeypatch):
    """Wake freezes a base that only sleep trains (no weight gradients): the hippocampus update is unchanged."""
    extra = [f"model.hf_gradient_checkpointing={str(checkpointing).lower()}"]
    frozen = Setup(model_dirs[arch], *extra)
    out_frozen = [frozen.wake(step) for step in (1, 2)]
    monkeypatch.setattr(type(frozen.learner), "frozen_base", lambda self: contextlib.nullcontext())
    tracked = Setup(model_dirs[arch], *extra)  # the same seed: identical initial weights
    out_tracked = [tracked.wake(step) for step in (1, 2)]
    assert any(p.grad is not None for p in tracked.learner.neocortex.parameters())  # the waste that was avoided
    for a, b in zip(frozen.learner.hippocampus.parameters(), tracked.learner.hippocampus.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(out_frozen, out_tracked, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        torch.testing.assert_close(a.teacher_values, b.teacher_values)
