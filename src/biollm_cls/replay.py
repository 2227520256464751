"""Episodic memory: a reservoir of compact episodes (what memory holds, not when it is used).

Reservoir sampling (Vitter's Algorithm R) keeps a uniform sample of every episode ever offered, driven by
the buffer's own seeded RNG. An episode is one sequence, stored compactly on the CPU:

* ``input_ids`` int32 [T'] (padding trimmed) and ``targets`` int32 [T'] (IGNORE where unsupervised);
* ``task_id``, ``step``, the routing (``expert_ids`` [k], ``expert_weights`` [k]) and the wake loss;
* the teacher: the system's top-k logits at each supervised position at wake time — values fp16 [n, k]
  and ids int32 [n, k] — or nothing when the teacher is recomputed at sleep time.

At T=256 with 8 teacher logits this is ~14 KB per episode, against ``2*T*V`` bytes (8.4 MB at V=16,384)
for the reference's full-vocabulary teachers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from biollm_cls.benchmarks.base import IGNORE, Batch


@dataclass
class Episode:
    input_ids: torch.Tensor  # int32 [T']
    targets: torch.Tensor  # int32 [T']
    task_id: int
    step: int
    expert_ids: torch.Tensor  # int64 [k] (empty when there is no hippocampus)
    expert_weights: torch.Tensor  # fp32 [k]
    wake_loss: float
    teacher_values: torch.Tensor | None = None  # fp16 [n_supervised, k_teacher]
    teacher_ids: torch.Tensor | None = None  # int32 [n_supervised, k_teacher]

    def nbytes(self) -> int:
        tensors = [self.input_ids, self.targets, self.expert_ids, self.expert_weights,
                   self.teacher_values, self.teacher_ids]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + 8 * 3


class ReservoirReplay:
    """A long-term reservoir, optionally with a short-term store in front of it.

    With ``recent_capacity`` > 0, the episodes since the last sleep are first kept in full in a short-term
    store (the day's episodes, which that night's sleep can replay every one of) and are offered to the
    reservoir when a sleep ends (``end_sleep``), or when the store overflows (oldest first). Both stores
    count against ``capacity``: the reservoir keeps ``capacity - recent_capacity`` episodes, so the memory
    holds no more episodes than a plain reservoir of ``capacity``. The reservoir still receives every
    episode once, in stream order, so what it keeps is the same uniform sample of the stream."""

    def __init__(self, capacity: int, seed: int, recent_capacity: int = 0):
        if not 0 <= recent_capacity < capacity:
            raise ValueError(f"recent_capacity={recent_capacity} must be in [0, capacity={capacity})")
        self.capacity = capacity - recent_capacity  # of the long-term reservoir
        self.recent_capacity = recent_capacity
        self.episodes: list[Episode] = []  # the reservoir
        self.staged: list[Episode] = []  # the short-term store: episodes since the last sleep, in full
        self.seen = 0
        # Insertion has a generator of its own: what memory keeps depends only on the stream, so ablations
        # with the same seed hold the same episodes however much (or little) they sample from it.
        self.insert_rng = random.Random(seed)
        self.rng = random.Random(seed + 7919)  # sampling

    def __len__(self) -> int:
        return len(self.episodes) + len(self.staged)

    def _all(self) -> list[Episode]:
        return self.episodes + self.staged if self.staged else self.episodes

    def add(self, episode: Episode) -> None:
        """Into the short-term store when there is one (its oldest episode overflows into the reservoir),
        else straight into the reservoir."""
        if self.recent_capacity == 0:
            self._offer(episode)
            return
        self.staged.append(episode)
        if len(self.staged) > self.recent_capacity:
            self._offer(self.staged.pop(0))

    def end_sleep(self) -> None:
        """A sleep has replayed the short-term store: its episodes move on to the reservoir."""
        for episode in self.staged:
            self._offer(episode)
        self.staged = []

    def _offer(self, episode: Episode) -> None:
        """Algorithm R: keep the i-th offered episode with probability capacity / i."""
        self.seen += 1
        if len(self.episodes) < self.capacity:
            self.episodes.append(episode)
            return
        slot = self.insert_rng.randrange(self.seen)
        if slot < self.capacity:
            self.episodes[slot] = episode

    def sample(self, n: int, exclude_task: int | None = None) -> list[Episode]:
        """Up to n distinct episodes in random order (optionally none of `exclude_task`)."""
        pool = self._all() if exclude_task is None else [e for e in self._all() if e.task_id != exclude_task]
        return self.rng.sample(pool, min(n, len(pool)))

    def sample_recent(self, n: int, since_step: int) -> list[Episode]:
        """Up to n distinct episodes experienced after `since_step` (the last sleep), in random order."""
        pool = self.recent(since_step)
        return self.rng.sample(pool, min(n, len(pool)))

    def recent(self, since_step: int) -> list[Episode]:
        """Every stored episode experienced after `since_step` (oldest first within each store)."""
        return [e for e in self._all() if e.step > since_step]

    def sample_by_expert(self, expert: int, n: int) -> list[Episode]:
        """Up to n episodes that were routed to `expert` (vectorised membership test)."""
        table = self._expert_table()
        if table is None:
            return []
        idx = (table == expert).any(1).nonzero().flatten().tolist()
        everything = self._all()
        return [everything[i] for i in self.rng.sample(idx, min(n, len(idx)))]

    def _expert_table(self) -> torch.Tensor | None:
        """[N,k] expert ids of every episode (None without a hippocampus)."""
        everything = self._all()
        if not everything or everything[0].expert_ids.numel() == 0:
            return None
        return torch.stack([e.expert_ids for e in everything])

    def sample_per_expert(self, num_experts: int, n: int) -> list[list[Episode]]:
        """For every expert, up to n episodes routed to it (one membership table for all experts)."""
        table = self._expert_table()  # (N, k)
        if table is None:
            return [[] for _ in range(num_experts)]
        everything, out = self._all(), []
        for expert in range(num_experts):
            idx = (table == expert).any(1).nonzero().flatten().tolist()
            out.append([everything[i] for i in self.rng.sample(idx, min(n, len(idx)))])
        return out

    def bytes_total(self) -> int:
        return sum(e.nbytes() for e in self._all())

    def bytes_per_episode(self) -> float:
        return self.bytes_total() / len(self) if len(self) else 0.0

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "recent_capacity": self.recent_capacity, "seen": self.seen,
                "rng": self.rng.getstate(), "insert_rng": self.insert_rng.getstate(),
                "episodes": [vars(e) for e in self.episodes], "staged": [vars(e) for e in self.staged]}

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.seen = state["capacity"], state["seen"]
        self.recent_capacity = state.get("recent_capacity", 0)
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.insert_rng.setstate(_as_rng_state(state["insert_rng"]))
        self.episodes = [_episode(e) for e in state["episodes"]]
        self.staged = [_episode(e) for e in state.get("staged", [])]


def _episode(fields: dict) -> Episode:
    return Episode(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in fields.items()})


def _as_rng_state(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def episodes_from_batch(batch: Batch, step: int, expert_ids: torch.Tensor | None,
                        expert_weights: torch.Tensor | None, row_loss: torch.Tensor,
                        teacher_values: torch.Tensor | None, teacher_ids: torch.Tensor | None) -> list[Episode]:
    """Split one wake batch (already on the CPU) into episodes. Teacher tensors are [N_sup, k] in
    row-major supervised-position order, so row b owns the next `n_b` teacher rows."""
    lengths = batch.attention_mask.sum(1).tolist()
    n_sup = batch.supervised.sum(1).tolist()
    offsets = [0]
    for n in n_sup:
        offsets.append(offsets[-1] + n)
    empty = torch.zeros(0, dtype=torch.long)
    out = []
    for b, (length, task) in enumerate(zip(lengths, batch.task_ids.tolist(), strict=True)):
        sl = slice(offsets[b], offsets[b + 1])
        out.append(Episode(
            input_ids=batch.input_ids[b, :length].to(torch.int32).clone(),
            targets=batch.targets[b, :length].to(torch.int32).clone(),
            task_id=int(task),
            step=step,
            expert_ids=expert_ids[b].clone() if expert_ids is not None else empty,
            expert_weights=expert_weights[b].float().clone() if expert_weights is not None else empty.float(),
            wake_loss=float(row_loss[b]),
            teacher_values=teacher_values[sl].clone() if teacher_values is not None else None,
            teacher_ids=teacher_ids[sl].clone() if teacher_ids is not None else None,
        ))
    return out


def collate(episodes: list[Episode], pad_id: int) -> Batch:
    """Right-pad episodes into a Batch (CPU)."""
    T = max(e.input_ids.numel() for e in episodes)
    B = len(episodes)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, e in enumerate(episodes):
        n = e.input_ids.numel()
        ids[b, :n], tgt[b, :n], mask[b, :n] = e.input_ids, e.targets, True
    tasks = torch.tensor([e.task_id for e in episodes], dtype=torch.long)
    return Batch(input_ids=ids, targets=tgt, attention_mask=mask, task_ids=tasks)
