"""The hippocampal MoE: zero init, routing, dense gated mixing, load balancing, usage, refresh resets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biollm_cls.config.schema import ExpertsConfig
from biollm_cls.hippocampus import Hippocampus
from biollm_cls.neocortex import full_logits

H, E, EH = 16, 4, 8


def make_hip(seed: int = 0, randomize: bool = False, **kw) -> Hippocampus:
    torch.manual_seed(seed)
    cfg = ExpertsConfig(num_experts=kw.pop("num_experts", E), expert_hidden=EH, top_k=kw.pop("top_k", 2), **kw)
    hip = Hippocampus(H, cfg)
    if randomize:  # non-zero output layers and router so every expert does something distinct
        with torch.no_grad():
            for p in (hip.w_out, hip.b_out, hip.b_in, hip.router.weight, hip.router.bias):
                p.normal_(0, 0.5)
    return hip


def naive_expert(hip: Hippocampus, e: int, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x @ hip.w_in[e] + hip.b_in[e]) @ hip.w_out[e] + hip.b_out[e]


def naive_mix(hip: Hippocampus, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    B, T, _ = h.shape
    out = torch.zeros_like(h)
    for b in range(B):
        for t in range(T):
            g = gates[b] if gates.dim() == 2 else gates[b, t]
            for e in range(hip.num_experts):
                if g[e] != 0:
                    out[b, t] += g[e] * naive_expert(hip, e, h[b, t])
    return out


def test_delta_is_zero_at_init_and_system_equals_base(tiny_cfg, make_learner):
    hip = make_hip()
    h = torch.randn(3, 5, H)
    delta, _ = hip(h)
    assert torch.equal(delta, torch.zeros_like(delta))
    learner = make_learner(tiny_cfg)
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (3, tiny_cfg.model.seq_len))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 5:] = False
    assert torch.equal(learner.system_hidden(ids, mask), learner.base_hidden(ids, mask))
    assert torch.equal(full_logits(learner.neocortex, ids, mask), learner.logits(learner.system_hidden(ids, mask)))


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_routing_shapes_and_topk_weights(routing):
    hip = make_hip(randomize=True, routing=routing)
    B, T, k = 3, 5, 2
    r = hip.route(torch.randn(B, T, H), None)
    lead = (B,) if routing == "sequence" else (B, T)
    assert r.expert_ids.shape == (*lead, k) and r.expert_ids.dtype == torch.long
    assert r.weights.shape == (*lead, k)
    assert r.router_probs.shape == (*lead, E) and r.gates.shape == (*lead, E)
    assert torch.allclose(r.weights.sum(-1), torch.ones(lead))
    assert torch.allclose(r.gates.sum(-1), torch.ones(lead))
    assert torch.allclose(r.router_probs.sum(-1), torch.ones(lead))
    assert ((r.gates > 0).sum(-1) == k).all()
    # the selected experts are the k most probable ones, and their gates are the renormalised probabilities
    top_p, top_i = r.router_probs.topk(k, dim=-1)
    assert torch.equal(r.expert_ids, top_i)
    assert torch.allclose(r.gates.gather(-1, top_i), top_p / top_p.sum(-1, keepdim=True))


@pytest.mark.parametrize("routing", ["sequence", "token"])
def test_delta_has_the_hidden_shape_and_uses_only_k_experts(routing):
    hip = make_hip(randomize=True, routing=routing, top_k=1)
    h = torch.randn(3, 5, H)
    delta, r = hip(h)
    assert delta.shape == h.shape
    # with k=1 each sequence (token) gets exactly the output of its one selected expert
    ids = r.expert_ids.squeeze(-1)  # (B,) or (B, T)
    with torch.no_grad():
        for b in range(3):
            for t in range(5):
                e = int(ids[b] if routing == "sequence" else ids[b, t])
                assert torch.allclose(delta[b, t], naive_expert(hip, e, h[b, t]), atol=1e-5), (b, t)


def test_a_fully_reset_expert_adds_nothing():
    hip, opt = _trained_hip_and_optimizer()
    h = torch.randn(2, 3, H)
    with torch.no_grad():
        assert hip.apply_selected(h, torch.tensor([[1], [1]])).abs().sum() > 0  # trained: it did something
        hip.partial_reset_expert([1], 0.0, opt)  # output layers back to their zero init
        assert torch.equal(hip.apply_selected(h, torch.tensor([[1], [1]])), torch.zeros_like(h))
        assert hip.apply_selected(h, torch.tensor([[2], [2]])).abs().sum() > 0  # the others are untouched


def test_pooled_routing_ignores_padding():
    hip = make_hip(randomize=True)
    h = torch.randn(2, 6, H)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 5:] = False
    r1 = hip.route(h, mask)
    h2 = h.clone()
    h2[0, 3:] = torch.randn(3, H) * 100
    h2[1, 5:] = -50.0
    r2 = hip.route(h2, mask)
    assert torch.equal(r1.router_probs, r2.router_probs) and torch.equal(r1.expert_ids, r2.expert_ids)
    # ...but a real position does change it (so the check above can fail)
    h3 = h.clone()
    h3[0, 0] += 10.0
    assert not torch.allclose(hip.route(h3, mask).router_probs[0], r1.router_probs[0])
    # ...and a padded sequence is routed exactly as the same sequence alone, cut to its real positions
    for b, length in ((0, 3), (1, 5)):
        alone = hip.route(h[b : b + 1, :length], None)
        assert torch.allclose(alone.router_probs, r1.router_probs[b : b + 1], atol=1e-6)
        assert torch.equal(alone.expert_ids, r1.expert_ids[b : b + 1])


@pytest.mark.parametrize("dims", [2, 3])
def test_dense_gated_mix_equals_naive_loop(dims):
    hip = make_hip(randomize=True)
    B, T = 3, 4
    h = torch.randn(B, T, H)
    shape = (B, E) if dims == 2 else (B, T, E)
    gates = torch.rand(shape) * (torch.rand(shape) > 0.4)
    with torch.no_grad():
        assert torch.allclose(hip.mix(h, gates), naive_mix(hip, h, gates), atol=1e-5)


def test_forward_uses_the_routing_gates():
    hip = make_hip(randomize=True, routing="token")
    h = torch.randn(2, 3, H)
    with torch.no_grad():
        delta, r = hip(h)
        assert torch.allclose(delta, naive_mix(hip, h, r.gates), atol=1e-5)


def test_unselected_experts_get_zero_gradient():
    hip = make_hip(randomize=True, top_k=1)
    h = torch.randn(1, 4, H)
    delta, r = hip(h)
    delta.pow(2).sum().backward()
    chosen = int(r.expert_ids[0, 0])
    for name in ("w_in", "b_in", "w_out", "b_out"):
        grad = getattr(hip, name).grad
        for e in range(E):
            if e == chosen:
                assert grad[e].abs().sum() > 0, name
            else:
                assert torch.equal(grad[e], torch.zeros_like(grad[e])), (name, e)


def test_routing_regulariser_has_router_gradient_and_is_one_when_balanced():
    hip = make_hip(randomize=True)
    h = torch.randn(4, 3, H)
    _, r = hip(h)
    reg = hip.routing_regulariser(r)
    reg.backward()
    assert hip.router.weight.grad is not None and hip.router.weight.grad.abs().sum() > 0
    assert hip.router.bias.grad.abs().sum() > 0
    # every row sent to the same k experts with all the probability: the worst imbalance, E/k
    skewed = make_hip()
    with torch.no_grad():
        skewed.router.weight.zero_()
        skewed.router.bias.copy_(torch.tensor([30.0, 30.0, -30.0, -30.0]))
    _, rs = skewed(torch.randn(5, 3, H))
    assert set(rs.expert_ids.flatten().tolist()) == {0, 1}
    assert skewed.routing_regulariser(rs).item() == pytest.approx(E / 2, rel=1e-4)
    # a zero router with fresh usage gives uniform probabilities: the loss is exactly its balanced value, 1
    flat = make_hip()
    with torch.no_grad():
        flat.router.weight.zero_()
        flat.router.bias.zero_()
    _, r0 = flat(torch.randn(5, 3, H))
    assert flat.routing_regulariser(r0).item() == pytest.approx(1.0, abs=1e-6)


def test_descending_the_routing_regulariser_balances_the_load():
    """What the regulariser is for: minimising it alone spreads a skewed router's selections over the experts."""
    hip = make_hip(randomize=True)
    with torch.no_grad():
        hip.router.bias.copy_(torch.tensor([3.0, 2.5, -2.0, -2.0]))  # experts 0 and 1 take almost everything
    h = torch.randn(64, 3, H)
    opt = torch.optim.SGD(hip.router.parameters(), lr=0.5)

    def load() -> tuple[float, torch.Tensor]:
        _, r = hip(h)
        return hip.routing_regulariser(r), (r.gates > 0).float().mean(0)  # (E,) share of rows selecting e

    before, share_before = load()
    for _ in range(100):
        opt.zero_grad()
        load()[0].backward()
        opt.step()
    after, share_after = load()
    assert after.item() < before.item() - 0.2
    assert share_after.min() > share_before.min() + 0.1  # the starved experts now get rows
    assert share_after.max() < share_before.max()


