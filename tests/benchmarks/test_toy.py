"""The toy token stream: schedule, distinct conflicting tasks, cue, held-out data, purity of batches, joint order."""

from __future__ import annotations

import collections

import pytest
import torch

from biollm_cls.benchmarks import build_stream
from biollm_cls.benchmarks.base import IGNORE, ContinualStream, is_boundary, step_generator, task_at
from biollm_cls.benchmarks.toy import ToyStream
from biollm_cls.config.schema import ConfigError


def toy(cfg, **bench) -> ToyStream:
    for k, v in bench.items():
        setattr(cfg.benchmark, k, v)
    return ToyStream(cfg)


def test_each_task_gets_exactly_switch_every_steps(tiny_cfg):
    stream = toy(tiny_cfg, num_tasks=3, switch_every=5)
    assert isinstance(stream, ContinualStream)
    total = 3 * 5
    counts = collections.Counter(task_at(s, 5) for s in range(1, total + 1))
    assert counts == {0: 5, 1: 5, 2: 5}
    assert [task_at(s, 5) for s in (1, 5, 6, 10, 11, 15)] == [0, 0, 1, 1, 2, 2]
    assert [s for s in range(1, total + 1) if is_boundary(s, 5)] == [5, 10, 15]
    for s in range(1, total + 1):
        assert set(stream.train_batch(s, 3).task_ids.tolist()) == {task_at(s, 5)}


@pytest.mark.parametrize("num_tasks", range(1, 11))
def test_tasks_are_pairwise_distinct(tiny_cfg, num_tasks):
    tiny_cfg.model.vocab_size = num_tasks + 4  # the fewest content tokens allowed: 4! - 1 = 23 candidate maps
    stream = toy(tiny_cfg, num_tasks=num_tasks)
    c = stream.first_content
    content = torch.arange(c, stream.vocab_size)
    for i in range(num_tasks):
        m = stream.maps[i]
        assert sorted(m[c:].tolist()) == content.tolist()  # a permutation of the content ids
        assert not torch.equal(m[c:], content)  # never the identity
        assert torch.equal(m[:c], torch.arange(c))  # cue ids map to themselves
        for j in range(i):
            assert not torch.equal(m, stream.maps[j]), (i, j)
    assert len(stream.task_names) == num_tasks == len(set(stream.task_names))


def test_more_tasks_than_distinct_maps_is_a_config_error_not_a_hang(tiny_cfg, monkeypatch):
    """4 content tokens admit only 4! - 1 = 23 non-identity maps: 24 tasks can never be drawn.

    ToyStream redraws permutations until it has enough distinct ones, so it loops forever; it should raise
    ConfigError up front. torch.randperm is capped here so the bug shows as a failure instead of a hang.
    """
    real = torch.randperm
    calls = [0]

    def capped(*args, **kwargs):
        calls[0] += 1
        if calls[0] > 20_000:
            raise RuntimeError("ToyStream._draw_maps never terminates")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "randperm", capped)
    tiny_cfg.model.vocab_size = 24 + 4
    with pytest.raises(ConfigError, match="vocab_size"):
        toy(tiny_cfg, num_tasks=24)


def test_conflicting_targets_on_the_same_input(tiny_cfg):
    stream = toy(tiny_cfg, num_tasks=3)
    seed = 5
    batches = [stream._sample(torch.full((6,), t), step_generator(seed, 1)) for t in range(3)]
    for i in range(3):
        for j in range(i):
            a, b = batches[i], batches[j]
            assert torch.equal(a.input_ids[:, 1:], b.input_ids[:, 1:])  # same content inputs
            assert not torch.equal(a.targets, b.targets)  # different answers
    # the target is the task's map applied position-wise
    x, y = batches[1].input_ids, batches[1].targets
    assert torch.equal(y[:, 1:], stream.maps[1][x[:, 1:]])


