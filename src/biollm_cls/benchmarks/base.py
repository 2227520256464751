"""What a continual benchmark gives the learner: batches on a fixed task schedule, and held-out data.

Steps are 1-based. Task ``i`` (0-based, training order) owns steps ``i*switch_every+1 .. (i+1)*switch_every``;
the boundary after task ``i`` is step ``(i+1)*switch_every``. A stream has exactly
``num_tasks * switch_every`` steps: no partial segment, no wrap-around.
Batches are a pure function of ``(seed, step)``, so every ablation sees the same data and a resumed
run continues the same stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B,T] long
    targets: torch.Tensor  # [B,T] long, IGNORE where not supervised
    attention_mask: torch.Tensor  # [B,T] bool, False on padding; right padding only (`is_right_padded`)
    task_ids: torch.Tensor  # [B] long (rows of a joint batch come from different tasks)

    def to(self, device: torch.device) -> Batch:
        return Batch(*(to_device(t, device) for t in
                       (self.input_ids, self.targets, self.attention_mask, self.task_ids)))

    @property
    def supervised(self) -> torch.Tensor:
        return self.targets != IGNORE  # [B,T] bool

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` on `device`. CPU -> CUDA goes through pinned memory: a copy from pageable memory makes the host wait
    until the GPU has finished the work queued before it, so the next step could not be prepared meanwhile."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def is_right_padded(mask: torch.Tensor) -> bool:
    """[B,T] bool: no padded position before a real one in any row. Replay stores a row as its first
    ``mask.sum()`` ids, and the HF neocortex runs pure-causal attention: both need right padding."""
    return not bool((mask[:, 1:] & ~mask[:, :-1]).any())


@runtime_checkable
class ContinualStream(Protocol):
    num_tasks: int
    switch_every: int
    task_names: list[str]  # index = task id = position in the training order
    vocab_size: int  # the model must cover ids in [0, vocab_size)
    pad_id: int

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Training batch of `step` (1-based) for the task scheduled then (all tasks when order=joint)."""

    def heldout(self, task_id: int, batch_size: int) -> Iterator[Batch]:
        """Held-out batches of one task (drawn from a stream separate from training data)."""

    def describe(self) -> dict:
        """Facts recorded in run_metadata.json (sizes, sources, checksums, dropped counts)."""


def task_at(step: int, switch_every: int) -> int:
    """0-based task id scheduled at 1-based `step`."""
    return (step - 1) // switch_every


def is_boundary(step: int, switch_every: int) -> bool:
    return step % switch_every == 0


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, stream): reproducible and resumable."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g
