"""Online EWC: the penalty and its gradient by hand, the Fisher estimator, accumulation, batching independence."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from biollm_cls.benchmarks.base import IGNORE, Batch
from biollm_cls.ewc import OnlineEWC

nullcast = contextlib.nullcontext


class TwoParams(nn.Module):
    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([a]))
        self.b = nn.Parameter(torch.tensor([b]))


def set_state(ewc: OnlineEWC, fisher: list[float], anchor: list[float]) -> None:
    ewc.fisher = {"a": torch.tensor([fisher[0]]), "b": torch.tensor([fisher[1]])}
    ewc.anchor = {"a": torch.tensor([anchor[0]]), "b": torch.tensor([anchor[1]])}


def test_penalty_by_hand():
    model = TwoParams(1.5, -1.0)
    ewc = OnlineEWC(lambda_=2.0, decay=0.9)
    assert not ewc.active and ewc.penalty(model).item() == 0.0
    set_state(ewc, fisher=[3.0, 0.5], anchor=[1.0, 1.0])
    assert ewc.active
    # (2/2) * (3 * 0.5^2 + 0.5 * (-2)^2) = 0.75 + 2.0
    assert ewc.penalty(model).item() == pytest.approx(2.75)


def test_add_penalty_grad_adds_exactly_lambda_f_delta():
    model = TwoParams(1.5, -1.0)
    ewc = OnlineEWC(lambda_=2.0, decay=0.9)
    set_state(ewc, fisher=[3.0, 0.5], anchor=[1.0, 1.0])
    model.a.grad = torch.tensor([0.1])
    model.b.grad = None  # a missing grad starts from zero
    ewc.add_penalty_grad(model)
    assert model.a.grad.item() == pytest.approx(0.1 + 2.0 * 3.0 * 0.5)
    assert model.b.grad.item() == pytest.approx(2.0 * 0.5 * -2.0)
    # it is the gradient of the penalty
    check = TwoParams(1.5, -1.0)
    p = 0.5 * 2.0 * (3.0 * (check.a - 1.0) ** 2 + 0.5 * (check.b - 1.0) ** 2)
    p.sum().backward()
    assert model.a.grad.item() - 0.1 == pytest.approx(check.a.grad.item())
    assert model.b.grad.item() == pytest.approx(check.b.grad.item())


class LogitModel(nn.Module):
    """Logits = theta (V=2) at every position, whatever the input; `other` never enters the loss."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2))
        self.other = nn.Parameter(torch.ones(3))

    def hidden(self, ids, mask):
        return torch.zeros(*ids.shape, 1)

    def logits(self, h):
        return self.theta.expand(h.shape[0], 2) + 0.0 * h


def one_supervised_batch(n: int, T: int = 3) -> Batch:
    tgt = torch.full((n, T), IGNORE)
    tgt[:, 1] = 0
    return Batch(torch.zeros(n, T, dtype=torch.long), tgt, torch.ones(n, T, dtype=torch.bool), torch.zeros(n))


def consolidate(ewc, model, batches, seed=0):
    return ewc.consolidate(model, batches, model.hidden, model.logits, nullcast, torch.Generator().manual_seed(seed))


def test_fisher_by_hand_and_accumulation_across_two_consolidations():
    """At theta = 0, p = (1/2, 1/2): for either sampled y the squared gradient of -log p(y) is (1/4, 1/4)."""
    model = LogitModel()
    ewc = OnlineEWC(lambda_=1.0, decay=0.9)
    batch = one_supervised_batch(4)
    batch.targets[3] = IGNORE  # a row without supervision is skipped
    assert consolidate(ewc, model, [batch]) == 3
    assert torch.allclose(ewc.fisher["theta"], torch.tensor([0.25, 0.25]))
    assert torch.equal(ewc.fisher["other"], torch.zeros(3))
    assert torch.equal(ewc.anchor["other"], torch.ones(3)) and ewc.updates == 1
    with torch.no_grad():
        model.other.fill_(5.0)  # move a weight: the anchor must follow
    assert consolidate(ewc, model, [one_supervised_batch(2)], seed=1) == 2
    assert torch.allclose(ewc.fisher["theta"], torch.tensor([0.9 * 0.25 + 0.25] * 2))
    assert torch.equal(ewc.anchor["other"], torch.full((3,), 5.0)) and ewc.updates == 2
    assert model.theta.grad is None  # grads are cleared afterwards


