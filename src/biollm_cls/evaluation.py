"""Held-out evaluation of seen tasks at a task boundary, in one view.

A *view* is a callable ``hidden_fn(input_ids, attention_mask) -> hidden [B,T,H]`` plus the neocortex's
``logits``: ``system`` (base + hippocampus, as deployed) or ``base`` (the consolidated neocortex alone).
Scores are teacher-forced on supervised positions only: token accuracy, mean token loss (nats), token
count, and sequence exact match (every supervised token of the sequence right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import ContinualStream

HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TaskScore:
    token_acc: float  # NaN when n_tokens == 0
    loss: float
    n_tokens: int
    exact_match: float
    n_sequences: int


@torch.no_grad()
def evaluate_task(hidden_fn: HiddenFn, logits_fn: Callable, stream: ContinualStream, task_id: int,
                  batch_size: int, device: torch.device, autocast) -> TaskScore:
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    exact = torch.zeros((), dtype=torch.float64, device=device)
    tokens, sequences = 0, 0
    for batch in stream.heldout(task_id, batch_size):
        batch = batch.to(device)
        sup = batch.supervised  # (B, T)
        with autocast():
            hidden = hidden_fn(batch.input_ids, batch.attention_mask)  # (B, T, H)
            logits = logits_fn(hidden[sup]).float()  # (N, V)
        targets = batch.targets[sup]  # (N,)
        nll += F.cross_entropy(logits, targets, reduction="sum").double()
        hit = logits.argmax(-1) == targets  # (N,)
        correct += hit.sum()
        row = torch.arange(sup.shape[0], device=device).unsqueeze(1).expand_as(sup)[sup]  # (N,) row of each token
        wrong_per_row = torch.zeros(sup.shape[0], device=device).index_add_(0, row, (~hit).float())
        has_tokens = sup.any(1)
        exact += ((wrong_per_row == 0) & has_tokens).sum()
        tokens += int(sup.sum())
        sequences += int(has_tokens.sum())
    if tokens == 0:
        nan = float("nan")
        return TaskScore(nan, nan, 0, nan, 0)
    return TaskScore(
        token_acc=float(correct) / tokens,
        loss=float(nll) / tokens,
        n_tokens=tokens,
        exact_match=float(exact) / max(sequences, 1),
        n_sequences=sequences,
    )


def evaluate_seen(hidden_fn: HiddenFn, logits_fn: Callable, stream: ContinualStream, seen: list[int],
                  batch_size: int, device: torch.device, autocast) -> dict[int, TaskScore]:
    return {t: evaluate_task(hidden_fn, logits_fn, stream, t, batch_size, device, autocast) for t in seen}
