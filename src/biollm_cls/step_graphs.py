"""Whole training steps captured as CUDA graphs and replayed (``train.cuda_graphs``, CUDA only).

Why: at small batches a step on a large GPU is bound by the host launching its ~2,000 kernels, not by the GPU
(bench/RESULTS_notes.md: a sleep step at 4x256 kept an H200 busy for 20 of its 70 ms). A captured step is
launched as one graph: the host cost of the Python, the autograd engine and the dispatcher is paid once, at
capture.

The contract of a step function ``fn(inputs: dict[str, Tensor]) -> tuple[Tensor, ...]``:

* device work only: no host sync (``.item()``, ``nonzero``, a device-to-host copy), no tensor made from Python
  data on the device, no control flow on tensor values; its shapes are fixed by its inputs' shapes;
* what varies from step to step comes in through `inputs` (copied into the graph's own input buffers before
  each replay); Python values it reads (a learning rate, a row count) belong in the key;
* what it reads or updates across steps (weights, optimizer moments, EWC state, the hippocampus's buffers)
  exists before the capture and keeps its storage; code that replaces such a tensor must call `invalidate`;
* its outputs live in a memory pool shared by every graph of the learner, so the next replay of *any* of them
  overwrites them: copy what you keep (a device op queued behind the replay is enough).

The first `warmup` calls of a key run eagerly on the capture stream: they initialise optimizer state, compiled
kernels and library workspaces outside the graph. The next call captures the step and replays it (a capture
records kernels without running them). Beyond `max_graphs` keys, steps run eagerly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import IGNORE, Batch

StepFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


PAD_MULTIPLE = 64  # captured steps: batches right-padded to a multiple of this many positions (fewer shapes)


def padded_inputs(batch: Batch, max_len: int) -> tuple[dict[str, torch.Tensor], int]:
    """A captured step's batch inputs, right-padded to a multiple of `PAD_MULTIPLE` positions (never past
    `max_len`), and its number of scored positions B*T. The padding is unsupervised and masked, and a causal
    model's real positions never see it."""
    B, T = batch.input_ids.shape
    pad = max(0, min(-T % PAD_MULTIPLE, max_len - T))
    inputs = {"input_ids": F.pad(batch.input_ids, (0, pad)), "attention_mask": F.pad(batch.attention_mask, (0, pad)),
              "targets": F.pad(batch.targets, (0, pad), value=IGNORE)}
    return inputs, B * (T + pad)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the graph's input buffers
    outputs: tuple[torch.Tensor, ...]


class StepGraphs:
    def __init__(self, device: torch.device, warmup: int = 2, max_graphs: int = 16):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device, self.warmup, self.max_graphs = device, max(1, warmup), max_graphs
        self.stream = torch.cuda.Stream(device)  # warm-up and capture stream (lazy per-stream state lives here)
        self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        self._graphs: dict[Hashable, _Captured] = {}
        self._calls: Counter = Counter()
        self._scalars: dict[str, torch.Tensor] = {}
        self.captures = self.replays = self.eager_steps = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def scalar(self, name: str) -> torch.Tensor:
        """A persistent fp32 device scalar that steps write and graphs read (a learning rate): made on first use,
        which is an eager warm-up step, outside any capture."""
        if name not in self._scalars:
            self._scalars[name] = torch.zeros((), device=self.device)
        return self._scalars[name]

    def invalidate(self) -> None:
        """Forget every graph (state a graph reads was replaced, e.g. by a checkpoint restore)."""
        self._graphs.clear()
        self._calls.clear()

    def run(self, key: Hashable, fn: StepFn, inputs: dict[str, torch.Tensor],
            after_capture: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
        """One step: eager while warming up, then captured once and replayed. `after_capture` runs right after a
        capture (e.g. to drop ``.grad`` references into the graph's pool, so eager code never accumulates there)."""
        key = (key, tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items()))
        entry = self._graphs.get(key)
        if entry is None:
            if self._calls[key] < self.warmup or len(self._graphs) >= self.max_graphs:
                self._calls[key] += 1
                self.eager_steps += 1
                return self._on_stream(fn, inputs)
            entry = self._graphs[key] = self._capture(fn, inputs)
            if after_capture is not None:
                after_capture()
        for name, t in inputs.items():
            entry.inputs[name].copy_(t, non_blocking=True)
        entry.graph.replay()
        self.replays += 1
        return entry.outputs

    def _on_stream(self, fn: StepFn, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = fn(inputs)
        current.wait_stream(self.stream)
        for t in out:  # made on the side stream, used (and freed) on the current one
            t.record_stream(current)
        return out

    def _capture(self, fn: StepFn, inputs: dict[str, torch.Tensor]) -> _Captured:
        static = {name: t.clone() for name, t in inputs.items()}  # outside the pool: they outlive every replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = fn(static)
        self.captures += 1
        return _Captured(graph, static, outputs)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self._graphs), "captures": self.captures, "replays": self.replays,
                "eager_steps": self.eager_steps}