def test_fisher_accumulates_as_decay_f1_plus_f2(tiny_cfg, make_learner):
    learner = make_learner(tiny_cfg)
    net = learner.neocortex
    batch = _lm_batch(6)
    ewc = OnlineEWC(lambda_=1.0, decay=0.7)

    def run(e, seed):
        return e.consolidate(net, [batch], learner.base_hidden, learner.logits, nullcast,
                             torch.Generator().manual_seed(seed))

    run(ewc, 0)
    f1 = {n: f.clone() for n, f in ewc.fisher.items()}
    assert sum(float(f.sum()) for f in f1.values()) > 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run(ewc, 1)
    fresh = OnlineEWC(lambda_=1.0, decay=0.7)
    run(fresh, 1)  # F2 alone: same weights, same samples
    for n in f1:
        assert torch.allclose(ewc.fisher[n], 0.7 * f1[n] + fresh.fisher[n], rtol=1e-5, atol=1e-10), n
        assert torch.equal(ewc.anchor[n], dict(net.named_parameters())[n].detach())
    assert ewc.updates == 2


def _lm_batch(n: int) -> Batch:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 16, (n, 8), generator=g)
    tgt = torch.randint(0, 16, (n, 8), generator=g)
    tgt[:, :2] = IGNORE
    mask = torch.ones(n, 8, dtype=torch.bool)
    mask[0, 6:] = False
    tgt[0, 6:] = IGNORE
    return Batch(ids, tgt, mask, torch.zeros(n, dtype=torch.long))


def _rows(batch: Batch, sl: slice) -> Batch:
    return Batch(batch.input_ids[sl], batch.targets[sl], batch.attention_mask[sl], batch.task_ids[sl])


def test_estimate_does_not_depend_on_batching(tiny_cfg, make_learner):
    learner = make_learner(tiny_cfg)
    batch = _lm_batch(4)
    fishers = []
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)], [slice(i, i + 1) for i in range(4)]):
        ewc = OnlineEWC(lambda_=1.0, decay=0.9)
        n = ewc.consolidate(learner.neocortex, [_rows(batch, s) for s in split], learner.base_hidden,
                            learner.logits, nullcast, torch.Generator().manual_seed(0))
        assert n == 4
        fishers.append(ewc.fisher)
    for other in fishers[1:]:
        for name in fishers[0]:
            assert torch.allclose(fishers[0][name], other[name], rtol=1e-5, atol=1e-12), name


def test_lambda_zero_estimates_nothing():
    model = LogitModel()
    ewc = OnlineEWC(lambda_=0.0, decay=0.9)
    assert consolidate(ewc, model, [one_supervised_batch(3)]) == 0
    assert ewc.fisher == {} and ewc.anchor == {} and not ewc.active and ewc.updates == 0
    model.theta.grad = torch.tensor([1.0, 2.0])
    ewc.add_penalty_grad(model)
    assert model.theta.grad.tolist() == [1.0, 2.0]
    assert ewc.penalty(model).item() == 0.0
    set_state_model = OnlineEWC(lambda_=0.0, decay=0.9)
    set_state_model.fisher = {"theta": torch.ones(2)}
    assert not set_state_model.active  # a Fisher without a positive lambda is never applied


def test_state_dict_round_trip():
    model = LogitModel()
    ewc = OnlineEWC(lambda_=1.0, decay=0.9)
    consolidate(ewc, model, [one_supervised_batch(2)])
    other = OnlineEWC(lambda_=1.0, decay=0.9)
    other.load_state_dict(ewc.state_dict())
    assert other.updates == 1 and other.active
    assert torch.equal(other.fisher["theta"], ewc.fisher["theta"])
    with torch.no_grad():
        model.theta.add_(1.0)
    assert other.penalty(model).item() == pytest.approx(ewc.penalty(model).item()) == pytest.approx(0.25)


