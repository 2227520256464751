"""The tiny neocortex: one pass per forward, injection at block `injection_layer`, base == system at zero delta."""

from __future__ import annotations

import pytest
import torch

from biollm_cls.config.schema import ModelConfig
from biollm_cls.neocortex import full_logits
from biollm_cls.neocortex.tiny import TinyNeocortex


def make_model(injection_layer: int = 1, num_layers: int = 3) -> TinyNeocortex:
    torch.manual_seed(0)
    return TinyNeocortex(ModelConfig(vocab_size=16, hidden_size=16, num_layers=num_layers, num_heads=2, seq_len=8,
                                     injection_layer=injection_layer)).eval()


def inputs(B: int = 2, T: int = 8):
    ids = torch.randint(0, 16, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, 6:] = False
    return ids, mask


def test_each_block_runs_once_per_system_forward(tiny_cfg, make_learner):
    learner = make_learner(tiny_cfg)
    with torch.no_grad():
        learner.hippocampus.w_out.normal_()  # a real, non-zero delta
    calls = [0] * len(learner.neocortex.blocks)
    for i, block in enumerate(learner.neocortex.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    ids, mask = inputs()
    learner.system_hidden(ids, mask)
    assert calls == [1] * len(calls)
    assert len(learner.last_routing) == 1  # the hippocampus ran once too
    learner.base_hidden(ids, mask)
    assert calls == [2] * len(calls)


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_inject_receives_the_output_of_block_injection_layer(layer):
    model = make_model(injection_layer=layer, num_layers=4)
    outputs, seen, after = {}, {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o.detach().clone()))
    model.blocks[layer + 1].register_forward_pre_hook(lambda m, a: after.__setitem__("x", a[0].detach().clone()))
    delta = torch.randn(2, 8, 16)

    def inject(h, m):
        seen["h"], seen["mask"] = h.detach().clone(), m
        return delta

    ids, mask = inputs()
    with torch.no_grad():
        model.hidden(ids, mask, inject=inject)
    assert torch.equal(seen["h"], outputs[layer])
    assert seen["mask"] is mask
    assert torch.equal(after["x"], outputs[layer] + delta)  # the upper stack runs on h + delta


def test_base_equals_system_with_zero_delta():
    model = make_model()
    ids, mask = inputs()
    with torch.no_grad():
        base = model.hidden(ids, mask)
        system = model.hidden(ids, mask, inject=lambda h, m: torch.zeros_like(h))
        other = model.hidden(ids, mask, inject=lambda h, m: torch.ones_like(h))
    assert torch.equal(base, system)
    assert not torch.allclose(base, other)
    assert full_logits(model, ids, mask).shape == (2, 8, 16)


def test_right_padding_does_not_change_real_positions():
    model = make_model()
    ids, _ = inputs(B=1)
    short = model.hidden(ids[:, :5], torch.ones(1, 5, dtype=torch.bool))
    padded_ids = ids.clone()
    padded_ids[:, 5:] = 0
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, :5] = True
    padded = model.hidden(padded_ids, mask)
    assert torch.allclose(short, padded[:, :5], atol=1e-6)


def test_sequence_longer_than_seq_len_raises():
    model = make_model()
    with pytest.raises(ValueError, match="exceeds model.seq_len=8"):
        model.hidden(torch.zeros(1, 9, dtype=torch.long))
    assert model.hidden(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 16)


def test_runtime_info():
    info = make_model().runtime_info()
    assert info["neocortex"] == "tiny" and info["injection_layer_idx"] == 1 and info["num_decoder_layers"] == 3


def test_compiled_trunk_gives_the_eager_output_in_one_graph_per_view(tiny_cfg, make_learner):
    """train.compile_scope=trunk (dynamo with the eager backend: no C++ build on the CI machine): `hidden`
    with the learner's injection (routing recorded, the kept split) and `resume` give the eager numbers, with no
    graph break and one graph per view."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from biollm_cls.train import compile_neocortex

    torch._dynamo.reset()
    learner = make_learner(tiny_cfg)
    neo = learner.neocortex.eval()
    with torch.no_grad():
        learner.hippocampus.w_out.normal_()
    ids, mask = inputs()

    def views():
        with torch.no_grad():
            system = learner.system_hidden(ids, mask, keep_split=True)
            return [learner.base_hidden(ids, mask), system, learner.system_hidden_from_split(learner.last_split, mask)]

    eager = views()
    compile_neocortex(neo, "trunk", backend="eager")
    counters.clear()
    for _ in range(3):
        compiled = views()
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b)
    assert len(learner.last_routing) == 1  # the side effects of the traced injection happened
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3  # base, system (keeping the split), resume
    torch._dynamo.reset()
