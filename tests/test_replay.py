"""Episodic memory: reservoir sampling, its own RNG, sampling rules, episodes from a batch, collate, size."""

from __future__ import annotations

import random

import pytest
import torch

from biollm_cls.benchmarks.base import IGNORE, Batch
from biollm_cls.replay import Episode, ReservoirReplay, collate, episodes_from_batch

_IDS = torch.arange(4, dtype=torch.int32)
_EMPTY = torch.zeros(0, dtype=torch.long)


def ep(step: int, task: int = 0, experts: list[int] | None = None, length: int = 4) -> Episode:
    ids = torch.full((length,), step % 7, dtype=torch.int32) if length != 4 else _IDS
    return Episode(input_ids=ids, targets=ids, task_id=task, step=step,
                   expert_ids=torch.tensor(experts) if experts is not None else _EMPTY,
                   expert_weights=torch.full((len(experts),), 1 / len(experts)) if experts else _EMPTY.float(),
                   wake_loss=float(step))


def filled(seed: int, n: int, capacity: int = 100, **kw) -> ReservoirReplay:
    buf = ReservoirReplay(capacity, seed)
    for s in range(1, n + 1):
        buf.add(ep(s, **kw))
    return buf


def test_reservoir_keeps_everything_until_full():
    buf = filled(0, 30, capacity=50)
    assert len(buf) == 30 and buf.seen == 30
    assert [e.step for e in buf.episodes] == list(range(1, 31))


