"""Captured steps (step_graphs.py, ``train.cuda_graphs``): the graph mechanics and captured sleep steps against
eager ones. Everything but the CPU refusal needs a CUDA device (skipped without one; run on the GPU machine)."""

from __future__ import annotations

import copy

import pytest
import torch

from biollm_cls.benchmarks.base import IGNORE, Batch
from biollm_cls.ewc import OnlineEWC
from biollm_cls.sleep import sleep_step
from biollm_cls.step_graphs import StepGraphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_step_graphs_refuse_a_cpu_device():
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(torch.device("cpu"))


@cuda
def test_a_step_is_eager_while_warming_up_then_captured_and_replayed():
    graphs = StepGraphs(torch.device("cuda"), warmup=2)
    total = torch.zeros((), device="cuda")  # state kept across steps: updated in place by every replay

    def step(x):
        total.add_(x["v"].sum())
        return (x["v"] * 2,)

    outs = [graphs.run("k", step, {"v": torch.full((3,), float(i), device="cuda")})[0].clone() for i in range(5)]
    assert graphs.stats() == {"graphs": 1, "captures": 1, "replays": 3, "eager_steps": 2}
    assert [o.tolist() for o in outs] == [[2.0 * i] * 3 for i in range(5)]
    assert total.item() == 3 * sum(range(5))  # the capture itself ran nothing; its replay did
    graphs.run("k", step, {"v": torch.ones(4, device="cuda")})  # another shape is another key: eager again
    assert graphs.stats()["eager_steps"] == 3
    graphs.invalidate()
    assert len(graphs) == 0


@cuda
def test_a_capture_leaves_its_pool_empty_for_the_next_one():
    """Outputs go to buffers outside the pool: a later capture reuses the whole pool (step_graphs' Memory note)."""
    graphs = StepGraphs(torch.device("cuda"), warmup=1)
    big = 16 << 20  # 64 MB of fp32 temporaries per step

    def step(x):
        tmp = x["v"].repeat(big // 4)  # (big,) a temporary inside the graph
        return (tmp.sum().reshape(1), tmp[:4] * 2)

    inputs = {"v": torch.ones(4, device="cuda")}
    for _ in range(3):
        out = graphs.run("a", step, inputs)
    reserved, allocated = graphs.pool_bytes()
    assert allocated == 0 and reserved >= 4 * big
    assert out[0].item() == big and out[1].tolist() == [2.0] * 4
    for _ in range(3):
        graphs.run("b", step, {"v": torch.full((4,), 3.0, device="cuda")})
    assert graphs.pool_bytes() == (reserved, 0)  # the second graph fit in the first one's free pool
    assert out[1].tolist() == [2.0] * 4  # and its replays left the first graph's outputs alone


def _sleep_setup(tiny_cfg, graphs: bool, fisher_dtype: torch.dtype = torch.float32, compiled_losses=False):
    from biollm_cls.train import build_learner

    cfg = tiny_cfg
    cfg.device, cfg.train.amp_enabled, cfg.train.cuda_graphs = "cuda", False, graphs
    cfg.consolidation.target_ce_weight, cfg.consolidation.slow_lr = 0.5, 1e-2
    torch.manual_seed(0)
    learner = build_learner(cfg, torch.device("cuda"))
    learner.compiled_losses = compiled_losses  # what train.compile_model sets on CUDA (token_losses.py)
    g = torch.Generator().manual_seed(1)
    B, T, V, k = 6, cfg.model.seq_len, cfg.model.vocab_size, cfg.replay.teacher_topk
    batches = []
    for _ in range(2):
        ids = torch.randint(0, V, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, 5:] = mask[4, 3:] = False  # right padding: no teacher and no target there
        targets = torch.where(mask, torch.randint(0, V, (B, T), generator=g), IGNORE)
        n = int(mask.sum())
        teacher = (torch.randn(n, k, generator=g), torch.randint(0, V, (n, k), generator=g).int())
        batches.append((Batch(ids, targets, mask, torch.zeros(B, dtype=torch.long)).to("cuda"),
                        *(t.to("cuda") for t in teacher)))
    ewc = OnlineEWC(1.0, 0.9, fisher_dtype)  # active, so the captured step includes the penalty pass
    ewc.consolidate(learner.neocortex, [batches[0][0]], learner.base_hidden, learner.logits,
                    learner.precision.autocast, torch.Generator().manual_seed(2))
    return cfg, learner, batches, ewc


@cuda
@pytest.mark.parametrize(("fisher_dtype", "compiled_losses"),  # fp8: per-row scales on CUDA
                         [(torch.float32, False), (torch.float8_e4m3fn, False), (torch.float32, True)])
def test_captured_sleep_steps_match_eager_ones(tiny_cfg, fisher_dtype, compiled_losses):
    runs = {}
    for graphs in (False, True):
        cfg, learner, batches, ewc = _sleep_setup(copy.deepcopy(tiny_cfg), graphs, fisher_dtype, compiled_losses)
        initial = {k: v.clone() for k, v in learner.neocortex.state_dict().items()}
        losses = []
        for i in range(6):
            batch, values, ids = batches[i % 2]
            distill, ce, applied = sleep_step(learner, batch, values, ids, 4, cfg, ewc)
            assert bool(applied)
            losses.append((distill.item(), ce.item()))
        runs[graphs] = (losses, {k: v.clone() for k, v in learner.neocortex.state_dict().items()}, learner)
    assert runs[True][2].graphs.stats() == {"graphs": 1, "captures": 1, "replays": 4, "eager_steps": 2}
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4, abs=1e-6)
    for name, eager in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], eager, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(runs[True][1][n], v) for n, v in initial.items())  # it did learn


