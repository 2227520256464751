"""The synthetic token toy stream: tasks that conflict on the same inputs.

Each task ``i`` is its own random permutation ``pi_i`` of the content vocabulary, applied position-wise:
the target at position ``t`` is ``pi_i(x_t)``. All tasks share the input distribution, so learning task
``i+1`` overwrites task ``i`` in any shared weights (forgetting is real). With ``task_cue`` the first token
names the task (ids ``0..num_tasks-1`` are reserved as cues), so a learner *can* keep tasks apart, e.g. by
routing whole sequences to different experts; the cue position is not scored.
Every task is distinct for any ``num_tasks`` (permutations are redrawn until pairwise different), training
batches come from ``step_generator(seed, step)`` and held-out data from a separate generator stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from biollm_cls.benchmarks.base import IGNORE, Batch, step_generator, task_at
from biollm_cls.config.schema import ConfigError, RunConfig

_HELDOUT_STREAM = 1
_TASK_STREAM = 2


class ToyStream:
    def __init__(self, cfg: RunConfig):
        b = cfg.benchmark
        self.num_tasks, self.switch_every = b.num_tasks, b.switch_every
        self.vocab_size = cfg.model.vocab_size
        self.seq_len = cfg.model.seq_len
        self.seed, self.joint = cfg.seed, b.order == "joint"
        self.cue = b.task_cue
        self.pad_id = 0
        self.first_content = self.num_tasks if self.cue else 0
        content = self.vocab_size - self.first_content
        if content < 4:
            raise ConfigError(
                f"model.vocab_size={self.vocab_size} leaves {content} content tokens after {self.first_content} task "
                f"cues: raise model.vocab_size (>= {self.first_content + 4})"
            )
        if content < 8 and self.num_tasks >= math.factorial(content):
            raise ConfigError(
                f"benchmark.num_tasks={self.num_tasks} needs more distinct task maps than {content} content tokens "
                f"allow ({math.factorial(content) - 1}): raise model.vocab_size"
            )
        self.task_names = [f"toy_{i}" for i in range(self.num_tasks)]
        self.maps = self._draw_maps(content)  # (num_tasks, V) full-vocabulary lookup tables
        gen = step_generator(self.seed, 0, _HELDOUT_STREAM)
        self._heldout = [self._sample(torch.full((b.heldout_size,), t), gen) for t in range(self.num_tasks)]

    def _draw_maps(self, content: int) -> torch.Tensor:
        gen = step_generator(self.seed, 0, _TASK_STREAM)
        perms: list[torch.Tensor] = []
        while len(perms) < self.num_tasks:
            p = torch.randperm(content, generator=gen)
            if all(not torch.equal(p, q) for q in perms) and not torch.equal(p, torch.arange(content)):
                perms.append(p)
        maps = torch.arange(self.vocab_size).repeat(self.num_tasks, 1)  # identity on cue ids
        for t, p in enumerate(perms):
            maps[t, self.first_content:] = p + self.first_content
        return maps

    def _sample(self, task_ids: torch.Tensor, gen: torch.Generator) -> Batch:
        B, T = task_ids.shape[0], self.seq_len
        x = torch.randint(self.first_content, self.vocab_size, (B, T), generator=gen)  # (B, T)
        y = self.maps[task_ids.unsqueeze(1), x]  # (B, T) position-wise map of each row's task
        if self.cue:
            x[:, 0] = task_ids
            y[:, 0] = IGNORE
        mask = torch.ones(B, T, dtype=torch.bool)
        return Batch(input_ids=x, targets=y, attention_mask=mask, task_ids=task_ids.clone())

    def train_batch(self, step: int, batch_size: int) -> Batch:
        gen = step_generator(self.seed, step)
        if self.joint:
            tasks = torch.randint(0, self.num_tasks, (batch_size,), generator=gen)
        else:
            tasks = torch.full((batch_size,), task_at(step, self.switch_every))
        return self._sample(tasks, gen)

    def heldout(self, task_id: int, batch_size: int) -> Iterator[Batch]:
        data = self._heldout[task_id]
        for start in range(0, len(data), batch_size):
            sl = slice(start, start + batch_size)
            yield Batch(data.input_ids[sl], data.targets[sl], data.attention_mask[sl], data.task_ids[sl])

    def describe(self) -> dict:
        return {
            "benchmark": "toy", "num_tasks": self.num_tasks, "switch_every": self.switch_every,
            "vocab_size": self.vocab_size, "seq_len": self.seq_len, "task_cue": self.cue,
            "order": "joint" if self.joint else "sequential", "heldout_per_task": len(self._heldout[0]),
            "chance_token_acc": 1.0 / (self.vocab_size - self.first_content),
        }