def test_token_routing_regulariser_skips_padding():
    hip = make_hip(randomize=True, routing="token")
    h = torch.randn(2, 4, H)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    _, r = hip(h, mask)
    reg = hip.routing_regulariser(r, mask)
    # the same real tokens as one unpadded sequence give the same value: padding counts for nothing
    real = torch.cat([h[0, :2], h[1, :3]]).unsqueeze(0)  # (1, 5, H)
    _, r_real = hip(real)
    assert reg.item() == pytest.approx(hip.routing_regulariser(r_real).item(), rel=1e-6)
    garbage = h.clone()
    garbage[~mask] = 1e3 * torch.randn(int((~mask).sum()), H)
    _, r_garbage = hip(garbage, mask)
    assert hip.routing_regulariser(r_garbage, mask).item() == pytest.approx(reg.item(), rel=1e-6)


def test_usage_ema_tracking():
    hip = make_hip(randomize=True, usage_decay=0.5)
    h = torch.randn(3, 2, H)
    _, r = hip(h, track_stats=True)
    share = r.gates.detach().mean(0)
    assert torch.allclose(hip.usage, 0.5 * torch.full((E,), 1 / E) + 0.5 * share)
    assert hip.usage.sum().item() == pytest.approx(1.0)
    assert torch.equal(hip.activation_counts, (r.gates > 0).float().sum(0))
    before = hip.usage.clone()
    hip(h)  # track_stats=False leaves the statistics alone
    assert torch.equal(hip.usage, before)