class _BigEmbeddingLM(torch.nn.Module):
    """An embedding of 2^20 weights (row-sparse storage applies) and a small head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(4096, 256)
        self.head = torch.nn.Linear(256, 7)

    def hidden(self, ids, mask):
        return self.emb(ids)

    def logits(self, h):
        return self.head(h)


def test_row_sparse_storage_is_exact_for_rows_that_were_never_used():
    from contextlib import nullcontext

    from biollm_cls.benchmarks.base import Batch

    torch.manual_seed(0)
    ids = torch.randint(0, 12, (3, 5))  # only 12 of 4096 embedding rows get a gradient
    batch = Batch(ids, torch.zeros(3, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.bool), torch.zeros(3))
    states = []
    for sparse_min in (OnlineEWC._SPARSE_MIN, 1 << 40):  # row-sparse, and forced dense
        torch.manual_seed(0)
        model = _BigEmbeddingLM()
        ewc = OnlineEWC(lambda_=3.0, decay=0.5)
        ewc._SPARSE_MIN = sparse_min
        for _ in range(2):  # two consolidations: the decay merge goes through the sparse path too
            ewc.consolidate(model, [batch], model.hidden, model.logits, nullcontext,
                            torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.emb.weight.add_(0.01)
            model.head.weight.add_(0.01)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        ewc.add_penalty_grad(model)
        states.append((ewc, model))
    (sparse, m_sparse), (dense, m_dense) = states
    assert "emb.weight" in sparse.rows and sparse.fisher["emb.weight"].shape[0] <= 12
    assert "emb.weight" not in dense.rows
    assert torch.allclose(sparse.penalty(m_sparse), dense.penalty(m_dense), rtol=1e-6)
    assert torch.equal(m_sparse.emb.weight.grad, m_dense.emb.weight.grad)
    assert torch.equal(m_sparse.head.weight.grad, m_dense.head.weight.grad)


# ---- the penalty under fp16 loss scaling (issue 11.1) ---------------------------------------------------
PENALTY = 10.0  # lambda * F * (theta - theta*) per element: lambda 10, F 1, theta - theta* = 1
SCALE = 1024.0


def _penalised_update(tiny_cfg, make_learner, path: str, scaled: bool, ewc_on: bool) -> dict[str, torch.Tensor]:
    """One base update through the real sleep/wake code on a fixed batch; the base's gradients as stepped.

    `scaled`: a GradScaler (CPU) multiplies the loss by SCALE before the backward, as fp16 autocast on CUDA does.
    The gradients that reach the optimizer are the ones left in ``.grad`` (unscale_ works in place)."""
    from biollm_cls.learner import Precision
    from biollm_cls.sleep import sleep_step
    from biollm_cls.wake import wake_step

    cfg = tiny_cfg
    cfg.train.grad_clip = 0.0  # clipping is not additive: keep the sum of the two gradients visible
    cfg.consolidation.target_ce_weight = 1.0
    cfg.consolidation.wake_base_lr_scale = 1.0  # wake trains the base too (one backward, two optimizers)
    learner = make_learner(cfg)
    if scaled:
        learner.precision = Precision(torch.device("cpu"), False, torch.float16,
                                      torch.amp.GradScaler("cpu", init_scale=SCALE))
    ewc = OnlineEWC(lambda_=PENALTY if ewc_on else 0.0, decay=1.0)
    if ewc_on:
        for name, p in learner.neocortex.named_parameters():
            ewc.fisher[name] = torch.ones_like(p)
            ewc.anchor[name] = p.detach().clone() - 1.0
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, cfg.model.seq_len, cfg.model.vocab_size
    batch = Batch(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g),
                  torch.ones(B, T, dtype=torch.bool), torch.zeros(B, dtype=torch.long))
    if path == "sleep":
        _, _, applied = sleep_step(learner, batch, None, None, B, cfg, ewc)
        assert applied
    else:
        assert wake_step(learner, batch, cfg, ewc, B, keep_teacher=False).applied
    if scaled:
        assert learner.precision.scaler.get_scale() == SCALE  # the step was not skipped as overflowing
    return {n: p.grad.detach().clone() for n, p in learner.neocortex.named_parameters()}


@pytest.mark.parametrize("path", ["sleep", "wake"])
def test_penalty_gradient_is_not_divided_by_the_fp16_loss_scale(tiny_cfg, make_learner, path):
    """Issue 11.1: the penalty gradient was added to gradients still multiplied by the GradScaler's scale and
    unscaled with them, so at scale 1024 an expected 10.0 arrived as 0.0098 (fp16 EWC silently off)."""
    import copy

    grads = {(scaled, ewc_on): _penalised_update(copy.deepcopy(tiny_cfg), make_learner, path, scaled, ewc_on)
             for scaled in (False, True) for ewc_on in (False, True)}
    for name, plain in grads[(False, False)].items():
        assert plain.abs().sum() > 0, f"{name}: the loss has no gradient here, the check would be vacuous"
        # the loss's own gradient is the same with and without loss scaling
        assert torch.allclose(grads[(True, False)][name], plain, rtol=1e-4, atol=1e-6), name
        for scaled in (False, True):
            penalty = grads[(scaled, True)][name] - grads[(scaled, False)][name]
            got = penalty.flatten()[(penalty - PENALTY).abs().argmax()].item()
            assert abs(got - PENALTY) < 1e-3, f"{name} (scaled={scaled}): penalty gradient {got:.6g}, expected {PENALTY}"


# ---- bf16 anchors (ewc.anchor_dtype=bf16) ---------------------------------------------------------------
class _TiedLM(torch.nn.Module):
    """An embedding tied to its head, a linear layer with a bias and a norm: one parameter of each kind."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 11, bias=False)
        self.head.weight = self.emb.weight

    def hidden(self, ids, mask):
        return self.norm(self.proj(self.emb(ids)))  # (B, T, 16)

    def logits(self, h):
        return self.head(h)


