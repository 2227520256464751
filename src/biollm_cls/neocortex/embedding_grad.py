"""A trained base's token-embedding gradient added in place to ``.grad`` (perf: memory; what is learned is unchanged).

Why: with a tied head (Qwen2.5: one [151,936 x 896] fp32 weight, 0.54 GB, for the input embedding and the LM
head), autograd's backward makes two full-size gradients for it: the head's (a zero tensor with the active rows
filled in), held in the engine's input buffer from the start of the backward, and the embedding lookup's
(dense), made at its end, when every other gradient exists too; the engine sums them before ``.grad`` gets the
result. Here both backward functions add their part straight into ``.grad`` (the head: its active rows,
computed as autograd does, in the autocast dtype; the lookup: the batch's rows, by ``index_put_`` with
accumulation, which has a deterministic kernel when deterministic algorithms are on), so one full-size tensor
exists. Measured (H200, Qwen2.5-0.5B shape, B x T = 4 x 256, captured sleep step, bench runs ``issue12_s5`` ->
``issue12_s6``, which also changed the fused losses' kernels): the step's peak above its gradients 0.549 ->
0.453 GB, the CUDA-graph pool 3.20 -> 2.74 GB. Under
``torch.compile`` the plain ops run instead (inductor fuses the two gradients by itself).

Limit: the gradient reaches ``weight.grad`` only, as ``loss.backward()`` leaves it; ``torch.autograd.grad`` on
the weight would not return it (nothing in biollm-cls calls that on base weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _EmbeddingGradInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)  # (..., H)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out (..., H)
        if ctx.needs_input_grad[1]:
            (ids,) = ctx.saved_tensors
            weight = ctx.weight
            idx = ids.reshape(-1)  # (N,)
            rows = grad_out.reshape(idx.numel(), -1).to(weight.dtype)  # (N, H)
            if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
                rows = rows * (idx != ctx.padding_idx).unsqueeze(1).to(rows.dtype)
            _add_to_grad(weight, idx, rows)
        return None, None, None


def _add_to_grad(weight: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    if isinstance(rows, slice):
        weight.grad[rows] += values
    else:
        weight.grad.index_put_((rows,), values.to(weight.dtype), accumulate=True)


class _HeadGradInPlace(torch.autograd.Function):
    """logits = hidden @ weight[:rows].T in the autocast dtype (as F.linear under autocast); the weight's
    gradient is added to ``weight.grad[:rows]`` instead of being returned."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h, w = hidden.to(dtype), weight[:rows].to(dtype)  # (..., H), (V, H)
        ctx.save_for_backward(h, w)
        ctx.weight, ctx.rows, ctx.hidden_dtype = weight, rows, hidden.dtype
        return h @ w.T  # (..., V)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out (..., V)
        h, w = ctx.saved_tensors
        g = grad_out.to(h.dtype)
        grad_hidden = (g @ w).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None  # (..., H)
        if ctx.needs_input_grad[1]:
            _add_to_grad(ctx.weight, slice(0, ctx.rows), g.reshape(-1, g.shape[-1]).T @ h.reshape(-1, h.shape[-1]))
        return grad_hidden, None, None


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, rows: int) -> torch.Tensor:
    """hidden [..., H] -> logits [..., rows] over the first `rows` rows of a tied head `weight`, its gradient
    added in place (for a weight whose embedding got `accumulate_embedding_grad_in_place`)."""
    if torch.compiler.is_compiling() or not weight.requires_grad:
        return F.linear(hidden, weight[:rows])
    return _HeadGradInPlace.apply(hidden, weight, rows)


def _forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or not module.weight.requires_grad:
        return F.embedding(ids, module.weight, module.padding_idx)
    return _EmbeddingGradInPlace.apply(ids, module.weight, module.padding_idx)


def accumulate_embedding_grad_in_place(module: nn.Module | None) -> bool:
    """Give a plain ``nn.Embedding`` the in-place backward; True if it got it. Subclasses (scaled embeddings)
    and options the in-place rows do not reproduce (max_norm, scale_grad_by_freq, sparse) keep autograd's."""
    if type(module) is not nn.Embedding or module.max_norm is not None or module.scale_grad_by_freq \
            or module.sparse:
        return False
    module.forward = _forward.__get__(module)  # an instance attribute: the class and other instances unchanged
    return True