def test_reservoir_is_uniform_over_the_stream():
    buf = filled(3, 10_000, capacity=100)
    assert len(buf) == 100 and buf.seen == 10_000
    steps = [e.step for e in buf.episodes]
    assert len(set(steps)) == 100
    assert 4000 <= sum(steps) / len(steps) <= 6000  # uniform over 1..10000: mean 5000
    counts = [0] * 10
    for s in steps:
        counts[(s - 1) // 1000] += 1
    chi2 = sum((c - 10) ** 2 / 10 for c in counts)
    assert chi2 < 27.88, counts  # chi-square, 9 dof, p = 0.001
    # a FIFO / keep-first / keep-last buffer would fail the checks above
    assert min(steps) <= 1000 and max(steps) > 9000


def test_reservoir_uniform_across_seeds():
    """Pool 20 seeds: the first and second halves of the stream are kept about equally often."""
    first = sum(sum(e.step <= 1000 for e in filled(seed, 2000, capacity=20).episodes) for seed in range(20))
    assert 160 <= first <= 240  # expected 200 of 400


def test_own_rng_determinism():
    random.seed(1)
    a = filled(7, 500, capacity=20)
    random.seed(999)  # the global RNG must not matter
    torch.manual_seed(5)
    b = filled(7, 500, capacity=20)
    assert [e.step for e in a.episodes] == [e.step for e in b.episodes]
    assert [e.step for e in a.sample(10)] == [e.step for e in b.sample(10)]
    c = filled(8, 500, capacity=20)
    assert [e.step for e in a.episodes] != [e.step for e in c.episodes]


def test_sample_is_without_replacement():
    buf = filled(0, 50, capacity=50)
    got = buf.sample(50)
    assert len(got) == 50 and len({id(e) for e in got}) == 50
    assert len(buf.sample(80)) == 50  # capped at the buffer size
    assert len({id(e) for e in buf.sample(10)}) == 10
    assert ReservoirReplay(5, 0).sample(3) == []


def test_sample_excluding_a_task():
    buf = ReservoirReplay(30, 0)
    for s in range(30):
        buf.add(ep(s, task=s % 3))
    got = buf.sample(100, exclude_task=1)
    assert len(got) == 20 and all(e.task_id != 1 for e in got)
    assert {e.task_id for e in buf.sample(100)} == {0, 1, 2}


def test_sample_by_and_per_expert():
    buf = ReservoirReplay(40, 0)
    routes = [[0, 1], [1, 2], [2, 0], [0, 1]]  # expert 3 never used
    for s in range(40):
        buf.add(ep(s, experts=routes[s % 4]))
    per = buf.sample_per_expert(4, 100)
    assert [len(x) for x in per] == [30, 30, 20, 0]
    for e, episodes in enumerate(per):
        assert all(e in x.expert_ids.tolist() for x in episodes)
        assert len({id(x) for x in episodes}) == len(episodes)
    capped = buf.sample_per_expert(4, 5)
    assert [len(x) for x in capped] == [5, 5, 5, 0]
    by = buf.sample_by_expert(2, 7)
    assert len(by) == 7 and all(2 in x.expert_ids.tolist() for x in by)
    assert buf.sample_by_expert(3, 5) == [] and buf.sample_by_expert(-1, 5) == []
    no_routing = filled(0, 5)
    assert no_routing.sample_per_expert(3, 2) == [[], [], []]


def test_episodes_from_batch_splits_teacher_rows_per_sequence():
    # 3 rows, T=5; row 0: 4 real tokens, 2 supervised; row 1: 2 real, 0 supervised; row 2: 5 real, 3 supervised
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    tgt = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE] * 5, [IGNORE, 7, 8, IGNORE, 9]])
    batch = Batch(ids, tgt, mask, torch.tensor([0, 1, 2]))
    k = 3
    values = torch.arange(5 * k, dtype=torch.float16).view(5, k)  # teacher row r holds r*k .. r*k+2
    tids = torch.arange(5 * k, dtype=torch.int32).view(5, k) + 100
    experts = torch.tensor([[0, 1], [2, 3], [1, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    out = episodes_from_batch(batch, 17, experts, weights, torch.tensor([1.5, 2.5, 3.5]), values, tids)
    assert len(out) == 3
    assert [e.input_ids.tolist() for e in out] == [[5, 6, 7, 8], [9, 10], [1, 2, 3, 4, 5]]
    assert out[0].targets.tolist() == [IGNORE, IGNORE, 3, 4]
    assert out[0].input_ids.dtype == torch.int32 and out[0].targets.dtype == torch.int32
    assert torch.equal(out[0].teacher_values, values[0:2]) and torch.equal(out[0].teacher_ids, tids[0:2])
    assert out[1].teacher_values.shape == (0, k)
    assert torch.equal(out[2].teacher_values, values[2:5]) and torch.equal(out[2].teacher_ids, tids[2:5])
    assert [e.task_id for e in out] == [0, 1, 2] and all(e.step == 17 for e in out)
    assert [e.wake_loss for e in out] == [1.5, 2.5, 3.5]
    assert out[2].expert_ids.tolist() == [1, 3] and out[2].expert_weights.tolist() == pytest.approx([0.9, 0.1])
    # each episode's teacher rows line up with its own supervised positions
    for e in out:
        assert e.teacher_values.shape[0] == int((e.targets != IGNORE).sum())
    # stored copies, not views of the batch
    ids[0, 0] = 99
    assert out[0].input_ids[0] == 5
    bare = episodes_from_batch(batch, 1, None, None, torch.zeros(3), None, None)
    assert bare[0].teacher_values is None and bare[0].expert_ids.numel() == 0


def test_collate_pads_right_with_ignore_targets():
    a = Episode(torch.tensor([3, 4, 5], dtype=torch.int32), torch.tensor([IGNORE, 4, 5], dtype=torch.int32), 0, 1,
                _EMPTY, _EMPTY.float(), 0.0)
    b = Episode(torch.tensor([6], dtype=torch.int32), torch.tensor([7], dtype=torch.int32), 2, 1,
                _EMPTY, _EMPTY.float(), 0.0)
    batch = collate([a, b], pad_id=1)
    assert batch.input_ids.tolist() == [[3, 4, 5], [6, 1, 1]]
    assert batch.targets.tolist() == [[IGNORE, 4, 5], [7, IGNORE, IGNORE]]
    assert batch.attention_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.task_ids.tolist() == [0, 2]
    assert batch.input_ids.dtype == torch.long and batch.targets.dtype == torch.long


def test_bytes_per_episode_at_T256_k8():
    T, k_teacher, k_route = 256, 8, 2
    e = Episode(input_ids=torch.zeros(T, dtype=torch.int32), targets=torch.zeros(T, dtype=torch.int32), task_id=0,
                step=1, expert_ids=torch.zeros(k_route, dtype=torch.long), expert_weights=torch.zeros(k_route),
                wake_loss=0.0, teacher_values=torch.zeros(T, k_teacher, dtype=torch.float16),
                teacher_ids=torch.zeros(T, k_teacher, dtype=torch.int32))
    expected = 4 * T + 4 * T + 8 * k_route + 4 * k_route + 2 * T * k_teacher + 4 * T * k_teacher + 24
    assert e.nbytes() == expected == 14_384
    buf = ReservoirReplay(4, 0)
    buf.add(e)
    buf.add(e)
    assert buf.bytes_per_episode() == expected <= 84 * 1024
    assert buf.bytes_total() == 2 * expected
    assert ReservoirReplay(4, 0).bytes_per_episode() == 0.0


def test_state_dict_round_trip(tmp_path):
    buf = ReservoirReplay(10, 3)
    for s in range(40):
        e = ep(s, task=s % 2, experts=[s % 3, 3])
        e.teacher_values = torch.randn(4, 2).half()
        e.teacher_ids = torch.randint(0, 9, (4, 2), dtype=torch.int32)
        buf.add(e)
    path = tmp_path / "replay.pt"
    torch.save(buf.state_dict(), path)
    state = torch.load(path, weights_only=True)  # what checkpoints use
    other = ReservoirReplay(1, 999)
    other.load_state_dict(state)
    assert other.capacity == 10 and other.seen == 40 and len(other) == 10
    for x, y in zip(buf.episodes, other.episodes, strict=True):
        assert (x.step, x.task_id, x.wake_loss) == (y.step, y.task_id, y.wake_loss)
        for name in ("input_ids", "targets", "expert_ids", "expert_weights", "teacher_values", "teacher_ids"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    # the RNG continues where it was: the same future samples and reservoir decisions
    assert [e.step for e in buf.sample(5)] == [e.step for e in other.sample(5)]
    for s in range(40, 80):
        buf.add(ep(s))
        other.add(ep(s))
    assert [e.step for e in buf.episodes] == [e.step for e in other.episodes]


def test_what_memory_keeps_does_not_depend_on_how_much_it_is_sampled():
    """Ablations with the same seed must hold the same episodes: insertion has its own generator. (With one
    shared generator, full_cls and no_ewc kept different episodes: 596 of 2,000 final slots agreed.)"""
    def tiny(i: int) -> Episode:
        return Episode(torch.tensor([i], dtype=torch.int32), torch.tensor([i], dtype=torch.int32), 0, i,
                       torch.zeros(0, dtype=torch.long), torch.zeros(0), 0.0)

    quiet, busy = ReservoirReplay(20, 3), ReservoirReplay(20, 3)
    for i in range(500):
        quiet.add(tiny(i))
        busy.add(tiny(i))
        if i % 7 == 0:
            busy.sample(5)
            busy.sample_recent(3, since_step=i - 10)
    assert [e.step for e in quiet.episodes] == [e.step for e in busy.episodes]
    state = busy.state_dict()
    again = ReservoirReplay(1, 0)
    again.load_state_dict(state)
    quiet.add(tiny(500))
    again.add(tiny(500))
    assert [e.step for e in quiet.episodes] == [e.step for e in again.episodes]


# ---- the short-term store (replay.recent_capacity) ----------------------------------------------------------
def test_the_short_term_store_keeps_every_episode_since_the_last_sleep_within_the_capacity():
    buf = ReservoirReplay(100, seed=0, recent_capacity=30)
    for s in range(1, 501):  # long past the reservoir's fill: a plain reservoir keeps ~70/500 of the last ones
        buf.add(ep(s))
        if s == 470:
            buf.end_sleep()  # a sleep at step 470: the 30 episodes after it are all in memory
    assert len(buf) <= 100 and len(buf.episodes) == 70 and len(buf.staged) == 30
    assert [e.step for e in buf.recent(since_step=470)] == list(range(471, 501))
    plain = filled(0, 500, capacity=100)
    assert len([e for e in plain.episodes if e.step > 470]) < 30  # what the store is for


def test_the_reservoir_behind_the_store_is_the_same_uniform_sample_of_the_stream():
    """Episodes reach the reservoir once each, in stream order (at sleeps or on overflow), so it keeps exactly
    what a plain reservoir of capacity - recent_capacity keeps from the same stream."""
    staged = ReservoirReplay(100, seed=5, recent_capacity=40)
    for s in range(1, 2001):
        staged.add(ep(s))
        if s % 97 == 0:
            staged.end_sleep()
    staged.end_sleep()
    plain = filled(5, 2000, capacity=60)
    assert [e.step for e in staged.episodes] == [e.step for e in plain.episodes]
    assert staged.seen == plain.seen == 2000


def test_the_short_term_store_overflows_oldest_first_and_is_sampled_with_the_reservoir():
    buf = ReservoirReplay(10, seed=1, recent_capacity=4)
    for s in range(1, 7):
        buf.add(ep(s))
    assert [e.step for e in buf.staged] == [3, 4, 5, 6] and [e.step for e in buf.episodes] == [1, 2]
    assert sorted(e.step for e in buf.sample(100)) == [1, 2, 3, 4, 5, 6]


def test_a_short_term_store_must_leave_room_for_the_reservoir():
    with pytest.raises(ValueError, match="recent_capacity"):
        ReservoirReplay(10, seed=0, recent_capacity=10)


def test_the_short_term_store_survives_a_state_dict_round_trip():
    buf = ReservoirReplay(10, seed=1, recent_capacity=4)
    for s in range(1, 8):
        buf.add(ep(s))
    other = ReservoirReplay(10, seed=99, recent_capacity=4)
    other.load_state_dict(buf.state_dict())
    assert [e.step for e in other.staged] == [e.step for e in buf.staged]
    assert [e.step for e in other.episodes] == [e.step for e in buf.episodes]
    other.end_sleep(), buf.end_sleep()
    assert [e.step for e in other.episodes] == [e.step for e in buf.episodes]
