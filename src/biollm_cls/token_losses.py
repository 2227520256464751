"""Per-token cross-entropy and top-k distillation KL over the capped head's logits, computed in fp32 a chunk of
rows at a time from the logits as the head returns them (bf16 under autocast).

Why (perf: memory and bandwidth; the values are the usual ones): ``F.cross_entropy(logits.float())`` makes an
fp32 copy of the [N, V] logits, keeps its fp32 log-softmax for the backward, and the backward then builds fp32
[N, V] gradients for the CE and (a scattered one) for the KL before casting their sum to bf16: at 16 x 1024
positions and V = 16,384 each of those is 1.07 GB. Here the forward keeps only the logits (which exist anyway)
and the backward writes one gradient in the logits' dtype, recomputing the softmax chunk by chunk (``chunk_bytes``
of fp32 at a time), each with one kernel that reads the chunk and writes its fp32 (log-)softmax: about half the
memory traffic of the unfused losses. The backward then writes ``scale * softmax`` in the logits' dtype in one
more pass and sets the few positions the one-hot and the KL change from fp32 values computed apart (12 bytes
per logit in all, against 20 with an in-place fp32 scaling and a separate cast).

With ``compiled=True`` (the learner sets it on CUDA with ``train.compile_model``) the two passes over the
logits are ``torch.compile`` kernels instead of chunked eager ones: the forward reads each row once for its
log-sum-exp and target logit (keeping [N] fp32 log-sum-exps for the backward), and the backward writes
``scale * exp(z - lse)`` in the logits' dtype in one read and one write; no fp32 [n, V] chunk is ever written
(perf: at 16 x 1024 positions the eager chunks' casts, (log-)softmaxes and products took ~6 ms of a 60 ms wake
step on the H200, bench/RESULTS_notes.md stage 8). The same values up to fp32 summation order.

The KL is the one of ``sleep.topk_kl``: teacher and student both renormalised over the teacher's k ids, scaled by
T^2; its gradient lives on those k ids only: T * (p_S - p_T) per unit of loss.
"""

from __future__ import annotations

import functools

import torch

from biollm_cls.benchmarks.base import IGNORE

CHUNK_BYTES = 1 << 27  # 128 MiB of fp32 logits per chunk


def _chunks(n_rows: int, vocab: int, chunk_bytes: int) -> list[slice]:
    step = max(1, chunk_bytes // (4 * max(1, vocab)))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _topk_dist(logits: torch.Tensor, t_values: torch.Tensor, t_ids: torch.Tensor, temperature: float):
    """(KL [N], p_S [N,k], p_T [N,k]): the student's logits gathered on the teacher's ids, both renormalised."""
    log_pt = torch.log_softmax(t_values.float() / temperature, dim=-1)  # (N, k)
    log_ps = torch.log_softmax(logits.gather(1, t_ids.long()).float() / temperature, dim=-1)  # (N, k)
    pt = log_pt.exp()
    kl = (pt * (log_pt - log_ps)).sum(-1) * (temperature * temperature)  # (N,)
    return kl, log_ps.exp(), pt


def _lse_and_ce(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N,V], target [N,1] -> ([N] fp32 log-sum-exp, [N] fp32 CE): compiled, one reduction kernel."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (N,)
    return lse, lse - z.gather(1, target).squeeze(1)


def _scaled_softmax(logits: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """scale [N,1] * softmax(logits) [N,V] from the saved log-sum-exps, in the logits' dtype: compiled, one
    pointwise kernel (fp32 inside)."""
    return (torch.exp(logits.float() - lse.unsqueeze(1)) * scale).to(logits.dtype)


def _block_max(blocks: torch.Tensor) -> torch.Tensor:
    """[N, nb, block] -> [N, nb] maxima: compiled (an eager ``amax`` over the last 128 positions took 0.73 ms
    for [16,384 x 16,384] bf16 logits on the H200, a quarter of the bandwidth)."""
    return blocks.amax(-1)


@functools.cache
def _compiled(fn):
    """`fn` compiled once per process, shape-dynamic: the number of scored positions changes from step to step."""
    return torch.compile(fn, dynamic=True, fullgraph=True)


class _TokenLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, t_values, t_ids, temperature, chunk_bytes, compiled):
        N, V = logits.shape
        ce, kl = (logits.new_zeros(N, dtype=torch.float32) for _ in range(2))  # a loss without inputs: 0
        valid = target = p_s = p_t = lse = None
        if targets is not None:
            valid = targets != IGNORE  # (N,)
            target = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1)
            if compiled:
                lse, ce = _compiled(_lse_and_ce)(logits, target)  # (N,) each
            else:
                for rows in _chunks(N, V, chunk_bytes):  # one kernel reads the chunk, writes its fp32 log-softmax
                    logp = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)  # (n, V)
                    ce[rows] = -logp.gather(1, target[rows]).squeeze(1)
            ce = ce * valid  # (N,)
        if t_values is not None:
            kl, p_s, p_t = _topk_dist(logits, t_values, t_ids, temperature)
        ctx.save_for_backward(logits, valid, target, t_ids, p_s, p_t, lse)
        ctx.temperature, ctx.chunk_bytes = temperature, chunk_bytes
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):  # g_ce, g_kl: (N,) or None
        logits, valid, target, t_ids, p_s, p_t, lse = ctx.saved_tensors
        N, V = logits.shape
        kl_rows = None
        if p_s is not None and g_kl is not None:  # dKL/dz on the k ids: T * (p_S - p_T)
            kl_rows = g_kl.float().unsqueeze(1) * ctx.temperature * (p_s - p_t)  # (N, k)
        if valid is None or g_ce is None:  # the KL alone: a gradient on k ids per row
            grad = torch.zeros_like(logits)  # (N, V), the logits' dtype
            if kl_rows is not None:
                grad.scatter_add_(1, t_ids.long(), kl_rows.to(grad.dtype))
            return grad, None, None, None, None, None, None
        scale = (g_ce.float() * valid).unsqueeze(1)  # (N, 1)
        # dCE/dz = softmax - onehot. The few positions that get more than s * p (the target: -s; the teacher's
        # ids: the KL's rows) are computed apart in fp32, where a confident target's s * p - s does not cancel in
        # the logits' dtype; ids that coincide (the target among the teacher's) add up. The rest is one pass: the
        # fp32 product written straight in the logits' dtype (perf: no second fp32 pass, no separate cast).
        special, add = target, -scale  # (N, m), m = 1 (+ k)
        if kl_rows is not None:
            special, add = torch.cat([special, t_ids.long()], 1), torch.cat([add, kl_rows], 1)
        if lse is not None:  # compiled: the softmax from the forward's log-sum-exps, in one kernel
            grad = _compiled(_scaled_softmax)(logits, lse, scale)  # (N, V), the logits' dtype
            p_special = torch.exp(logits.gather(1, special).float() - lse.unsqueeze(1))  # (N, m)
            grad.scatter_(1, special, _special_grad(p_special, scale, special, add).to(grad.dtype))
            return grad, None, None, None, None, None, None
        grad = torch.empty_like(logits)  # (N, V), the logits' dtype
        for rows in _chunks(N, V, ctx.chunk_bytes):  # the softmax recomputed a chunk at a time (one fused kernel)
            p = torch.softmax(logits[rows], dim=-1, dtype=torch.float32)  # (n, V)
            s = scale[rows]  # (n, 1)
            fixed = _special_grad(p.gather(1, special[rows]), s, special[rows], add[rows])  # (n, m)
            torch.mul(p, s, out=grad[rows])
            grad[rows].scatter_(1, special[rows], fixed.to(grad.dtype))  # a view: in place
        return grad, None, None, None, None, None, None