def test_token_usage_averages_over_real_tokens():
    hip = make_hip(randomize=True, routing="token", usage_decay=0.0)
    h = torch.randn(1, 3, H)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    _, r = hip(h, mask, track_stats=True)
    assert torch.allclose(hip.usage, r.gates[0, :2].detach().mean(0))


def test_utilization_bonus_favours_unused_experts():
    hip = make_hip(utilization_bonus=0.5, capacity_penalty=0.0)
    with torch.no_grad():
        hip.router.weight.zero_()
        hip.router.bias.zero_()
        hip.usage.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    probs = hip.route(torch.randn(2, 3, H), None).router_probs
    expected = torch.softmax(torch.tensor([0.0, 0.5, 0.5, 0.5]), -1)  # bonus 0.5 * (1 - min(E*usage, 1))
    assert torch.allclose(probs, expected.expand(2, E), atol=1e-6)
    assert (probs[:, 0] < probs[:, 1]).all()


def test_capacity_penalty_disfavours_a_drifted_expert():
    hip = make_hip(utilization_bonus=0.0, capacity_penalty=1.0, drift_scale=1.0)
    with torch.no_grad():
        hip.router.weight.zero_()
        hip.router.bias.zero_()
        hip.b_out[2] += 1.0  # ||theta_2 - theta_2^0|| = sqrt(H)
    hip.update_drift()
    d = math.sqrt(H)
    assert hip.expert_drift.tolist() == pytest.approx([0.0, 0.0, d, 0.0])
    # capacity = 0.5 * (min(usage * E / 2, 1) + 1 - exp(-drift)); usage = 1/E -> load 0.5
    scores = [0.25, 0.25, 0.5 * (0.5 + 1 - math.exp(-d)), 0.25]
    assert hip.capacity_scores().tolist() == pytest.approx(scores)
    probs = hip.route(torch.randn(1, 2, H), None).router_probs[0]
    assert torch.allclose(probs, torch.softmax(-torch.tensor(scores), -1), atol=1e-6)
    assert probs[2] < probs[0]


def test_saturation_ratio():
    hip = make_hip(saturation_threshold=0.3)
    with torch.no_grad():
        hip.b_out[1] += 10.0
    hip.update_drift()  # expert 1: capacity 0.5 * (0.5 + ~1) > 0.3; others 0.25
    assert hip.saturation_ratio().item() == pytest.approx(1 / E)


def test_apply_selected():
    hip = make_hip(randomize=True)
    h = torch.randn(2, 3, H)
    ids = torch.tensor([[1, 3], [0, 0]])
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    with torch.no_grad():
        got = hip.apply_selected(h, ids, w)
        expected = torch.stack([0.25 * naive_expert(hip, 1, h[0]) + 0.75 * naive_expert(hip, 3, h[0]),
                                naive_expert(hip, 0, h[1])])  # duplicate ids add up
        assert torch.allclose(got, expected, atol=1e-5)
        one = hip.apply_selected(h, torch.tensor([[2], [2]]))  # scalar weight 1
        assert torch.allclose(one, naive_expert(hip, 2, h), atol=1e-5)