def _tied_batch() -> Batch:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    return Batch(ids, torch.randint(0, 11, (3, 6), generator=g), torch.ones(3, 6, dtype=torch.bool), torch.zeros(3))


def test_bf16_anchor_rounds_only_the_linear_layers_and_changes_no_bf16_autocast_output():
    torch.manual_seed(0)
    model = _TiedLM()
    ids = _tied_batch().input_ids
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_before = model.proj(model.emb(ids))  # (B, T, 16), the bf16 matmul of the linear layer
    ewc = OnlineEWC(lambda_=2.0, decay=0.9, anchor_dtype=torch.bfloat16)
    consolidate(ewc, model, [_tied_batch()])
    dtypes = {n: a.dtype for n, a in ewc.anchor.items()}
    assert dtypes == {"emb.weight": torch.float32, "proj.weight": torch.bfloat16, "proj.bias": torch.bfloat16,
                      "norm.weight": torch.float32, "norm.bias": torch.float32}
    for name, p in model.named_parameters():
        if dtypes[name] == torch.bfloat16:  # rounded to bf16 (and moved: random fp32 weights are not bf16)
            assert torch.equal(p, p.bfloat16().float()) and not torch.equal(p, before[name])
        else:
            assert torch.equal(p, before[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.proj(model.emb(ids)), out_before)
    assert ewc.penalty(model).item() == 0.0  # the anchor is exactly the (rounded) weights


def test_bf16_anchor_penalty_gradient_is_lambda_f_delta_in_fp32():
    torch.manual_seed(0)
    model = _TiedLM()
    ewc = OnlineEWC(lambda_=2.0, decay=0.9, fisher_dtype=torch.bfloat16, anchor_dtype=torch.bfloat16)
    consolidate(ewc, model, [_tied_batch()])
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-4 * torch.randn_like(p))  # a step smaller than the bf16 spacing of most weights
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ewc.add_penalty_grad(model)
    for name, p in model.named_parameters():
        expected = 2.0 * ewc.fisher[name].float() * (p.detach() - anchor[name])
        assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-12), name
    assert ewc.penalty(model).item() > 0


def test_ewc_from_config_reads_both_storage_dtypes(tiny_cfg):
    tiny_cfg.ewc.fisher_dtype, tiny_cfg.ewc.anchor_dtype = "bf16", "bf16"
    ewc = OnlineEWC.from_config(tiny_cfg.ewc)
    assert (ewc.lambda_, ewc.decay) == (tiny_cfg.ewc.lambda_, tiny_cfg.ewc.fisher_decay)
    assert ewc.fisher_dtype == ewc.anchor_dtype == torch.bfloat16


def test_fp32_view_of_a_mixed_list_copies_each_source_dtype_in_one_uniform_multi_tensor_copy(monkeypatch):
    # CUDA's fused multi-tensor copy takes a source list of one dtype only; a mixed list (fp32 norm anchors
    # beside bf16 linear anchors) would fall back to one copy kernel per tensor.
    from biollm_cls import ewc as ewc_module

    calls = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (calls.append([t.dtype for t in src]),
                                                                   real_copy(dst, src)))
    like = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(4), torch.zeros(1)]
    tensors = [torch.randn(3).bfloat16(), torch.randn(2, 2), torch.randn(4).half(), torch.randn(1).bfloat16()]
    out = ewc_module._as_fp32(tensors, like)
    assert sorted(calls, key=str) == [[torch.bfloat16, torch.bfloat16], [torch.float16]]
    assert out[1] is tensors[1]  # an fp32 tensor is used as it is, not copied
    for got, src in zip(out, tensors, strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, src.float())


def _fp8_ewc_with_fisher(fisher: dict[str, torch.Tensor], model: nn.Module, rows: dict | None = None) -> OnlineEWC:
    """An fp8-storage EWC holding `fisher` (fp32, stored through the real `_store`) anchored at `model`."""
    ewc = OnlineEWC(lambda_=2.0, decay=0.9, fisher_dtype=torch.float8_e4m3fn)
    for name, p in model.named_parameters():
        ewc._store(name, p, fisher[name], torch.float32)
    return ewc


