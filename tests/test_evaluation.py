"""Held-out evaluation on a hand-built stream with known logits (a stub neocortex)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from biollm_cls.benchmarks.base import IGNORE, Batch
from biollm_cls.evaluation import evaluate_seen, evaluate_task

V = 4
X = IGNORE  # unsupervised position


def dist(p_target: float, target: int, argmax: int) -> list[float]:
    """Log-probabilities over V=4 with `argmax` most likely and p(target) = p_target."""
    p = [0.0] * V
    if argmax == target:
        p[target] = p_target
        rest = (1 - p_target) / (V - 1)
        for v in range(V):
            if v != target:
                p[v] = rest
    else:
        p[target] = p_target
        p[argmax] = 0.6
        rest = (1 - p_target - 0.6) / (V - 2)
        for v in range(V):
            if v not in (target, argmax):
                p[v] = rest
    return [math.log(x) for x in p]


UNIFORM = [0.0] * V
# sequence id (input_ids[:, 0]) -> (targets [T=3], per-position logits [T, V])
SEQUENCES = {
    0: ([X, 1, 2], [UNIFORM, dist(0.5, 1, 1), dist(0.4, 2, 2)]),  # both right
    1: ([3, 0, X], [dist(0.7, 3, 3), dist(0.1, 0, 2), UNIFORM]),  # one right, one wrong (argmax 2, target 0)
    2: ([X, X, X], [UNIFORM, UNIFORM, UNIFORM]),  # nothing supervised
}


class StubStream:
    num_tasks, switch_every, task_names, vocab_size, pad_id = 3, 1, ["a", "b", "c"], V, 0

    def __init__(self, tasks: dict[int, list[int]]):
        self.tasks = tasks  # task -> sequence ids

    def heldout(self, task_id: int, batch_size: int):
        seqs = self.tasks[task_id]
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start:start + batch_size]
            ids = torch.tensor([[s, 0, 0] for s in chunk])
            tgt = torch.tensor([SEQUENCES[s][0] for s in chunk])
            yield Batch(ids, tgt, torch.ones_like(ids, dtype=torch.bool), torch.full((len(chunk),), task_id))


TABLE = torch.tensor([SEQUENCES[s][1] for s in sorted(SEQUENCES)])  # (S, T, V)


def hidden_fn(input_ids, attention_mask):
    return TABLE[input_ids[:, 0]]  # the "hidden state" is the logits themselves


def logits_fn(hidden):
    return hidden


def run(stream, task, batch_size):
    return evaluate_task(hidden_fn, logits_fn, stream, task, batch_size, torch.device("cpu"), contextlib.nullcontext)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_scores_on_known_logits(batch_size):
    stream = StubStream({0: [0, 1, 2]})
    s = run(stream, 0, batch_size)
    assert s.n_tokens == 4 and s.n_sequences == 2  # the unsupervised sequence is not counted
    assert s.token_acc == pytest.approx(3 / 4)
    assert s.loss == pytest.approx((-math.log(0.5) - math.log(0.4) - math.log(0.7) - math.log(0.1)) / 4)
    assert s.exact_match == pytest.approx(1 / 2)


def test_exact_match_needs_every_token_right():
    assert run(StubStream({0: [0, 0]}), 0, 2).exact_match == 1.0
    assert run(StubStream({0: [1]}), 0, 1).exact_match == 0.0
    assert run(StubStream({0: [1]}), 0, 1).token_acc == 0.5


def test_zero_token_task_gives_nan_scores():
    for seqs in ([2, 2], []):
        s = run(StubStream({0: seqs}), 0, 2)
        assert s.n_tokens == 0 and s.n_sequences == 0
        assert math.isnan(s.token_acc) and math.isnan(s.loss) and math.isnan(s.exact_match)


def test_evaluate_seen_scores_each_task():
    stream = StubStream({0: [0], 1: [1, 2], 2: [2]})
    scores = evaluate_seen(hidden_fn, logits_fn, stream, [0, 1, 2], 8, torch.device("cpu"), contextlib.nullcontext)
    assert sorted(scores) == [0, 1, 2]
    assert scores[0].token_acc == 1.0 and scores[1].token_acc == 0.5 and math.isnan(scores[2].token_acc)
    assert scores[0].loss == pytest.approx((-math.log(0.5) - math.log(0.4)) / 2)


def test_evaluation_through_a_real_learner(tiny_cfg, make_learner):
    """system == base at init, so both views score the same on the toy held-out set."""
    from biollm_cls.benchmarks.toy import ToyStream

    learner = make_learner(tiny_cfg)
    stream = ToyStream(tiny_cfg)
    args = (learner.logits, stream, 0, 4, torch.device("cpu"), contextlib.nullcontext)
    sys_score, base_score = evaluate_task(learner.system_hidden, *args), evaluate_task(learner.base_hidden, *args)
    assert sys_score == base_score
    assert sys_score.n_tokens == tiny_cfg.benchmark.heldout_size * (tiny_cfg.model.seq_len - 1)  # cue unscored
    assert sys_score.n_sequences == tiny_cfg.benchmark.heldout_size
