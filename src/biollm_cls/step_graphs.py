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
* its outputs are copied into buffers of the graph's own, so the next replay of the same graph overwrites
  them: copy what you keep (a device op queued behind the replay is enough).

The first `warmup` calls of a key run eagerly on the capture stream: they initialise optimizer state, compiled
kernels and library workspaces outside the graph. The next call captures the step and replays it (a capture
records kernels without running them). Beyond `max_graphs` keys, steps run eagerly.

Memory: every graph allocates its intermediates (activations, gradients) in one private pool, which later
captures reuse (graphs never run concurrently), so the pool holds about the largest step's peak, not their sum.
Reuse needs the pool empty between captures: a block left allocated in it splits its free space, and a later
capture's large tensors (a 0.5 GB embedding gradient) then no longer fit in the holes; measured at 4x256 on the
H200, a wake graph's 7 MB of outputs left in the pool cost the next (sleep) capture 0.7 GB. So the outputs are
copied into buffers made outside the pool (their shapes known from the eager warm-up), and the step's ``.grad``
references are dropped after capture (`run`'s `after_capture`). ``expandable_segments`` (PYTORCH_CUDA_ALLOC_CONF)
lets the pool's free space grow contiguously, as measured at 8x512 (pool 7.5 -> 6.2 GB): `StepGraphs` turns it
on for the process (for the segments made from then on) unless ``PYTORCH_CUDA_ALLOC_CONF`` is set, which wins.
"""

from __future__ import annotations

import os
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
    outputs: tuple[torch.Tensor | None, ...]  # the graph's output buffers (outside the pool)


class StepGraphs:
    def __init__(self, device: torch.device, warmup: int = 2, max_graphs: int = 16):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device, self.warmup, self.max_graphs = device, max(1, warmup), max_graphs
        if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:  # the module's Memory note; the user's setting wins
            # torch >= 2.10 deprecates the second name for the first
            setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or \
                torch.cuda.memory._set_allocator_settings
            setter("expandable_segments:True")
        self.stream = torch.cuda.Stream(device)  # warm-up and capture stream (lazy per-stream state lives here)
        self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        self._graphs: dict[Hashable, _Captured] = {}
        self._calls: Counter = Counter()
        self._outputs_like: dict[Hashable, tuple] = {}  # per key: the eager steps' output (shape, dtype)s
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
        self._outputs_like.clear()

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
                out = self._on_stream(fn, inputs)
                self._outputs_like[key] = tuple(None if t is None else (t.shape, t.dtype) for t in out)
                return out
            entry = self._graphs[key] = self._capture(fn, inputs, self._outputs_like[key])
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
            if t is not None:
                t.record_stream(current)
        return out

    def _capture(self, fn: StepFn, inputs: dict[str, torch.Tensor], outputs_like: tuple) -> _Captured:
        # outside the pool: the input and output buffers outlive every replay (see the module's Memory note)
        static = {name: t.clone() for name, t in inputs.items()}
        buffers = tuple(None if like is None else torch.empty(like[0], dtype=like[1], device=self.device)
                        for like in outputs_like)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            outputs = fn(static)
            if len(outputs) != len(buffers):
                raise RuntimeError(f"a captured step returned {len(outputs)} outputs, its eager steps {len(buffers)}")
            for buffer, t in zip(buffers, outputs, strict=True):
                if buffer is not None:
                    if (t.shape, t.dtype) != (buffer.shape, buffer.dtype):
                        raise RuntimeError(f"a captured step returned a {t.dtype} {list(t.shape)} output where its "
                                           f"eager steps returned {buffer.dtype} {list(buffer.shape)}")
                    buffer.copy_(t)
            del outputs
        self.captures += 1
        return _Captured(graph, static, buffers)

    def pool_bytes(self) -> tuple[int, int]:
        """(reserved, allocated) bytes of the graphs' private pool; allocated is ~0 between steps (outputs live
        outside it, see the module's Memory note)."""
        segments = [seg for seg in torch.cuda.memory._snapshot()["segments"]
                    if tuple(seg.get("segment_pool_id", (0, 0))) == tuple(self.pool)]
        return sum(seg["total_size"] for seg in segments), sum(seg["allocated_size"] for seg in segments)

    def stats(self) -> dict[str, int]:
        return {"graphs": len(self._graphs), "captures": self.captures, "replays": self.replays,
                "eager_steps": self.eager_steps}
