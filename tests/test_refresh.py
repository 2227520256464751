"""Expert refresh: absorbed experts are reset, the others kept; two forward passes in all; reset_factor >= 1 off."""

from __future__ import annotations

import torch

from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.ewc import OnlineEWC
from biollm_cls.refresh import expert_absorption_kl, refresh_experts
from biollm_cls.replay import ReservoirReplay, collate, episodes_from_batch
from biollm_cls.wake import wake_step


def routed_replay(cfg, per_expert: int = 2, seed: int = 0) -> ReservoirReplay:
    """`per_expert` toy episodes routed to each expert alone (weight 1)."""
    stream = ToyStream(cfg)
    E = cfg.experts.num_experts
    batch = stream.train_batch(1, E * per_expert)
    ids = torch.arange(E).repeat_interleave(per_expert).unsqueeze(1)  # (B, 1)
    replay = ReservoirReplay(1000, seed)
    for e in episodes_from_batch(batch, 1, ids, torch.ones(len(batch), 1), torch.zeros(len(batch)), None, None):
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


def count_hidden_calls(learner) -> list[int]:
    calls = [0]
    original = learner.neocortex.hidden

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    learner.neocortex.hidden = counted
    return calls


def test_refresh_resets_only_the_absorbed_experts(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold, cfg.consolidation.refresh.reset_factor = 0.05, 0.25
    learner = make_learner(cfg)
    hip = learner.hippocampus
    # give the fast optimizer moments for every expert first
    wake_step(learner, ToyStream(cfg).train_batch(1, 4), cfg, OnlineEWC(0.0, 0.9), 4, keep_teacher=False)
    set_experts(hip, negligible=[0, 2], strong=[1, 3])
    before = {n: getattr(hip, n).detach().clone() for n in ("w_in", "w_out")}
    report = refresh_experts(learner, routed_replay(cfg), cfg, pad_id=0)
    assert report.tested == 4 and sorted(report.expert_kl) == [0, 1, 2, 3]
    assert report.expert_kl[0] == report.expert_kl[2] == 0.0  # zero output: the base already predicts it
    assert report.expert_kl[1] > 0.05 and report.expert_kl[3] > 0.05
    assert report.reset_experts == [0, 2] and report.refresh_count == 2
    assert abs(report.refresh_avg_kl - sum(report.expert_kl.values()) / 4) < 1e-6
    f = 0.25
    assert torch.allclose(hip.w_in[[0, 2]], hip.w_in_init[[0, 2]] + f * (before["w_in"][[0, 2]]
                                                                         - hip.w_in_init[[0, 2]]), atol=1e-6)
    assert torch.equal(hip.w_in[[1, 3]], before["w_in"][[1, 3]])
    assert torch.equal(hip.w_out[[1, 3]], before["w_out"][[1, 3]])
    state = learner.fast_optimizer.state[hip.router.weight]  # every router row got a gradient in wake
    assert torch.equal(state["exp_avg"][[0, 2]], torch.zeros_like(state["exp_avg"][[0, 2]]))
    assert state["exp_avg"][[1, 3]].abs().sum() > 0


def test_refresh_fires_with_a_large_threshold(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold = 1e9
    learner = make_learner(cfg)
    set_experts(learner.hippocampus, negligible=[], strong=[0, 1, 2, 3])
    report = refresh_experts(learner, routed_replay(cfg), cfg, pad_id=0)
    assert report.reset_experts == [0, 1, 2, 3] and min(report.expert_kl.values()) > 0


def test_refresh_does_not_fire_with_a_tiny_threshold(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold = 1e-9
    learner = make_learner(cfg)
    hip = learner.hippocampus
    set_experts(hip, negligible=[], strong=[0, 1, 2, 3])
    before = {k: v.clone() for k, v in hip.state_dict().items()}
    report = refresh_experts(learner, routed_replay(cfg), cfg, pad_id=0)
    assert report.tested == 4 and report.refresh_count == 0 and report.reset_experts == []
    for k, v in hip.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_absorption_kl_matches_a_direct_computation(tiny_cfg, make_learner):
    cfg = tiny_cfg
    learner = make_learner(cfg)
    hip = learner.hippocampus
    set_experts(hip, negligible=[], strong=[0, 1, 2, 3])
    replay = ReservoirReplay(10, 0)
    batch = ToyStream(cfg).train_batch(1, 1)
    [episode] = episodes_from_batch(batch, 1, torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]]), torch.zeros(1),
                                    None, None)
    replay.add(episode)
    kls = expert_absorption_kl(learner, replay, 4, pad_id=0)
    assert sorted(kls) == [0, 2]
    b = collate([episode], 0)
    learner.neocortex.eval()
    with torch.no_grad():
        for e, w in ((2, 0.7), (0, 0.3)):
            sup = b.supervised
            forced = learner.neocortex.hidden(b.input_ids, b.attention_mask,
                                              inject=lambda h, m, e=e, w=w: hip.apply_selected(h, torch.tensor([[e]]), w))
            lf = torch.log_softmax(learner.logits(forced[sup]), -1)
            lb = torch.log_softmax(learner.logits(learner.base_hidden(b.input_ids, b.attention_mask)[sup]), -1)
            expected = (lf.exp() * (lf - lb)).sum(-1).mean().item()
            assert abs(kls[e] - expected) < 1e-5 * max(1.0, expected), (e, kls[e], expected)


def test_two_forward_passes_whatever_the_number_of_experts(tiny_cfg, make_learner):
    for num_experts in (2, 4, 8):
        cfg = tiny_cfg
        cfg.experts.num_experts, cfg.experts.top_k = num_experts, 1
        learner = make_learner(cfg)
        set_experts(learner.hippocampus, negligible=[], strong=list(range(num_experts)))
        calls = count_hidden_calls(learner)
        report = refresh_experts(learner, routed_replay(cfg), cfg, pad_id=0)
        assert report.tested == num_experts
        assert calls[0] == 2, num_experts


def test_reset_factor_one_or_more_disables_refresh(tiny_cfg, make_learner):
    cfg = tiny_cfg
    cfg.consolidation.refresh.kl_threshold = 1e9  # would reset everything
    learner = make_learner(cfg)
    hip = learner.hippocampus
    set_experts(hip, negligible=[0, 1, 2, 3], strong=[])
    before = {k: v.clone() for k, v in hip.state_dict().items()}
    calls = count_hidden_calls(learner)
    for factor in (1.0, 1.5):
        cfg.consolidation.refresh.reset_factor = factor
        report = refresh_experts(learner, routed_replay(cfg), cfg, pad_id=0)
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