def _trained_hip_and_optimizer():
    hip = make_hip(randomize=True)
    opt = torch.optim.AdamW(hip.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        delta, r = hip(torch.randn(4, 3, H))
        (delta.pow(2).mean() + hip.routing_regulariser(r)).backward()
        # every expert gets a gradient on every parameter
        for name in ("w_in", "b_in", "w_out", "b_out"):
            getattr(hip, name).grad += 0.01
        opt.step()
    hip.update_drift()
    return hip, opt


PARAMS = ("w_in", "b_in", "w_out", "b_out")


def _pairs(hip):
    out = [(n, getattr(hip, n), getattr(hip, f"{n}_init")) for n in PARAMS]
    return out + [("router.weight", hip.router.weight, hip.router_weight_init),
                  ("router.bias", hip.router.bias, hip.router_bias_init)]


def test_partial_reset_expert_moves_chosen_experts_toward_init_and_clears_their_momentum():
    hip, opt = _trained_hip_and_optimizer()
    f, chosen, kept = 0.3, [1, 3], [0, 2]
    before = {n: p.detach().clone() for n, p, _ in _pairs(hip)}
    moments = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p, _ in _pairs(hip)}
    usage = hip.usage.clone()
    hip.partial_reset_expert(chosen, f, opt)
    for name, p, init in _pairs(hip):
        assert not torch.equal(before[name][chosen], init[chosen]), f"{name} never moved: vacuous check"
        assert torch.allclose(p[chosen], init[chosen] + f * (before[name][chosen] - init[chosen]), atol=1e-7), name
        assert torch.equal(p[kept], before[name][kept]), name
        state = opt.state[p]
        assert torch.equal(state["exp_avg"][chosen], torch.zeros_like(state["exp_avg"][chosen])), name
        assert moments[name]["exp_avg"][chosen].abs().sum() > 0
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][kept], moments[name][key][kept]), (name, key)
        # the second moment keeps its scale (see the step-size test below)
        assert torch.equal(state["exp_avg_sq"][chosen], moments[name]["exp_avg_sq"][chosen]), name
        assert torch.equal(state["step"], moments[name]["step"])
    # drift is recomputed; usage of the reset experts moves toward the fair share, then renormalised
    for e in chosen:
        sq = sum((getattr(hip, n)[e] - getattr(hip, f"{n}_init")[e]).detach().pow(2).sum() for n in PARAMS)
        assert hip.expert_drift[e].item() == pytest.approx(float(sq.sqrt()), rel=1e-5)
    raw = usage.clone()
    raw[chosen] = usage[chosen] * f + (1 - f) / E
    assert torch.allclose(hip.usage, raw / raw.sum())


def test_partial_reset_with_factor_zero_restores_the_init_exactly():
    hip, opt = _trained_hip_and_optimizer()
    hip.partial_reset_expert(torch.tensor([0, 2]), 0.0, opt)
    for name, p, init in _pairs(hip):
        assert torch.equal(p[[0, 2]], init[[0, 2]]), name
    assert hip.expert_drift[0].item() == 0.0 and hip.expert_drift[2].item() == 0.0
    assert hip.expert_drift[1].item() > 0
    hip.partial_reset_expert([], 0.0, opt)  # no-op


def test_state_dict_round_trip_keeps_the_init_buffers():
    hip, _ = _trained_hip_and_optimizer()
    state = hip.state_dict()
    for name in ("w_in_init", "b_in_init", "w_out_init", "b_out_init", "router_weight_init", "router_bias_init",
                 "usage", "activation_counts", "expert_drift"):
        assert name in state
    other = make_hip(seed=123)
    assert not torch.equal(other.w_in_init, hip.w_in_init)
    other.load_state_dict(state)
    for (name, p, init), (_, q, init2) in zip(_pairs(hip), _pairs(other), strict=True):
        assert torch.equal(p, q) and torch.equal(init, init2), name
    other.partial_reset_expert([1], 0.0)  # resets to the *original* init, not the reloaded module's own
    assert torch.equal(other.w_in[1], hip.w_in_init[1])


def test_a_reset_expert_learns_at_no_more_than_the_learning_rate():
    """After a reset, Adam's steps on the reset experts stay <= lr. Zeroing the second moment too (while the
    tensor's shared step count keeps the bias correction at ~1) made them 1.6-3.4x lr for ~40 steps."""
    hip = make_hip(randomize=True)
    lr = 0.01
    opt = torch.optim.AdamW(hip.parameters(), lr=lr, weight_decay=0.0)
    grads = {n: torch.randn_like(p) for n, p, _ in _pairs(hip)}  # a steady gradient: the overshoot's worst case

    def step():
        for name, p, _ in _pairs(hip):
            p.grad = grads[name].clone()
        opt.step()

    for _ in range(200):  # a long-trained hippocampus: bias correction ~1
        step()
    hip.partial_reset_expert([1], 0.0, opt)
    largest = 0.0
    for _ in range(40):
        before = hip.w_out.detach().clone()
        step()
        largest = max(largest, float((hip.w_out[1].detach() - before[1]).abs().max()))
    assert 0 < largest <= lr * 1.001