def test_cue_token(tiny_cfg):
    stream = toy(tiny_cfg, num_tasks=3, switch_every=2)
    b = stream.train_batch(4, 5)  # task 1
    assert (b.input_ids[:, 0] == 1).all() and (b.targets[:, 0] == IGNORE).all()
    assert (b.input_ids[:, 1:] >= 3).all() and (b.targets[:, 1:] >= 3).all()
    assert (b.targets[:, 1:] != IGNORE).all() and b.attention_mask.all()
    tiny_cfg.benchmark.task_cue = False
    plain = ToyStream(tiny_cfg)
    pb = plain.train_batch(4, 5)
    assert plain.first_content == 0 and (pb.targets != IGNORE).all()
    assert plain.describe()["chance_token_acc"] == pytest.approx(1 / 16)
    assert stream.describe()["chance_token_acc"] == pytest.approx(1 / 13)


def test_too_small_vocabulary_is_a_config_error(tiny_cfg):
    tiny_cfg.model.vocab_size = 6
    with pytest.raises(ConfigError, match="model.vocab_size=6"):
        toy(tiny_cfg, num_tasks=3)


def test_heldout_is_deterministic_and_differs_from_training(tiny_cfg):
    tiny_cfg.benchmark.heldout_size = 10
    a, b = ToyStream(tiny_cfg), ToyStream(tiny_cfg)
    for t in range(2):
        ha = list(a.heldout(t, 4))
        assert [len(x) for x in ha] == [4, 4, 2]
        hb = list(b.heldout(t, 4))
        for x, y in zip(ha, hb, strict=True):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.targets, y.targets)
        held = {tuple(r) for x in ha for r in x.input_ids.tolist()}
        assert all((x.task_ids == t).all() for x in ha)
        train = {tuple(r) for s in range(1, 9) for r in a.train_batch(s, 8).input_ids.tolist()}
        assert not held & train
    # reading training batches does not change held-out data
    assert torch.equal(next(a.heldout(0, 10)).input_ids, next(ToyStream(tiny_cfg).heldout(0, 10)).input_ids)
    tiny_cfg.seed += 1
    assert not torch.equal(next(ToyStream(tiny_cfg).heldout(0, 10)).input_ids, next(a.heldout(0, 10)).input_ids)


def test_batches_are_a_pure_function_of_seed_and_step(tiny_cfg):
    a, b = ToyStream(tiny_cfg), ToyStream(tiny_cfg)
    first = {s: a.train_batch(s, 4) for s in (1, 2, 3, 7)}
    torch.manual_seed(123)  # global RNG state does not matter
    for s in (7, 3, 1, 2):  # nor does the order of the calls
        other = b.train_batch(s, 4)
        assert torch.equal(first[s].input_ids, other.input_ids) and torch.equal(first[s].targets, other.targets)
    assert not torch.equal(first[1].input_ids, first[2].input_ids)
    tiny_cfg.seed += 1
    assert not torch.equal(ToyStream(tiny_cfg).train_batch(1, 4).input_ids, first[1].input_ids)


def test_joint_order_mixes_tasks(tiny_cfg):
    stream = toy(tiny_cfg, num_tasks=4, order="joint")
    seen = set()
    for s in range(1, 5):
        b = stream.train_batch(s, 16)
        tasks = b.task_ids
        assert len(set(tasks.tolist())) > 1
        seen |= set(tasks.tolist())
        assert torch.equal(b.input_ids[:, 0], tasks)  # each row's cue is its own task
        assert torch.equal(b.targets[:, 1:], stream.maps[tasks.unsqueeze(1), b.input_ids[:, 1:]])
    assert seen == {0, 1, 2, 3}
    assert stream.describe()["order"] == "joint"


def test_build_stream_picks_the_toy_stream(tiny_cfg):
    stream = build_stream(tiny_cfg)
    assert isinstance(stream, ToyStream) and stream.pad_id == 0 and stream.vocab_size == 16
