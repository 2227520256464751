"""One wake step: the hippocampus learns the current batch through the frozen upper neocortex.

The predictor that wake trains *is* the system, ``Up(Low(x) + delta(Low(x)))``: the loss is the system's
next-token cross-entropy on supervised positions, and its gradient reaches the experts through the
(frozen) upper layers, adapter-style. What sleep later distils (the system's output) is therefore exactly
what wake learned — unlike the reference, whose separate linear read-out never reached its sleep teacher.

Reward modulation (``train.reward_from_correctness``): ``mult = clip(1 + reward_alpha * (2 acc - 1), 0.25, 2)``
scales the hippocampus's *learning rate* for this step. Scaling the loss instead would be cancelled by
Adam's normalisation by the second moment; scaling the step size changes the update by exactly ``mult``.

With ``consolidation.wake_base_lr_scale > 0`` the same backward also updates the base (lr =
``slow_lr * wake_base_lr_scale``, plus the online-EWC penalty gradient): one graph, one backward.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import Batch
from biollm_cls.config.schema import RunConfig
from biollm_cls.ewc import OnlineEWC
from biollm_cls.hippocampus import Routing
from biollm_cls.learner import Learner, per_row_weighted_mean, scored_positions, to_host
from biollm_cls.step_graphs import padded_inputs
from biollm_cls.token_losses import token_losses, top_logits


@dataclass
class WakeOutcome:
    loss: float  # system CE on this batch (nats per supervised token)
    accuracy: float
    reward_mult: float
    routing_reg: float
    supervised_tokens: int
    batch_tokens: int  # B x T of the wake batch
    applied: bool  # False when the loss was non-finite and the update was skipped
    row_loss: torch.Tensor  # [B] CE per sequence (CPU)
    expert_ids: torch.Tensor | None  # [B,k] per-sequence experts (CPU) for replay
    expert_weights: torch.Tensor | None
    expert_share: torch.Tensor | None  # [E] routing mass of this batch (novelty)
    teacher_values: torch.Tensor | None  # [N,k] fp16 top-k system logits (CPU), stream rows only
    teacher_ids: torch.Tensor | None  # [N,k] int32


def wake_step(learner: Learner, batch: Batch, cfg: RunConfig, ewc: OnlineEWC, stream_rows: int,
              keep_teacher: bool, replay_teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> WakeOutcome:
    """One update on `batch` (its first `stream_rows` rows are new data; the rest are replay mixed in).

    `replay_teacher` ([N_replay,k] values, ids: the replayed rows' stored top-k logits, row-major) adds the
    DER++ term ``replay.wake_distill_weight * KL(stored || system)`` on the replayed rows, beside their CE.
    With ``train.cuda_graphs`` (CUDA) a step that trains only the hippocampus is a captured graph
    (`_captured_wake_step`); otherwise it runs eagerly here."""
    hip = learner.hippocampus
    base_lr = cfg.consolidation.slow_lr * cfg.consolidation.wake_base_lr_scale
    base_trains = base_lr > 0
    if learner.graphs is not None and hip is not None and not base_trains and learner.precision.scaler is None:
        return _captured_wake_step(learner, batch, cfg, stream_rows, keep_teacher, replay_teacher)
    learner.neocortex.train(base_trains)  # a frozen base runs deterministically (no dropout)
    sup = batch.supervised  # (B, T)
    # Perf: a base that does not learn in this step is not tracked by autograd (see Learner.frozen_base).
    frozen = learner.frozen_base() if hip is not None and not base_trains else contextlib.nullcontext()
    # Perf: a frozen base in eval mode gives the same injection-point state after the update, so the post-update
    # teacher re-runs only the hippocampus and the upper layers from it (see _post_update_teacher).
    resume = keep_teacher and hip is not None and not base_trains and learner.can_resume
    size = int(sup.sum())  # the supervised positions: a host sync for their count
    with frozen:
        w = _wake_losses(learner, batch, cfg, stream_rows, size, replay_teacher, keep_split=resume)

    # The step's one host sync for its scalars (the reward needs the accuracy before the update).
    acc_value, loss_value, ce_value, reg_value, n_sup, n_stream = torch.stack(
        [w.accuracy, w.loss.detach(), w.ce.detach(), w.reg.detach(), w.real.sum(), batch.supervised[:stream_rows].sum()]
    ).tolist()
    finite = math.isfinite(loss_value)
    mult = 1.0
    if cfg.train.reward_from_correctness:
        mult = min(2.0, max(0.25, 1.0 + cfg.experts.reward_alpha * (2.0 * acc_value - 1.0)))
    if finite:
        _update(learner, w.loss, cfg, ewc, base_lr, mult)

    if keep_teacher:  # the teacher is the system *after* this update: what sleep should consolidate
        split = learner.last_split[:stream_rows] if resume else None
        teacher = _post_update_teacher(learner, batch, stream_rows, cfg.replay.teacher_topk, split)
    else:
        teacher = (None, None, _stream_row_loss(w, batch, stream_rows))
    learner.last_split = None
    record = _routing_record(w.routing, batch, stream_rows)
    return _outcome(batch, [acc_value, ce_value, reg_value, mult, n_sup, n_stream, finite], *teacher, *record)


@dataclass
class _WakeLosses:
    flat: torch.Tensor  # (size,) their flat index into the [B,T] batch
    real: torch.Tensor  # (size,) False on padding positions
    token_loss: torch.Tensor  # (size,) CE (0 on padding)
    ce: torch.Tensor
    reg: torch.Tensor
    loss: torch.Tensor  # what the update descends
    accuracy: torch.Tensor
    routing: Routing | None


def _wake_losses(learner: Learner, batch: Batch, cfg: RunConfig, stream_rows: int, size: int,
                 replay_teacher: tuple[torch.Tensor, torch.Tensor] | None, keep_split: bool) -> _WakeLosses:
    """The system's wake objective on `size` scored positions (`scored_positions`), with autograd; no host sync.
    The replay teacher's rows line up with the replayed rows' supervised positions, which follow the stream's."""
    hip = learner.hippocampus
    T = batch.input_ids.shape[1]
    flat, real = scored_positions(batch.supervised, size)  # (size,) each
    with learner.precision.autocast():
        hidden = learner.system_hidden(batch.input_ids, batch.attention_mask, track_stats=hip is not None,
                                       keep_split=keep_split)  # (B, T, H)
        logits = learner.logits(hidden.flatten(0, 1)[flat])  # (size, V), the autocast dtype
    targets = batch.targets.flatten()[flat]  # (size,)
    distill = replay_teacher is not None and cfg.replay.wake_distill_weight > 0 and len(replay_teacher[0])
    teacher = (None, None)
    if distill:  # the replay teacher's rows line up with the replayed positions (padded rows never read)
        values, ids = replay_teacher  # (N_replay, k)
        n_stream = batch.supervised[:stream_rows].sum()
        row = (torch.arange(size, device=flat.device) - n_stream).clamp(min=0, max=values.shape[0] - 1)  # (size,)
        teacher = (values[row], ids[row])
    # CE and the replay KL in one fused pass over the logits (token_losses.py: no fp32 [size, V] copies)
    token_ce, kl = token_losses(logits, targets, *teacher, compiled=learner.compiled_losses)  # (size,) each
    token_loss = token_ce * real  # (size,)
    n_real = real.sum().clamp(min=1)
    ce = token_loss.sum() / n_real
    routing = learner.last_routing[0] if hip is not None else None
    reg = hip.routing_regulariser(routing, batch.attention_mask) if routing is not None else \
        torch.zeros((), device=logits.device)
    loss = ce + cfg.experts.routing_reg_weight * reg
    if distill:
        replayed = real & (flat // T >= stream_rows)
        loss = loss + cfg.replay.wake_distill_weight * (kl * replayed).sum() / replayed.sum().clamp(min=1)
    accuracy = ((logits.detach().argmax(-1) == targets) & real).sum() / n_real
    return _WakeLosses(flat, real, token_loss, ce, reg, loss, accuracy, routing)


def _stream_row_loss(w: _WakeLosses, batch: Batch, stream_rows: int) -> torch.Tensor:
    """[stream_rows] CE per new sequence from the training pass (the pre-update system)."""
    rows = w.flat // batch.input_ids.shape[1]
    return per_row_weighted_mean(w.token_loss.detach(), rows, w.real, len(batch))[:stream_rows]


def _captured_wake_step(learner: Learner, batch: Batch, cfg: RunConfig, stream_rows: int, keep_teacher: bool,
                        replay_teacher: tuple[torch.Tensor, torch.Tensor] | None) -> WakeOutcome:
    """`wake_step` (hippocampus only) as a CUDA graph (step_graphs.py): B*T scored positions (T right-padded to
    a multiple of 64), the reward's learning rate and the finite check on the device (the fused AdamW reads a
    tensor lr and skips the update when ``found_inf`` is set), and one host sync after the replay."""
    hip, opt = learner.hippocampus, learner.fast_optimizer
    inputs, size = padded_inputs(batch, cfg.model.seq_len)
    distill = replay_teacher is not None and cfg.replay.wake_distill_weight > 0
    if distill:  # padded to `size` rows: one shape whatever the replayed rows' lengths
        inputs["t_values"], inputs["t_ids"] = (F.pad(t, (0, 0, 0, size - t.shape[0])) for t in replay_teacher)
    resume = keep_teacher and learner.can_resume
    lr = learner.graphs.scalar("fast_lr")
    e = cfg.experts

    def step(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        padded = Batch(x["input_ids"], x["targets"], x["attention_mask"], batch.task_ids)
        learner.neocortex.train(False)
        teacher = (x["t_values"], x["t_ids"]) if distill else None
        with learner.frozen_base():
            w = _wake_losses(learner, padded, cfg, stream_rows, size, teacher, keep_split=resume)
        finite = torch.isfinite(w.loss)
        mult = torch.ones((), device=lr.device)
        if cfg.train.reward_from_correctness:
            mult = (1.0 + e.reward_alpha * (2.0 * w.accuracy - 1.0)).clamp(0.25, 2.0)
        opt.zero_grad(set_to_none=True)
        w.loss.backward()
        lr.copy_(mult * e.fast_lr)
        learner.step_optimizer(opt, list(hip.parameters()), lr, cfg.train.grad_clip, skip=~finite)
        hip.update_drift()
        if keep_teacher:
            split = learner.last_split[:stream_rows] if resume else None
            values, ids, row_loss = _post_update_teacher(learner, padded, stream_rows, cfg.replay.teacher_topk,
                                                         split)
        else:
            values = ids = torch.zeros(0, device=lr.device)
            row_loss = _stream_row_loss(w, padded, stream_rows)
        learner.last_split = None
        scalars = torch.stack([w.accuracy, w.ce.detach(), w.reg.detach(), mult, w.real.sum(),
                               padded.supervised[:stream_rows].sum(), finite]).float()
        return (scalars, row_loss, values, ids, *_routing_record(w.routing, padded, stream_rows))

    out = learner.graphs.run(("wake", stream_rows, keep_teacher, distill), step, inputs,
                             after_capture=lambda: opt.zero_grad(set_to_none=True))
    scalars, row_loss, values, ids, expert_ids, expert_weights, share = out
    teacher = (values, ids) if keep_teacher else (None, None)
    return _outcome(batch, scalars, *teacher, row_loss, expert_ids, expert_weights, share)


def _outcome(batch: Batch, scalars: torch.Tensor | list[float], teacher_values: torch.Tensor | None,
             teacher_ids: torch.Tensor | None, row_loss: torch.Tensor, expert_ids, expert_weights, share
             ) -> WakeOutcome:
    """The step's record on the host. `scalars`: accuracy, CE, routing regulariser, reward multiplier,
    supervised positions, those of the new rows, applied. Everything the episodes keep leaves the device in one
    batch of asynchronous copies and one wait; the teacher's rows are cut to the new rows' supervised positions."""
    scalars, row_loss, teacher_values, teacher_ids, expert_ids, expert_weights, share = to_host(
        torch.as_tensor(scalars), row_loss, teacher_values, teacher_ids, expert_ids, expert_weights, share)
    acc, ce, reg, mult, n_sup, n_stream, applied = scalars.tolist()
    if teacher_values is not None:
        teacher_values, teacher_ids = teacher_values[: int(n_stream)], teacher_ids[: int(n_stream)]
    return WakeOutcome(
        loss=ce, accuracy=acc, reward_mult=mult, routing_reg=reg, supervised_tokens=int(n_sup),
        batch_tokens=batch.input_ids.numel(), applied=bool(applied), row_loss=row_loss, expert_ids=expert_ids,
        expert_weights=expert_weights, expert_share=share, teacher_values=teacher_values, teacher_ids=teacher_ids,
    )


@torch.no_grad()
def _post_update_teacher(learner: Learner, batch: Batch, stream_rows: int, k: int,
                         split: torch.Tensor | None = None):
    """One forward-only pass of the updated system on the new rows, eval mode: ([S,k] fp16 top-k logits,
    [S,k] int32 ids, [B_stream] CE per row), S = B_stream*T rows: the supervised positions in row-major order,
    then padding (cut on the host). Storing the pre-update logits instead would make sleep distil the system as
    it was before it learned the batch (top-1 0.23 vs 0.44 on a task's first steps).
    `split` [B_stream,T,H]: the training pass's injection-point state (frozen base): the pass then starts there."""
    new = batch.input_ids[:stream_rows], batch.attention_mask[:stream_rows]
    sup, targets = batch.supervised[:stream_rows], batch.targets[:stream_rows]
    flat, real = scored_positions(sup, sup.numel())  # (S,) each
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        hidden = learner.system_hidden(*new) if split is None else learner.system_hidden_from_split(split, new[1])
        logits = learner.logits(hidden.flatten(0, 1)[flat])  # (S, V), the autocast dtype
    learner.neocortex.train(was)
    token_loss, _ = token_losses(logits, targets.flatten()[flat], compiled=learner.compiled_losses)  # (S,)
    row_loss = per_row_weighted_mean(token_loss, flat // sup.shape[1], real, stream_rows)
    values, ids = top_logits(logits, k, compiled=learner.compiled_losses)  # (S, k) row-major over supervised positions; exact in bf16
    return values.half(), ids.int(), row_loss  # on the device; the caller moves them in one batch


def _update(learner: Learner, loss: torch.Tensor, cfg: RunConfig, ewc: OnlineEWC, base_lr: float,
            mult: float) -> None:
    hip = learner.hippocampus
    clip = cfg.train.grad_clip
    if hip is not None:
        learner.fast_optimizer.zero_grad(set_to_none=True)
    if base_lr > 0:
        learner.base_optimizer.zero_grad(set_to_none=True)
    learner.backward(loss)
    if hip is not None:
        learner.step_optimizer(learner.fast_optimizer, list(hip.parameters()), cfg.experts.fast_lr * mult, clip)
        hip.update_drift()
    if base_lr > 0:  # the EWC penalty joins the base's gradients after the fp16 unscale (Learner.step_optimizer)
        learner.step_optimizer(learner.base_optimizer, learner.base_parameters(), base_lr, clip,
                               add_grad=lambda: ewc.add_penalty_grad(learner.neocortex))
    learner.end_update()


def _routing_record(routing, batch: Batch, stream_rows: int):
    """Per-sequence experts and weights to store with each episode, and the batch's routing shares."""
    if routing is None:
        return None, None, None
    gates = routing.gates.detach().float()
    if gates.dim() == 3:  # per-token routing: summarise each sequence by its mean gate over real tokens
        m = batch.attention_mask.float().unsqueeze(-1)
        gates = (gates * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, E)
    weights, ids = gates.topk(routing.expert_ids.shape[-1], dim=-1)  # (B, k)
    share = gates[:stream_rows].mean(0)  # (E,)
    return ids[:stream_rows], weights[:stream_rows], share
