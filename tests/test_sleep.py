"""Sleep: pseudo-rehearsal counts, top-k distillation KL, one sleep step, and a whole cycle on a toy setup."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.config.schema import RunConfig
from biollm_cls.ewc import OnlineEWC
from biollm_cls.replay import ReservoirReplay, collate, episodes_from_batch
from biollm_cls.sleep import (
    build_sleep_batch,
    pseudo_counts,
    random_prompts,
    sleep_cycle,
    sleep_step,
    system_topk,
    topk_kl,
)
from biollm_cls.wake import wake_step


def cfg_with(source="mixed", ratio=0.25, frac=0.5, rehearsal=True) -> RunConfig:
    cfg = RunConfig()
    c = cfg.consolidation
    c.pseudo_source, c.pseudo_ratio, c.pseudo_random_fraction, c.pseudo_rehearsal = source, ratio, frac, rehearsal
    return cfg


# (replay count R, expected (n_echo, n_random)) with ratio 0.25: P = max(1, round(R / 4))
@pytest.mark.parametrize(("source", "frac", "cases"), [
    ("replay_echo", 0.5, {1: (1, 0), 3: (1, 0), 7: (2, 0), 13: (3, 0), 32: (8, 0)}),
    ("random_tokens", 0.5, {1: (0, 1), 3: (0, 1), 7: (0, 2), 13: (0, 3), 32: (0, 8)}),
    # mixed: n_rand = round(P * frac), at least one of each when P >= 2
    ("mixed", 0.5, {1: (1, 0), 7: (1, 1), 13: (1, 2), 32: (4, 4)}),
    ("mixed", 0.0, {1: (1, 0), 7: (1, 1), 32: (7, 1)}),
    ("mixed", 1.0, {1: (0, 1), 7: (1, 1), 32: (1, 7)}),
    ("mixed", 0.25, {32: (6, 2), 13: (2, 1)}),
])
def test_pseudo_counts(source, frac, cases):
    cfg = cfg_with(source=source, frac=frac)
    for replay_count, expected in cases.items():
        assert pseudo_counts(replay_count, cfg) == expected, replay_count


def test_pseudo_counts_off_and_empty():
    assert pseudo_counts(32, cfg_with(rehearsal=False)) == (0, 0)
    assert pseudo_counts(0, cfg_with()) == (0, 0)
    assert pseudo_counts(32, cfg_with(ratio=0.5, frac=0.25)) == (12, 4)  # P = 16
    assert pseudo_counts(32, cfg_with(ratio=0.0)) == (1, 0)  # P = max(1, 0) = 1 -> round(0.5) = 0 random


def test_random_prompts():
    b = random_prompts(3, 5, 10, 0, torch.Generator().manual_seed(0))
    assert b.input_ids.shape == (3, 5) and b.supervised.all() and b.attention_mask.all()
    assert b.input_ids.min() >= 0 and b.input_ids.max() < 10 and b.task_ids.tolist() == [-1, -1, -1]


def _exact_kl(teacher_logits, student_logits, t=1.0):
    pt = torch.softmax(teacher_logits / t, -1)
    return (pt * (torch.log_softmax(teacher_logits / t, -1) - torch.log_softmax(student_logits / t, -1))).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_is_the_exact_kl_when_k_equals_v(temperature):
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 9, generator=g) * 2, torch.randn(6, 9, generator=g) * 2
    top = teacher.topk(9, dim=-1)
    got = topk_kl(student, top.values, top.indices, temperature)
    assert got.shape == (6,)
    assert torch.allclose(got, _exact_kl(teacher, student, temperature) * temperature**2, atol=1e-5)
    assert (got > 0).all()
    assert torch.allclose(topk_kl(teacher, top.values, top.indices), torch.zeros(6), atol=1e-6)


def test_topk_kl_is_per_token():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    top = teacher.topk(3, dim=-1)
    one = topk_kl(student, top.values, top.indices)
    two = topk_kl(torch.cat([student, student]), torch.cat([top.values] * 2), torch.cat([top.indices] * 2))
    assert two.mean().item() == pytest.approx(one.mean().item(), rel=1e-6)  # doubling T: same mean


@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_kl_is_minimised_at_the_teacher(k):
    """A student equal to the teacher pays nothing and feels no gradient; descent from it stays there; any
    other student pays more. (The old loss kept the student's full softmax: 1.53 nats at k=8 for student =
    teacher, and its descent moved the student away from the teacher.)"""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, 20, generator=g) * 3  # V=20 > k
    top = teacher.topk(k, dim=-1)
    student = teacher.clone().requires_grad_(True)
    loss = topk_kl(student, top.values, top.indices).mean()
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6
    for _ in range(5):
        other = teacher + torch.randn(4, 20, generator=g)
        assert (topk_kl(other, top.values, top.indices) >= -1e-6).all()
        if k > 1:
            assert topk_kl(other, top.values, top.indices).mean() > 1e-4


def test_topk_kl_descent_moves_the_student_towards_the_teacher():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(3, 20, generator=g) * 2
    top = teacher.topk(8, dim=-1)
    student = torch.randn(3, 20, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([student], lr=1.0)
    first = topk_kl(student, top.values, top.indices).mean().item()
    for _ in range(200):
        opt.zero_grad()
        topk_kl(student, top.values, top.indices).mean().backward()
        opt.step()
    assert topk_kl(student, top.values, top.indices).mean().item() < 0.01 * first
    # the student's distribution over the teacher's ids approaches the teacher's
    ps = torch.softmax(student.detach().gather(1, top.indices), -1)
    assert torch.allclose(ps, torch.softmax(top.values, -1), atol=0.02)


# ---- a learnable toy setup -----------------------------------------------------------------------------
@pytest.fixture
def awake(tiny_cfg, make_learner):
    """A learner whose hippocampus has learned a few toy batches (system != base), with a filled replay."""
    cfg = tiny_cfg
    cfg.experts.fast_lr, cfg.consolidation.slow_lr = 3e-2, 1e-2
    learner = make_learner(cfg)
    stream = ToyStream(cfg)
    replay = ReservoirReplay(cfg.replay.capacity, 1)
    ewc = OnlineEWC(cfg.ewc.lambda_, cfg.ewc.fisher_decay)
    for step in range(1, 7):
        batch = stream.train_batch(step, cfg.train.batch_size)
        out = wake_step(learner, batch, cfg, ewc, len(batch), keep_teacher=True)
        for e in episodes_from_batch(batch, step, out.expert_ids, out.expert_weights, out.row_loss,
                                     out.teacher_values, out.teacher_ids):
            replay.add(e)
    return cfg, learner, stream, replay, ewc


def _base_state(learner):
    return {k: v.clone() for k, v in learner.neocortex.state_dict().items()}


def test_build_sleep_batch_lines_up_teacher_rows(awake):
    cfg, learner, stream, replay, _ = awake
    batch, values, ids, n_replay, n_pseudo = build_sleep_batch(learner, replay, cfg, stream.pad_id,
                                                               stream.vocab_size, torch.Generator().manual_seed(0))
    assert (n_replay, n_pseudo) == (8, 2)  # R = replay.batch_size = 8 -> P = 2 -> one echo + one random
    assert len(batch) == 10
    assert values.shape == ids.shape == (int(batch.supervised.sum()), cfg.replay.teacher_topk)


def test_sleep_step_lowers_the_distillation_kl(awake):
    cfg, learner, stream, replay, ewc = awake
    batch = collate(replay.sample(8), stream.pad_id)
    values, ids = system_topk(learner, batch, cfg.replay.teacher_topk)
    cfg.consolidation.slow_lr = 1e-3  # Adam's first steps at the fixture's 1e-2 overshoot a KL this small
    kls = []
    for _ in range(5):
        kl, ce, applied = sleep_step(learner, batch, values, ids, len(batch), cfg, ewc)
        assert applied and ce.item() == 0.0
        kls.append(kl.item())
    assert kls[-1] < kls[0]
    assert kls[0] > 0


def test_sleep_step_with_target_ce(awake):
    cfg, learner, stream, replay, ewc = awake
    cfg.consolidation.target_ce_weight = 1.0
    batch = collate(replay.sample(4), stream.pad_id)
    values, ids = system_topk(learner, batch, cfg.replay.teacher_topk)
    with torch.no_grad():
        logits = learner.logits(learner.base_hidden(batch.input_ids, batch.attention_mask)[batch.supervised])
        expected_ce = F.cross_entropy(logits, batch.targets[batch.supervised]).item()
    kl, ce, applied = sleep_step(learner, batch, values, ids, len(batch), cfg, ewc)
    assert applied and ce.item() == pytest.approx(expected_ce, rel=1e-5)


def test_non_finite_teacher_skips_the_update(awake):
    cfg, learner, stream, replay, ewc = awake
    batch = collate(replay.sample(4), stream.pad_id)
    values, ids = system_topk(learner, batch, cfg.replay.teacher_topk)
    values[0, 0] = float("nan")
    before = _base_state(learner)
    kl, _, applied = sleep_step(learner, batch, values, ids, len(batch), cfg, ewc)
    assert not applied and not torch.isfinite(kl)
    for k, v in learner.neocortex.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert len(learner.base_optimizer.state) == 0


def test_sleep_cycle_report(awake):
    cfg, learner, stream, replay, ewc = awake
    steps = 6
    hip_before = {k: v.clone() for k, v in learner.hippocampus.state_dict().items()}
    report = sleep_cycle(learner, replay, ewc, steps, cfg, stream.pad_id, stream.vocab_size,
                         torch.Generator().manual_seed(0))
    assert report.steps == steps and report.skipped_steps == 0
    assert 0 < report.distill_kl_after < report.distill_kl_before
    assert report.distill_kl > 0 and report.distill_loss == pytest.approx(report.distill_kl)
    assert report.target_ce == 0.0
    assert report.replay_batch_size_sleep == 8.0 and report.pseudo_batch_size == 2.0
    assert report.sleep_mix_ratio_pseudo == pytest.approx(2 / 10)
    assert report.pseudo_source_mode == "mixed"
    assert report.ewc_penalty == 0.0  # no Fisher yet during the first sleep
    # Fisher on fisher_samples = 8: P = 2 pseudo (random prompts) + 6 replay
    assert (report.fisher_replay_samples, report.fisher_pseudo_samples) == (6, 2)
    assert report.fisher_source_mode == "mixed_replay_pseudo"
    assert ewc.updates == 1 and ewc.active
    for k, v in learner.hippocampus.state_dict().items():  # sleep trains the base only
        assert torch.equal(v, hip_before[k]), k
    second = sleep_cycle(learner, replay, ewc, 2, cfg, stream.pad_id, stream.vocab_size,
                         torch.Generator().manual_seed(1))
    assert second.steps == 2 and second.ewc_penalty > 0 and ewc.updates == 2
    assert set(dataclasses.asdict(second)) >= {"distill_kl_before", "distill_kl_after", "fisher_source_mode"}


def test_sleep_cycle_without_replay_or_steps_does_nothing(awake):
    cfg, learner, stream, replay, ewc = awake
    before = _base_state(learner)
    empty = sleep_cycle(learner, ReservoirReplay(4, 0), ewc, 5, cfg, stream.pad_id, stream.vocab_size,
                        torch.Generator())
    zero = sleep_cycle(learner, replay, ewc, 0, cfg, stream.pad_id, stream.vocab_size, torch.Generator())
    assert empty.steps == zero.steps == 0 and ewc.updates == 0
    for k, v in learner.neocortex.state_dict().items():
        assert torch.equal(v, before[k]), k
    off = cfg_with(rehearsal=False)
    off.replay, off.ewc = cfg.replay, cfg.ewc
    report = sleep_cycle(learner, replay, OnlineEWC(0.0, 0.9), 1, off, stream.pad_id, stream.vocab_size,
                         torch.Generator())
    assert report.pseudo_source_mode == "off" and report.pseudo_batch_size == 0.0
    assert report.fisher_source_mode == "none"  # lambda 0: no Fisher


@pytest.mark.parametrize("hippocampal_replay", [False, True])
def test_hippocampal_replay_switch(awake, hippocampal_replay):
    """Sleep trains only the base unless consolidation.hippocampal_replay is on; then the hippocampus also
    relearns the sleep batches, and its loss against the replay teachers goes down."""
    from biollm_cls.sleep import build_sleep_batch, hippocampal_replay_step

    cfg, learner, stream, replay, ewc = awake
    cfg.consolidation.hippocampal_replay = hippocampal_replay
    weights = lambda: {n: p.detach().clone() for n, p in learner.hippocampus.named_parameters()}  # noqa: E731
    before = weights()
    sleep_cycle(learner, replay, ewc, 3, cfg, stream.pad_id, stream.vocab_size, torch.Generator().manual_seed(0))
    changed = any(not torch.equal(before[n], p) for n, p in learner.hippocampus.named_parameters())
    assert changed == hippocampal_replay
    if hippocampal_replay:
        gen = torch.Generator().manual_seed(1)
        batch, tv, ti, n_replay, _ = build_sleep_batch(learner, replay, cfg, stream.pad_id, stream.vocab_size, gen)

        def system_kl():
            with torch.no_grad():
                h = learner.system_hidden(batch.input_ids, batch.attention_mask)
                return float(topk_kl(learner.logits(h[batch.supervised]), tv, ti).mean())

        first = system_kl()
        for _ in range(5):
            assert hippocampal_replay_step(learner, batch, tv, ti, n_replay, cfg)
        assert system_kl() < first


def test_a_sleep_replays_every_recent_episode_once_before_any_twice():
    from biollm_cls.replay import Episode, ReservoirReplay
    from biollm_cls.sleep import RecentQueue

    empty = torch.zeros(0, dtype=torch.long)
    replay = ReservoirReplay(200, seed=0, recent_capacity=50)
    for s in range(1, 121):
        replay.add(Episode(input_ids=torch.ones(3, dtype=torch.int32), targets=torch.ones(3, dtype=torch.int32),
                           task_id=0, step=s, expert_ids=empty, expert_weights=empty.float(), wake_loss=0.0))
    queue = RecentQueue(replay, since_step=100)  # 20 recent episodes
    first = [e.step for _ in range(5) for e in queue.take(4)]
    assert sorted(first) == list(range(101, 121))  # one pass: each once
    second = [e.step for _ in range(5) for e in queue.take(4)]
    assert sorted(second) == list(range(101, 121)) and second != first  # the next pass, reshuffled


def test_teacher_better_keeps_only_tokens_where_the_teacher_is_more_right_than_the_student():
    from biollm_cls.sleep import teacher_better

    ids = torch.tensor([[0, 1], [0, 1], [2, 3]])
    teacher = torch.tensor([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])  # teacher favours id 0, id 1, id 2
    student = torch.zeros(3, 5)
    student[:, 1] = 3.0  # the student favours id 1 everywhere
    gold = torch.tensor([0, 0, 4])
    # row 0: the teacher is right, the student wrong -> keep; row 1: both favour id 1 equally, so neither gives
    # the gold id 0 more -> drop; row 2: gold 4 is outside the teacher's top k (0 for the teacher) -> drop.
    assert teacher_better(student, teacher, ids, gold).tolist() == [True, False, False]


def test_the_gated_distillation_ignores_a_worse_teacher(awake):
    """With distill_gate=teacher_better, a teacher that is wrong on every token leaves only the CE."""
    cfg, learner, stream, replay, _ = awake
    cfg.consolidation.target_ce_weight = 1.0
    batch = collate(replay.sample(8), stream.pad_id)
    values, ids = system_topk(learner, batch, cfg.replay.teacher_topk)
    n_replay = len(batch)
    gold = batch.targets[batch.supervised]
    wrong_ids = (gold.unsqueeze(1) + 1 + torch.arange(ids.shape[1]).unsqueeze(0)) % stream.vocab_size
    cfg.consolidation.distill_gate = "teacher_better"
    distill, target_ce, applied = sleep_step(learner, batch, values, wrong_ids.to(ids.dtype), n_replay, cfg,
                                             OnlineEWC(0.0, 0.9))
    assert applied and float(distill) == 0.0 and float(target_ce) > 0
    cfg.consolidation.distill_gate = "none"
    distill, _, _ = sleep_step(learner, batch, values, wrong_ids.to(ids.dtype), n_replay, cfg, OnlineEWC(0.0, 0.9))
    assert float(distill) > 0


def test_sleep_losses_over_padded_positions_equal_the_exact_ones(awake):
    """A captured sleep step scores B*T positions (the teacher's rows padded with zeros): its losses and their
    gradients are the eager step's, which scores exactly the supervised positions."""
    from biollm_cls.sleep import sleep_losses

    cfg, learner, stream, replay, _ = awake
    cfg.consolidation.target_ce_weight, cfg.consolidation.distill_gate = 0.5, "teacher_better"
    batch = collate(replay.sample(6), stream.pad_id)
    batch.targets[1, -3:] = -100  # fewer supervised positions than B*T
    values, ids = system_topk(learner, batch, cfg.replay.teacher_topk)
    n, size = values.shape[0], batch.input_ids.numel()
    assert n < size
    results = []
    for rows, v, i in ((n, values, ids), (size, F.pad(values, (0, 0, 0, size - n)), F.pad(ids, (0, 0, 0, size - n)))):
        learner.base_optimizer.zero_grad(set_to_none=True)
        distill, ce, loss = sleep_losses(learner, batch, v, i, 4, cfg, rows)  # rows 4, 5 count as pseudo rows
        loss.backward()
        results.append((distill.item(), ce.item(), [p.grad.clone() for p in learner.base_parameters()]))
    (d0, ce0, g0), (d1, ce1, g1) = results
    assert d0 > 0 and ce0 > 0
    assert d1 == pytest.approx(d0, rel=1e-6) and ce1 == pytest.approx(ce0, rel=1e-6)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