def _special_grad(p: torch.Tensor, s: torch.Tensor, special: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """The gradient at the `special` ids [n,m] (fp32): s * p there plus their `add` terms, those of ids that
    coincide summed."""
    same = special.unsqueeze(2) == special.unsqueeze(1)  # (n, m, m)
    return p * s + (same * add.unsqueeze(1)).sum(2)


def token_losses(logits: torch.Tensor, targets: torch.Tensor | None = None, t_values: torch.Tensor | None = None,
                 t_ids: torch.Tensor | None = None, temperature: float = 1.0, chunk_bytes: int = CHUNK_BYTES,
                 compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N,V] (any float dtype), targets [N] (IGNORE: scored 0), teacher top-k [N,k] values and ids ->
    (CE [N], KL(p_T || p_S) over the k ids [N]), fp32; zeros for a loss whose inputs are not given. No host sync.
    `compiled`: the passes over the logits as ``torch.compile`` kernels (see the module's docstring)."""
    return _TokenLosses.apply(logits, targets, t_values, t_ids, temperature, chunk_bytes, compiled)


TOP_BLOCK = 128  # `top_logits`: vocabulary positions per block of its first pass


def top_logits(logits: torch.Tensor, k: int, block: int = TOP_BLOCK, blocked: bool | None = None,
               compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits.topk(k, dim=-1)`` of [N, V] logits: ([N, k] values, largest first, [N, k] int64 ids), the same
    values exactly (ids may differ among tied values).

    Why (perf): one radix-select ``topk`` over [16,384 x 16,384] bf16 logits took 1.9 ms on the H200, 3 % of a
    wake step at 16x1024. Here a first pass takes each block of `block` positions' maximum (one read of the
    logits), and ``topk`` runs over the k best blocks' k * `block` candidates only. Exact: fewer than k values
    exceed the k-th largest, so fewer than k blocks have a larger maximum, and the k best blocks hold k values
    at least as large as it. `blocked` (default: on CUDA, where it pays) selects this path; small vocabularies
    (or one not a multiple of `block`) use ``topk`` directly. `compiled`: the block maxima as a compiled kernel."""
    N, V = logits.shape
    k = min(k, V)
    if not (logits.is_cuda if blocked is None else blocked) or V % block or V // block < 4 * k:
        top = logits.topk(k, dim=-1)
        return top.values, top.indices
    blocks = logits.view(N, V // block, block)
    maxima = _compiled(_block_max)(blocks) if compiled else blocks.amax(-1)  # (N, V // block)
    which = maxima.topk(k, dim=-1).indices  # (N, k) the blocks holding the k largest values
    candidates = blocks.gather(1, which.unsqueeze(-1).expand(N, k, block)).flatten(1)  # (N, k * block)
    values, pos = candidates.topk(k, dim=-1)  # (N, k)
    return values, which.gather(1, pos // block) * block + pos % block