@cuda
def test_a_captured_sleep_step_skips_a_non_finite_update_and_a_new_ewc_state_recaptures(tiny_cfg):
    cfg, learner, batches, ewc = _sleep_setup(tiny_cfg, graphs=True)
    batch, values, ids = batches[0]
    for _ in range(3):  # two eager warm-up steps, then the capture
        sleep_step(learner, batch, values, ids, 4, cfg, ewc)
    before = {k: v.clone() for k, v in learner.neocortex.state_dict().items()}
    steps_before = [s["step"].clone() for s in learner.base_optimizer.state.values()]
    bad = values.clone()
    bad[0, 0] = float("nan")
    distill, _, applied = sleep_step(learner, batch, bad, ids, 4, cfg, ewc)
    assert learner.graphs.stats()["replays"] == 2
    assert not bool(applied) and not torch.isfinite(distill)
    for k, v in learner.neocortex.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(s["step"], b) for s, b in zip(learner.base_optimizer.state.values(), steps_before,
                                                         strict=True))
    distill, _, applied = sleep_step(learner, batch, values, ids, 4, cfg, ewc)
    assert bool(applied) and torch.isfinite(distill)
    ewc.consolidate(learner.neocortex, [batch], learner.base_hidden, learner.logits, learner.precision.autocast,
                    torch.Generator().manual_seed(3))  # new Fisher and anchor tensors: the old graph is stale
    sleep_step(learner, batch, values, ids, 4, cfg, ewc)
    assert learner.graphs.stats()["graphs"] == 1 and learner.graphs.stats()["eager_steps"] == 3


@cuda
@pytest.mark.parametrize(("keep_teacher", "compiled_losses"), [(True, False), (False, False), (True, True)])
def test_captured_wake_steps_match_eager_ones(tiny_cfg, keep_teacher, compiled_losses):
    from biollm_cls.benchmarks.toy import ToyStream
    from biollm_cls.train import build_learner
    from biollm_cls.wake import wake_step

    runs = {}
    for graphs in (False, True):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.device, cfg.train.amp_enabled, cfg.train.cuda_graphs = "cuda", False, graphs
        cfg.experts.fast_lr, cfg.replay.wake_distill_weight = 3e-2, 0.5
        torch.manual_seed(0)
        learner = build_learner(cfg, torch.device("cuda"))
        learner.compiled_losses = compiled_losses  # the compiled head losses inside the captured step too
        stream, ewc = ToyStream(cfg), OnlineEWC(0.0, 0.9)
        outs = []
        for step in range(1, 7):
            batch = stream.train_batch(step, cfg.train.batch_size)
            batch.targets[0, :3] = IGNORE  # rows with fewer supervised positions than T
            n_replay = int(batch.supervised[2:].sum())  # rows 2.. play the replayed rows, with a stored teacher
            teacher = (torch.randn(n_replay, cfg.replay.teacher_topk),
                       torch.randint(0, cfg.model.vocab_size, (n_replay, cfg.replay.teacher_topk)).int())
            out = wake_step(learner, batch.to("cuda"), cfg, ewc, 2, keep_teacher,
                            tuple(t.to("cuda") for t in teacher))
            outs.append(out)
        runs[graphs] = (outs, {k: v.clone() for k, v in learner.hippocampus.state_dict().items()}, learner)
    assert runs[True][2].graphs.stats()["replays"] == 4
    for eager, captured in zip(runs[False][0], runs[True][0], strict=True):
        assert captured.applied and eager.applied
        for field in ("loss", "accuracy", "reward_mult", "routing_reg"):
            assert getattr(captured, field) == pytest.approx(getattr(eager, field), rel=1e-4, abs=1e-6), field
        assert captured.supervised_tokens == eager.supervised_tokens
        for field in ("row_loss", "expert_ids", "expert_weights", "expert_share", "teacher_values", "teacher_ids"):
            a, b = getattr(captured, field), getattr(eager, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.shape == b.shape and a.device.type == "cpu", field
                torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3, msg=field)
    for name, eager in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], eager, rtol=1e-4, atol=1e-5, msg=name)
