"""Expert refresh: an expert is reset when the base has absorbed it (KL(stored teacher || base) small, or the base
no better than the system on its ground truth), never because it is weak; two passes in all; reset_factor >= 1 off."""

from __future__ import annotations

import pytest
import torch

from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.ewc import OnlineEWC
from biollm_cls.refresh import expert_absorption, refresh_experts
from biollm_cls.replay import ReservoirReplay, episodes_from_batch
from biollm_cls.wake import wake_step


def routed_replay(cfg, learner=None, teacher: str = "system", per_expert: int = 2, seed: int = 0) -> ReservoirReplay:
    """`per_expert` toy episodes routed to each expert alone (weight 1), each with a stored top-k teacher
    from `learner`: the system's predictions ("system") or the base's own ("base"); no teacher without one."""
    stream = ToyStream(cfg)
    E = cfg.experts.num_experts
    batch = stream.train_batch(1, E * per_expert)
    ids = torch.arange(E).repeat_interleave(per_expert).unsqueeze(1)  # (B, 1)
    values = top_ids = None
    if learner is not None:
        hip = learner.hippocampus  # system: base + each episode's own expert (the routing it was stored with)
        inject = (lambda h, m: hip.apply_selected(h, ids, 1.0)) if teacher == "system" else None
        learner.neocortex.eval()
        with torch.no_grad():
            hidden = learner.neocortex.hidden(batch.input_ids, batch.attention_mask, inject=inject)
            logits = learner.logits(hidden[batch.supervised])
        top = logits.topk(cfg.replay.teacher_topk, dim=-1)
        values, top_ids = top.values.half(), top.indices.int()
    replay = ReservoirReplay(1000, seed)
    for e in episodes_from_batch(batch, 1, ids, torch.ones(len(batch), 1), torch.zeros(len(batch)), values, top_ids):
        replay.add(e)
    return replay


