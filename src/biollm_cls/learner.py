"""The two memory systems side by side, and the two ways of reading them out.

``Learner`` holds the neocortex (slow base), the hippocampus (fast MoE, absent in the no-hippocampus
ablation and the baselines), one optimizer for each, and the precision policy. ``system_hidden`` is one
forward of base + hippocampal delta (as deployed); ``base_hidden`` is the same pass without the delta.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from biollm_cls.hippocampus import Hippocampus, Routing
from biollm_cls.step_graphs import StepGraphs


@dataclass
class Precision:
    """bf16/fp16 autocast on CUDA only; a GradScaler for fp16. Weights stay fp32 (master weights)."""

    device: torch.device
    enabled: bool
    dtype: torch.dtype
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, device: torch.device, amp_enabled: bool, amp_dtype: str) -> Precision:
        enabled = amp_enabled and device.type == "cuda"
        dtype = torch.bfloat16 if amp_dtype == "bf16" else torch.float16
        scaler = torch.amp.GradScaler("cuda") if enabled and dtype == torch.float16 else None
        return cls(device, enabled, dtype, scaler)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


@dataclass
class Learner:
    neocortex: nn.Module
    hippocampus: Hippocampus | None
    base_optimizer: torch.optim.Optimizer
    fast_optimizer: torch.optim.Optimizer | None
    precision: Precision
    device: torch.device
    last_routing: list[Routing] = field(default_factory=list)
    last_split: torch.Tensor | None = None  # [B,T,H] base state at the injection point (keep_split passes)
    graphs: StepGraphs | None = None  # train.cuda_graphs: wake and sleep steps captured as CUDA graphs
    compiled_losses: bool = False  # the head losses' passes as torch.compile kernels (token_losses.py)

    def restored(self) -> None:
        """After a checkpoint replaced weights' or optimizers' state: captured steps would update the old tensors,
        and a loaded optimizer's param groups carry the flags of the run that saved them."""
        if self.graphs is not None:
            self.graphs.invalidate()
            for opt in (self.base_optimizer, self.fast_optimizer):
                for group in opt.param_groups if opt is not None else []:
                    group["capturable"] = True

    def system_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      track_stats: bool = False, keep_split: bool = False) -> torch.Tensor:
        """Base + hippocampus in one pass; the routing of this call is left in `last_routing`.
        `keep_split`: also leave the base's hidden state at the injection point in `last_split` (detached)."""
        if self.hippocampus is None:
            return self.base_hidden(input_ids, attention_mask, keep_split)
        self.last_routing.clear()

        def inject(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            if keep_split:
                self.last_split = h.detach()
            delta, routing = self.hippocampus(h, mask, track_stats=track_stats)  # (B, T, H)
            self.last_routing.append(routing)
            return delta

        return self.neocortex.hidden(input_ids, attention_mask, inject=inject)

    def base_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    keep_split: bool = False) -> torch.Tensor:
        if not keep_split:
            return self.neocortex.hidden(input_ids, attention_mask)

        def keep(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            self.last_split = h.detach()
            return torch.zeros_like(h)

        return self.neocortex.hidden(input_ids, attention_mask, inject=keep)

    @property
    def can_resume(self) -> bool:
        """Whether the neocortex can run its upper layers alone from a kept injection-point state."""
        return bool(getattr(self.neocortex, "can_resume", False))

    def system_hidden_from_split(self, split: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The system's final hidden state from the base's state at the injection point [B,T,H] (`last_split`
        of an earlier pass): the hippocampus and the upper layers only. Perf, exact where the lower stack gave
        that state unchanged (a base that did not learn in between, in eval mode)."""
        delta, routing = self.hippocampus(split, attention_mask)  # (B, T, H)
        self.last_routing[:] = [routing]
        return self.neocortex.resume(split + delta.to(split.dtype), attention_mask)


    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.neocortex.logits(hidden)

    @contextlib.contextmanager
    def frozen_base(self):
        """Perf (no change in what is learned): stop autograd from tracking the base's weights for a while.

        When sleep trains the base, its weights keep ``requires_grad=True``; a wake forward that trains only the
        hippocampus would then record the lower layers (keeping their activations) and its backward would
        compute, and accumulate into ``.grad``, a gradient for every base weight that no optimizer reads (sleep
        and the Fisher zero ``.grad`` before their own backward). Inside this context the backward runs only
        from the loss down to the injection point and computes activation gradients, not weight gradients, in
        the upper layers: the hippocampus's gradients are the same. Set back on exit, also on error.
        """
        params = [p for p in self.neocortex.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.neocortex.parameters() if p.requires_grad]

    def step_optimizer(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float | torch.Tensor,
                       grad_clip: float, add_grad: Callable[[], None] | None = None,
                       skip: torch.Tensor | None = None) -> None:
        """Unscale (fp16), add `add_grad`'s terms, clip, set this step's learning rate, step.

        `add_grad` adds a gradient computed outside the backward (the EWC penalty) to ``.grad``. It runs after
        the GradScaler's unscale, where the gradients are at their true scale: added before, it would be divided
        by the loss scale with them (at scale 1024 a penalty gradient of 10 arrived as 0.0098).
        `skip` (a device bool, captured steps): the fused AdamW leaves weights, moments and step count as they
        are where it is True, read on the device as a GradScaler's ``found_inf``; `lr` may be a device tensor."""
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler = self.precision.scaler
        if scaler is not None:
            scaler.unscale_(optimizer)
        if add_grad is not None:
            add_grad()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
        elif skip is None:
            optimizer.step()
        else:
            optimizer.found_inf = skip.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf

    def backward(self, loss: torch.Tensor) -> None:
        if self.precision.scaler is not None:
            self.precision.scaler.scale(loss).backward()
        else:
            loss.backward()

    def end_update(self) -> None:
        if self.precision.scaler is not None:
            self.precision.scaler.update()


def scored_positions(supervised: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,T] bool -> ([size] flat index of each supervised position in row-major order, then index 0 as padding;
    [size] bool, False on that padding). No host sync (`nonzero_static`): `size` fixes the shape, so a step can
    score exactly its supervised positions (size = their count) or B*T positions (a captured step's fixed shape)."""
    flat_mask = supervised.flatten()
    flat = torch.nonzero_static(flat_mask, size=size, fill_value=0).squeeze(1)  # (size,)
    return flat, torch.arange(size, device=flat.device) < flat_mask.sum()


def per_row_weighted_mean(values: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, num_rows: int
                          ) -> torch.Tensor:
    """Weighted mean of per-position `values` [N] per row -> [num_rows] (0 for rows of zero weight); no sync."""
    w = weights.to(values.dtype)
    total = torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add_(0, rows, values * w)
    count = torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add_(0, rows, w)
    return total / count.clamp(min=1)


def supervised_rows(supervised: torch.Tensor) -> torch.Tensor:
    """[B,T] bool -> [N] row index of each supervised position, in row-major order."""
    rows = torch.arange(supervised.shape[0], device=supervised.device).unsqueeze(1)
    return rows.expand_as(supervised)[supervised]


def per_row_mean(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Mean of per-token `values` [N] per row -> [num_rows] (0 for rows without tokens)."""
    total = torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add_(0, rows, values)
    count = torch.zeros(num_rows, device=values.device, dtype=values.dtype).index_add_(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


def to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """CPU copies of device tensors (None stays None): on CUDA every copy is issued asynchronously (into pinned
    memory) and the host waits once for all of them, instead of one synchronising copy each."""
    cuda = [t for t in tensors if t is not None and t.device.type == "cuda"]
    if not cuda:
        return [None if t is None else t.cpu() for t in tensors]
    out = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(cuda[0].device).synchronize()
    return out
