"""Wake: the episode's stored teacher is the system *after* the batch's update; replayed rows get DER++'s loss."""

from __future__ import annotations

import torch

from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.ewc import OnlineEWC
from biollm_cls.wake import wake_step


def _system_logits(learner, batch):
    learner.neocortex.eval()
    with torch.no_grad():
        return learner.logits(learner.system_hidden(batch.input_ids, batch.attention_mask)[batch.supervised])


def test_the_stored_teacher_is_the_updated_system(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.experts.fast_lr = 3e-2
    learner = make_learner(cfg)
    batch = ToyStream(cfg).train_batch(1, 8)
    before = _system_logits(learner, batch).topk(cfg.replay.teacher_topk, dim=-1)
    out = wake_step(learner, batch, cfg, OnlineEWC(0.0, 0.9), len(batch), keep_teacher=True)
    after = _system_logits(learner, batch).topk(cfg.replay.teacher_topk, dim=-1)
    assert torch.allclose(out.teacher_values.float(), after.values, atol=1e-2)  # fp16 storage
    assert not torch.allclose(out.teacher_values.float(), before.values, atol=1e-2)  # the update mattered
    # the stored wake loss is the updated system's loss too (the forgetting probe compares against it)
    targets = batch.targets[batch.supervised]
    logits = _system_logits(learner, batch)
    assert abs(out.row_loss.mean().item()
               - torch.nn.functional.cross_entropy(logits, targets).item()) < 0.05


def test_replayed_rows_change_the_update_only_through_their_teacher_when_asked(tiny_cfg, make_learner):
    """replay.wake_distill_weight adds KL(stored || system) on the replayed rows: with weight 0 the stored
    teacher is ignored; with weight > 0 a different teacher gives a different update."""
    cfg = tiny_cfg
    stream = ToyStream(cfg)
    new, old = stream.train_batch(1, 4), stream.train_batch(2, 4)
    from biollm_cls.sleep import concat_batches

    batch = concat_batches(new, old, stream.pad_id)
    n_old = int(old.supervised.sum())
    k = cfg.replay.teacher_topk
    g = torch.Generator().manual_seed(0)
    teachers = [(torch.randn(n_old, k, generator=g), torch.randint(0, cfg.model.vocab_size, (n_old, k), generator=g))
                for _ in range(2)]

    def updated(weight, teacher):
        cfg.replay.wake_distill_weight = weight
        learner = make_learner(cfg)
        wake_step(learner, batch, cfg, OnlineEWC(0.0, 0.9), len(new), keep_teacher=False, replay_teacher=teacher)
        return learner.hippocampus.w_out.detach().clone()

    assert torch.equal(updated(0.0, teachers[0]), updated(0.0, teachers[1]))
    assert not torch.equal(updated(1.0, teachers[0]), updated(1.0, teachers[1]))


def test_full_cls_wake_never_moves_the_base(tiny_cfg, make_learner):
    """The division of labour: in full_cls the base trains only in sleep (its weights keep requires_grad for
    sleep, so this is not true by construction: wake must leave them alone)."""
    cfg = tiny_cfg
    learner = make_learner(cfg)
    assert any(p.requires_grad for p in learner.neocortex.parameters())  # sleep will train it
    before = {k: v.clone() for k, v in learner.neocortex.state_dict().items()}
    stream = ToyStream(cfg)
    for step in range(1, 4):
        wake_step(learner, stream.train_batch(step, 8), cfg, OnlineEWC(1.0, 0.9), 8, keep_teacher=True)
    assert learner.hippocampus.expert_drift.sum() > 0  # the hippocampus did learn
    for k, v in learner.neocortex.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_teacher_resumed_from_the_injection_point_equals_a_full_pass(tiny_cfg, make_learner):
    """Perf path: with a frozen base, the post-update teacher starts from the training pass's injection-point
    state. Same teacher, same row losses, same update as the full second pass."""
    cfg = tiny_cfg
    cfg.experts.fast_lr = 3e-2
    batch = ToyStream(cfg).train_batch(1, 8)
    outs = []
    for can_resume in (True, False):
        learner = make_learner(cfg)
        learner.neocortex.can_resume = can_resume
        calls = _count_full_passes(learner)
        outs.append((wake_step(learner, batch, cfg, OnlineEWC(0.0, 0.9), len(batch), keep_teacher=True), calls[0]))
    (resumed, n_resumed), (full, n_full) = outs
    assert (n_resumed, n_full) == (1, 2)  # the lower layers ran once, not twice
    torch.testing.assert_close(resumed.teacher_values, full.teacher_values)
    assert torch.equal(resumed.teacher_ids, full.teacher_ids)
    torch.testing.assert_close(resumed.row_loss, full.row_loss)


def _count_full_passes(learner) -> list[int]:
    calls, original = [0], learner.neocortex.hidden

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    learner.neocortex.hidden = counted
    return calls


def test_eager_wake_steps_with_the_compiled_losses_follow_the_eager_ones(tiny_cfg, make_learner):
    """`Learner.compiled_losses` (set on CUDA with train.compile_model; forced here on the CPU) in the eager
    wake path, whose number of scored positions changes from step to step: the same losses, teachers and
    hippocampus, without a recompile per size (the compiled functions are shape-dynamic)."""
    from torch._dynamo.utils import counters

    cfg = tiny_cfg
    cfg.experts.fast_lr = 3e-2
    stream = ToyStream(cfg)
    runs = {}
    for compiled in (False, True):
        learner = make_learner(cfg)
        learner.compiled_losses = compiled
        outs, graphs = [], []
        for step, cut in ((1, 0), (2, 3), (3, 7)):  # fewer supervised positions each step
            batch = stream.train_batch(step, 4)
            batch.targets[:, :cut] = -100
            outs.append(wake_step(learner, batch, cfg, OnlineEWC(0.0, 0.9), len(batch), keep_teacher=True))
            graphs.append(counters["stats"]["unique_graphs"])
        runs[compiled] = (outs, learner.hippocampus.w_out.detach().clone())
    assert graphs[0] > 0 and graphs[1] == graphs[2] == graphs[0]  # compiled on the first step only
    for eager, compiled in zip(runs[False][0], runs[True][0], strict=True):
        assert compiled.supervised_tokens == eager.supervised_tokens
        assert abs(compiled.loss - eager.loss) < 1e-5 and abs(compiled.accuracy - eager.accuracy) < 1e-6
        torch.testing.assert_close(compiled.row_loss, eager.row_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(compiled.teacher_values, eager.teacher_values, rtol=1e-3, atol=1e-3)  # fp16
    assert len({o.supervised_tokens for o in runs[False][0]}) == 3  # three sizes really occurred
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-6)
