"""The fused per-token CE and top-k KL (token_losses.py) against autograd through F.cross_entropy/topk_kl."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import IGNORE
from biollm_cls.sleep import topk_kl
from biollm_cls.token_losses import token_losses, top_logits

N, V, K = 37, 50, 4


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[[2, 5, 30]] = IGNORE
    t_values = torch.randn(N, K, generator=g) * 2
    t_ids = torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(N)]).int()
    weights = torch.rand(2, N, generator=g)  # upstream per-token weights, as the callers' masked means
    return logits, targets, t_values, t_ids, weights


def _reference(logits, targets, t_values, t_ids, temperature):
    ce = F.cross_entropy(logits.float(), targets, reduction="none")  # IGNORE -> 0
    return ce, topk_kl(logits.float(), t_values, t_ids, temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_bytes", [4 * V * 8, 1 << 27])  # 8 rows per chunk (uneven last), one chunk
def test_losses_and_gradient_equal_autograds(temperature, chunk_bytes):
    logits, targets, t_values, t_ids, w = _inputs(torch.float32)
    ce, kl = token_losses(logits, targets, t_values, t_ids, temperature, chunk_bytes)
    ((ce * w[0]).sum() + (kl * w[1]).sum()).backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_ce, ref_kl = _reference(logits, targets, t_values, t_ids, temperature)
    ((ref_ce * w[0]).sum() + (ref_kl * w[1]).sum()).backward()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(ours, logits.grad)
    assert ce[[2, 5, 30]].eq(0).all() and ours.abs().sum() > 0


@pytest.mark.parametrize("which", ["ce", "kl"])
def test_one_loss_alone(which):
    logits, targets, t_values, t_ids, w = _inputs(torch.float32, seed=1)
    args = (targets, None, None) if which == "ce" else (None, t_values, t_ids)
    ce, kl = token_losses(logits, *args)
    ours_loss, other = (ce, kl) if which == "ce" else (kl, ce)
    assert other.eq(0).all()
    (ours_loss * w[0]).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    ref_ce, ref_kl = _reference(logits, targets, t_values, t_ids, 1.0)
    ref = ref_ce if which == "ce" else ref_kl
    (ref * w[0]).sum().backward()
    torch.testing.assert_close(ours_loss, ref)
    torch.testing.assert_close(ours, logits.grad)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_passes_equal_the_eager_chunks(dtype, device):
    """`compiled=True` (torch.compile kernels, what the learner uses on CUDA with train.compile_model): the same
    losses and gradient as the eager chunks, also for a second number of rows (shape-dynamic, no recompile)."""
    for seed, rows in ((5, N), (6, N - 12)):
        logits, targets, t_values, t_ids, w = (t.to(device) for t in _inputs(torch.float32, seed=seed))
        logits, targets, t_values, t_ids = (t[:rows] for t in (logits.detach().to(dtype), targets, t_values, t_ids))
        w = w[:, :rows]
        out = {}
        for compiled in (False, True):
            x = logits.clone().requires_grad_()
            ce, kl = token_losses(x, targets, t_values, t_ids, 2.0, 4 * V * 8, compiled=compiled)
            ((ce * w[0]).sum() + (kl * w[1]).sum()).backward()
            out[compiled] = (ce, kl, x.grad)
        (ce, kl, grad), (ce_c, kl_c, grad_c) = out[False], out[True]
        torch.testing.assert_close(ce_c, ce)
        torch.testing.assert_close(kl_c, kl)
        assert grad_c.dtype == dtype and grad_c.abs().sum() > 0
        tol = {} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-6}  # bf16: one rounding apart at most
        torch.testing.assert_close(grad_c, grad, **tol)


def test_bf16_logits_get_a_bf16_gradient_close_to_the_fp32_one():
    logits, targets, t_values, t_ids, w = _inputs(torch.bfloat16, seed=2)
    ce, kl = token_losses(logits, targets, t_values, t_ids)
    ((ce * w[0]).sum() + (kl * w[1]).sum()).backward()
    assert logits.grad.dtype == torch.bfloat16
    ref_logits = logits.detach().float().requires_grad_()  # the same values, upcast exactly
    ref_ce, ref_kl = _reference(ref_logits, targets, t_values, t_ids, 1.0)
    ((ref_ce * w[0]).sum() + (ref_kl * w[1]).sum()).backward()
    torch.testing.assert_close(ce, ref_ce)  # the forward is fp32 math on the same values
    torch.testing.assert_close(logits.grad, ref_logits.grad.bfloat16())  # rounded once, as autocast's cast


def test_no_grad_forward_needs_no_autograd():
    logits, targets, *_ = _inputs(torch.float32)
    with torch.no_grad():
        ce, _ = token_losses(logits, targets)
    assert not ce.requires_grad
    torch.testing.assert_close(ce, F.cross_entropy(logits.detach(), targets, reduction="none"))


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (where the blocked path is the default)"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
def test_top_logits_matches_topk_values_exactly(dtype, ties, device, compiled):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 4096, generator=g)
    if ties:  # few distinct values: the k-th largest is tied across blocks
        logits = (logits * 2).round()
    logits = logits.to(device, dtype)
    values, ids = top_logits(logits, 8, blocked=True if device == "cpu" else None, compiled=compiled)
    reference = logits.topk(8, dim=-1)
    assert torch.equal(values, reference.values)  # the same values, largest first
    assert torch.equal(logits.gather(1, ids), values)  # ids point at them
    assert all(len(set(row.tolist())) == 8 for row in ids)  # k distinct positions per row
    if not ties and dtype == torch.float32:  # no ties among random fp32 values (bf16 has them): the same ids
        assert torch.equal(ids, reference.indices)


def test_top_logits_uses_topk_itself_where_the_blocks_do_not_pay():
    logits = torch.randn(5, 300)  # not a multiple of the block
    values, ids = top_logits(logits, 4, blocked=True)
    assert torch.equal(ids, logits.topk(4, dim=-1).indices) and torch.equal(values, logits.topk(4, dim=-1).values)
    small = torch.randn(5, 512)  # 4 blocks: fewer than 4 * k
    assert torch.equal(top_logits(small, 8, blocked=True)[1], small.topk(8, dim=-1).indices)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the out= cast and scatter kernels differ)"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_where_the_target_is_a_teacher_id_and_the_model_is_confident(dtype, device, compiled):
    logits, targets, t_values, t_ids, w = (t.to(device) for t in _inputs(torch.float32, seed=4))
    targets = t_ids[:, 1].long().clone()  # every target among the teacher's ids (the two corrections coincide)
    targets[[2, 5, 30]] = IGNORE
    with torch.no_grad():
        logits[torch.arange(N, device=device), t_ids[:, 1].long()] += 8.0  # p(target) ~ 1: s * (p - 1) is small, and in bf16
        # s * p rounded first would leave it an error as large as itself
    logits = logits.detach().to(dtype).requires_grad_()
    ce, kl = token_losses(logits, targets, t_values, t_ids, 1.0, 4 * V * 8, compiled=compiled)  # 8 rows per chunk
    ((ce * w[0]).sum() + (kl * w[1]).sum()).backward()
    ref_logits = logits.detach().float().requires_grad_()
    ref_ce, ref_kl = _reference(ref_logits, targets, t_values, t_ids, 1.0)
    ((ref_ce * w[0]).sum() + (ref_kl * w[1]).sum()).backward()
    expected = ref_logits.grad.to(dtype)  # the fp32 gradient rounded once
    # fp32: the compiled log-sum-exp sums in another order (~1e-5 relative); bf16: one rounding
    rtol = (5e-5 if compiled else 1e-5) if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(logits.grad, expected, rtol=rtol, atol=1e-12)
