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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import Batch
from biollm_cls.config.schema import RunConfig
from biollm_cls.ewc import OnlineEWC
from biollm_cls.learner import Learner, per_row_mean, supervised_rows, to_host
from biollm_cls.sleep import topk_kl


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
    DER++ term ``replay.wake_distill_weight * KL(stored || system)`` on the replayed rows, beside their CE."""
    hip = learner.hippocampus
    base_lr = cfg.consolidation.slow_lr * cfg.consolidation.wake_base_lr_scale
    base_trains = base_lr > 0
    learner.neocortex.train(base_trains)  # a frozen base runs deterministically (no dropout)
    sup = batch.supervised  # (B, T)
    # Perf: a base that does not learn in this step is not tracked by autograd (see Learner.frozen_base).
    frozen = learner.frozen_base() if hip is not None and not base_trains else contextlib.nullcontext()
    # Perf: a frozen base in eval mode gives the same injection-point state after the update, so the post-update
    # teacher re-runs only the hippocampus and the upper layers from it (see _post_update_teacher).
    resume = keep_teacher and hip is not None and not base_trains and learner.can_resume
    with frozen, learner.precision.autocast():
        hidden = learner.system_hidden(batch.input_ids, batch.attention_mask, track_stats=hip is not None,
                                       keep_split=resume)
        logits = learner.logits(hidden[sup]).float()  # (N, V)
    targets = batch.targets[sup]  # (N,)
    token_loss = F.cross_entropy(logits, targets, reduction="none")  # (N,)
    ce = token_loss.mean()
    routing = learner.last_routing[0] if hip is not None else None
    reg = hip.routing_regulariser(routing, batch.attention_mask) if routing is not None else torch.zeros(())
    loss = ce + cfg.experts.routing_reg_weight * reg
    if replay_teacher is not None and cfg.replay.wake_distill_weight > 0:
        n_stream = int(sup[:stream_rows].sum())
        values, ids = replay_teacher
        loss = loss + cfg.replay.wake_distill_weight * topk_kl(logits[n_stream:], values, ids).mean()
    accuracy = (logits.detach().argmax(-1) == targets).float().mean()

    # The step's one host sync for its scalars (the reward needs the accuracy before the update).
    acc_value, loss_value, ce_value, reg_value, n_supervised = torch.stack(
        [accuracy, loss.detach(), ce.detach(), reg.detach().to(ce.device), sup.sum().float()]).tolist()
    finite = loss_value == loss_value and abs(loss_value) != float("inf")
    mult = 1.0
    if cfg.train.reward_from_correctness:
        mult = min(2.0, max(0.25, 1.0 + cfg.experts.reward_alpha * (2.0 * acc_value - 1.0)))
    if finite:
        _update(learner, loss, cfg, ewc, base_lr, mult)

    teacher_values = teacher_ids = None
    if keep_teacher:  # the teacher is the system *after* this update: what sleep should consolidate
        split = learner.last_split[:stream_rows] if resume else None
        teacher_values, teacher_ids, row_loss = _post_update_teacher(learner, batch, stream_rows,
                                                                     cfg.replay.teacher_topk, split)
    else:
        row_loss = per_row_mean(token_loss.detach(), supervised_rows(sup), len(batch))[:stream_rows]
    learner.last_split = None
    ids, weights, share = _routing_record(routing, batch, stream_rows)
    # Everything the episodes keep leaves the device in one batch of asynchronous copies and one wait.
    row_loss, teacher_values, teacher_ids, ids, weights, share = to_host(
        row_loss, teacher_values, teacher_ids, ids, weights, share)
    return WakeOutcome(
        loss=ce_value, accuracy=acc_value, reward_mult=mult, routing_reg=reg_value,
        supervised_tokens=int(n_supervised), batch_tokens=sup.numel(), applied=finite, row_loss=row_loss,
        expert_ids=ids, expert_weights=weights, expert_share=share, teacher_values=teacher_values,
        teacher_ids=teacher_ids,
    )


@torch.no_grad()
def _post_update_teacher(learner: Learner, batch: Batch, stream_rows: int, k: int,
                         split: torch.Tensor | None = None):
    """One forward-only pass of the updated system on the new rows, eval mode: ([N,k] fp16 top-k logits,
    [N,k] int32 ids, [B_stream] CE per row). Storing the pre-update logits instead would make sleep distil
    the system as it was before it learned the batch (top-1 0.23 vs 0.44 on a task's first steps).
    `split` [B_stream,T,H]: the training pass's injection-point state (frozen base): the pass then starts there."""
    new = batch.input_ids[:stream_rows], batch.attention_mask[:stream_rows]
    sup, targets = batch.supervised[:stream_rows], batch.targets[:stream_rows]
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        hidden = learner.system_hidden(*new) if split is None else learner.system_hidden_from_split(split, new[1])
        logits = learner.logits(hidden[sup]).float()  # (N, V)
    learner.neocortex.train(was)
    token_loss = F.cross_entropy(logits, targets[sup], reduction="none")  # (N,)
    row_loss = per_row_mean(token_loss, supervised_rows(sup), stream_rows)
    top = logits.topk(min(k, logits.shape[-1]), dim=-1)  # row-major over supervised positions
    return top.values.half(), top.indices.int(), row_loss  # on the device; wake_step moves them in one batch


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