class _Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 5))
        self.v = nn.Parameter(torch.randn(5))


def test_fp8_fisher_rounds_each_row_to_its_scale_within_e4m3_error():
    torch.manual_seed(0)
    model = _Wide()
    # a Fisher spanning 12 orders of magnitude within each row, and one all-zero row
    fisher = {"w": torch.rand(6, 5) * torch.logspace(-12, 0, 5), "v": torch.rand(5)}
    fisher["w"][2] = 0.0
    ewc = _fp8_ewc_with_fisher(fisher, model)
    assert ewc.fisher["w"].dtype == torch.float8_e4m3fn and ewc.scale["w"].shape == (6, 1)
    assert ewc.fisher["v"].dtype == torch.bfloat16 and "v" not in ewc.scale  # vectors stay bf16
    got, want = ewc._stored_fisher("w"), fisher["w"]
    # e4m3: 3 mantissa bits (half-spacing 1/16 relative) down to 2^-6 of 448; below it a subnormal step of 2^-9
    tolerance = torch.maximum(want / 16, ewc.scale["w"] * 2.0**-10)
    assert torch.all((got - want).abs() <= tolerance)
    assert torch.allclose(got.amax(1), want.amax(1), rtol=1e-6, atol=0)  # a row's largest value is kept (to fp32)
    assert torch.all(got[2] == 0) and ewc.scale["w"][2].item() == 1.0
    kept = torch.arange(6) != 2
    assert got[:, 0].eq(0).all() and got[kept, -1].gt(0).all()  # 1e-12 of a row's largest: dropped; the largest: kept


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (the multi-tensor kernels differ)"))])
@pytest.mark.parametrize("chunk", [None, 7])
def test_fp8_penalty_gradient_is_lambda_times_the_stored_fisher_times_delta(monkeypatch, chunk, device):
    torch.manual_seed(1)
    model = _Wide()
    if chunk is not None:  # matrices larger than the chunk are split into whole rows (their scales go along)
        monkeypatch.setattr(OnlineEWC, "_CHUNK", chunk)
    fisher = {"w": torch.rand(6, 5) * torch.logspace(-3, 0, 5), "v": torch.rand(5)}
    model.to(device)
    ewc = _fp8_ewc_with_fisher({n: f.to(device) for n, f in fisher.items()}, model)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ewc.add_penalty_grad(model)
    for name, p in model.named_parameters():
        expected = 1.0 + 2.0 * ewc._stored_fisher(name) * (p.detach() - anchor[name])
        assert torch.allclose(p.grad, expected, rtol=1e-6, atol=1e-9), name
    by_hand = sum((ewc._stored_fisher(n) * (p.detach() - anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    assert ewc.penalty(model).item() == pytest.approx(by_hand.item())


def test_fp8_fisher_row_sparse_fold_and_state_dict_round_trip():
    model = _BigEmbeddingLM()
    ewc = OnlineEWC(lambda_=1.0, decay=0.5, fisher_dtype=torch.float8_e4m3fn)
    ids = torch.tensor([[3, 9, 3, 17]])
    batch = Batch(ids, torch.tensor([[1, 2, 3, 4]]), torch.ones(1, 4, dtype=torch.bool), torch.zeros(1))
    consolidate(ewc, model, [batch])
    assert ewc.rows["emb.weight"].tolist() == [3, 9, 17] and ewc.scale["emb.weight"].shape == (3, 1)
    first = ewc._dense_fisher("emb.weight", model.emb.weight)
    consolidate(ewc, model, [batch], seed=1)  # F <- 0.5 F + F_new, read back from the fp8 codes
    assert ewc.fisher["emb.weight"].dtype == torch.float8_e4m3fn
    assert torch.all(ewc._dense_fisher("emb.weight", model.emb.weight) >= 0.5 * first * (1 - 1 / 16) ** 2 - 1e-30)
    other = OnlineEWC(lambda_=1.0, decay=0.5, fisher_dtype=torch.float8_e4m3fn)
    other.load_state_dict(ewc.state_dict())
    with torch.no_grad():
        model.emb.weight.add_(0.01)
    assert other.penalty(model).item() == pytest.approx(ewc.penalty(model).item()) and ewc.penalty(model).item() > 0


def test_ewc_from_config_reads_fp8(tiny_cfg):
    tiny_cfg.ewc.fisher_dtype = "fp8"
    assert OnlineEWC.from_config(tiny_cfg.ewc).fisher_dtype == torch.float8_e4m3fn