def set_experts(hip, negligible: list[int], strong: list[int], seed: int = 0) -> None:
    """Drift every expert's input layer; give `strong` experts a large output, `negligible` ones none."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hip.w_in.add_(torch.randn(hip.w_in.shape, generator=g))
        for e in negligible:
            hip.w_out[e].zero_()
            hip.b_out[e].zero_()
        for e in strong:
            hip.w_out[e].copy_(torch.randn(hip.w_out[e].shape, generator=g) * 2.0)
    hip.update_drift()


def count_calls(learner, method: str = "hidden") -> list[int]:
    """Count calls of `learner.neocortex.<method>` (a full pass: "hidden"; upper layers only: "resume")."""
    calls = [0]
    original = getattr(learner.neocortex, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(learner.neocortex, method, counted)
    return calls


def learn_toy(cfg, learner, steps: int) -> None:
    """Train the hippocampus (only) for `steps` wake steps on the toy stream."""
    batch = ToyStream(cfg).train_batch(1, 8)  # the first task, whose episodes routed_replay stores
    for _ in range(steps):
        wake_step(learner, batch, cfg, OnlineEWC(0.0, 0.9), 8, keep_teacher=False)


def test_a_helpful_expert_is_kept_while_the_base_has_learned_nothing(tiny_cfg, make_learner):
    """The property the old test (KL(base + expert || base)) got wrong: a *weak* but helpful expert passed it
    although the base had absorbed nothing. Absorption is about the base, not about the expert's size."""
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold, cfg.consolidation.refresh.reset_factor = 0.02, 0.0
    learner = make_learner(cfg)
    learn_toy(cfg, learner, 20)  # the system now predicts the toy task better than the (untouched) base
    replay = routed_replay(cfg, learner, teacher="system")
    before = {k: v.clone() for k, v in learner.hippocampus.state_dict().items()}
    report = refresh_experts(learner, replay, cfg, pad_id=0)
    assert report.tested == cfg.experts.num_experts
    assert min(report.expert_kl.values()) > 0.02  # the base does not reproduce what the system learned
    assert report.reset_experts == [] and report.refresh_count == 0, report.expert_kl
    for k, v in learner.hippocampus.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_an_expert_is_reset_once_the_base_reproduces_its_teacher(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold, cfg.consolidation.refresh.reset_factor = 0.05, 0.25
    learner = make_learner(cfg)
    learn_toy(cfg, learner, 1)  # every router row and expert gets Adam moments
    hip = learner.hippocampus
    set_experts(hip, negligible=[], strong=[0, 1, 2, 3])  # however strong the experts are...
    replay = routed_replay(cfg, learner, teacher="base")  # ...the base already predicts what was learned
    before = {n: getattr(hip, n).detach().clone() for n in ("w_in", "w_out")}
    report = refresh_experts(learner, replay, cfg, pad_id=0)
    assert report.reset_experts == [0, 1, 2, 3] and max(report.expert_kl.values()) < 1e-3
    f = 0.25
    assert torch.allclose(hip.w_in, hip.w_in_init + f * (before["w_in"] - hip.w_in_init), atol=1e-6)
    state = learner.fast_optimizer.state[hip.router.weight]
    assert torch.equal(state["exp_avg"], torch.zeros_like(state["exp_avg"]))


def test_only_absorbed_experts_are_reset(tiny_cfg, make_learner):
    """Experts 0 and 2 have no output (their teacher is the base's own prediction: absorbed); 1 and 3 are
    strong, and their episodes' ground truth is what the system predicted, so the base is worse there."""
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold, cfg.consolidation.refresh.reset_factor = 0.05, 0.0
    learner = make_learner(cfg)
    hip = learner.hippocampus
    set_experts(hip, negligible=[0, 2], strong=[1, 3])
    replay = routed_replay(cfg, learner, teacher="system")
    for ep in replay.episodes:  # ground truth = the teacher's argmax, so the teacher is right
        ep.targets[ep.targets >= 0] = ep.teacher_ids[:, 0]
    before = {n: getattr(hip, n).detach().clone() for n in ("w_in", "w_out")}
    report = refresh_experts(learner, replay, cfg, pad_id=0)
    assert report.expert_kl[0] < 1e-3 and report.expert_kl[2] < 1e-3
    assert report.expert_kl[1] > 0.05 and report.expert_kl[3] > 0.05
    assert report.reset_experts == [0, 2]
    assert torch.equal(hip.w_in[[1, 3]], before["w_in"][[1, 3]]) and torch.equal(hip.w_out[[1, 3]],
                                                                                  before["w_out"][[1, 3]])
    assert torch.equal(hip.w_in[[0, 2]], hip.w_in_init[[0, 2]])


def test_one_base_pass_and_one_system_pass_whatever_the_number_of_experts(tiny_cfg, make_learner):
    """The system pass resumes from the base pass's injection-point state (the lower layers run once); a
    neocortex that cannot resume runs two full passes."""
    for num_experts in (2, 4, 8):
        for can_resume in (True, False):
            cfg = tiny_cfg
            cfg.experts.num_experts, cfg.experts.top_k = num_experts, 1
            learner = make_learner(cfg)
            learner.neocortex.can_resume = can_resume
            set_experts(learner.hippocampus, negligible=[], strong=list(range(num_experts)))
            replay = routed_replay(cfg, learner)
            full, resumed = count_calls(learner), count_calls(learner, "resume")
            report = refresh_experts(learner, replay, cfg, pad_id=0)
            assert report.tested == num_experts
            assert (full[0], resumed[0]) == ((1, 1) if can_resume else (2, 0)), (num_experts, can_resume)


def test_absorption_is_the_same_resumed_or_not_and_in_any_chunking(tiny_cfg, make_learner):
    cfg = tiny_cfg
    learner = make_learner(cfg)
    set_experts(learner.hippocampus, negligible=[1], strong=[0, 2, 3])
    replay = routed_replay(cfg, learner, per_expert=3)
    reference = expert_absorption(learner, replay, 3, pad_id=0, chunk_tokens=10**6)
    learner.neocortex.can_resume = False
    for chunk_tokens in (1, 40, 10**6):  # a row per chunk, a few rows, all rows
        other = expert_absorption(learner, replay, 3, pad_id=0, chunk_tokens=chunk_tokens)
        for field in ("teacher_kl", "base_ce", "system_ce"):
            a, b = getattr(reference, field), getattr(other, field)
            assert a.keys() == b.keys() and len(a) == cfg.experts.num_experts
            assert all(abs(a[e] - b[e]) < 1e-5 for e in a), (field, chunk_tokens, a, b)
    assert reference.base_ce != reference.system_ce  # the experts matter, so the system view was really used


def test_an_episode_sampled_for_two_experts_is_scored_once_with_the_same_absorption(tiny_cfg, make_learner,
                                                                                   monkeypatch):
    import copy

    import biollm_cls.refresh as refresh

    cfg = tiny_cfg
    learner = make_learner(cfg)
    set_experts(learner.hippocampus, negligible=[1], strong=[0, 2, 3])
    E = cfg.experts.num_experts
    replay = routed_replay(cfg, learner, per_expert=2)
    for j, ep in enumerate(replay.episodes):  # every episode routed to two experts: j's and the next one
        ep.expert_ids = torch.tensor([j % E, (j + 1) % E])
    scored, original = [], refresh._row_scores
    monkeypatch.setattr(refresh, "_row_scores", lambda lrn, rows, pad: scored.append(len(rows)) or original(lrn, rows, pad))
    shared = expert_absorption(learner, copy.deepcopy(replay), 4, pad_id=0, chunk_tokens=10**6)
    assert scored == [len(replay)]  # 2 * E pairs of (expert, episode), each episode scored once

    class Copies(ReservoirReplay):  # the same samples, each pair its own copy of the episode: no sharing
        def sample_per_expert(self, num_experts, n):
            return [[copy.deepcopy(ep) for ep in eps] for eps in super().sample_per_expert(num_experts, n)]

    apart = copy.deepcopy(replay)
    apart.__class__ = Copies
    separate = expert_absorption(learner, apart, 4, pad_id=0, chunk_tokens=10**6)
    assert scored[1] == 2 * len(replay)
    for field in ("teacher_kl", "base_ce", "system_ce"):
        a, b = getattr(shared, field), getattr(separate, field)
        assert a.keys() == b.keys() and len(a) == E
        assert all(abs(a[e] - b[e]) < 1e-5 for e in a), (field, a, b)


def test_reset_factor_one_or_more_disables_refresh(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold = 1e9  # would reset everything
    learner = make_learner(cfg)
    hip = learner.hippocampus
    set_experts(hip, negligible=[0, 1, 2, 3], strong=[])
    before = {k: v.clone() for k, v in hip.state_dict().items()}
    replay = routed_replay(cfg, learner)
    calls = count_calls(learner)
    for factor in (1.0, 1.5):
        cfg.consolidation.refresh.reset_factor = factor
        report = refresh_experts(learner, replay, cfg, pad_id=0)
        assert (report.tested, report.refresh_count, report.reset_experts) == (0, 0, [])
    assert calls[0] == 0
    for k, v in hip.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_refresh_without_hippocampus_or_routed_episodes(tiny_cfg, make_learner):
    cfg = tiny_cfg
    learner = make_learner(cfg)
    assert refresh_experts(learner, ReservoirReplay(4, 0), cfg, 0).tested == 0
    cfg.train.ablation_disable_hippocampus = True
    learner = make_learner(cfg)
    assert learner.hippocampus is None
    assert refresh_experts(learner, routed_replay(cfg), cfg, 0).tested == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host syncs exist only there)")
def test_scoring_a_chunk_of_rows_waits_for_the_gpu_nowhere(tiny_cfg, make_learner):
    """`_row_scores` (a chunk's base and system passes) issues no host sync; the absorption's one sync is after."""
    from biollm_cls.refresh import _row_scores
    from biollm_cls.train import build_learner

    replay = routed_replay(tiny_cfg, make_learner(tiny_cfg))  # episodes (on the host) with stored teachers
    rows = replay.sample(len(replay))
    tiny_cfg.device = "cuda"
    torch.manual_seed(0)
    learner = build_learner(tiny_cfg, torch.device("cuda"))
    learner.neocortex.eval()
    _row_scores(learner, rows, 0)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scores = _row_scores(learner, rows, 0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert scores.shape == (3, len(rows)) and torch.isfinite(scores).all()
