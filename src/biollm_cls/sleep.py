"""Sleep: consolidate what base + hippocampus knows into the base alone.

Each sleep step draws a shuffled replay batch (reservoir episodes) and, with ``pseudo_rehearsal``, pseudo
examples whose teacher is the *current* system: ``replay_echo`` re-uses replayed inputs, ``random_tokens``
uses uniform random token prompts, ``mixed`` both. Counts follow the reference: ``P = max(1, round(R *
pseudo_ratio))``; mixed splits ``n_rand = round(P * pseudo_random_fraction)``, ``n_echo = P - n_rand``, with
at least one of each when ``P >= 2``.

Loss per step (the student is the base alone, in train mode; every teacher runs in eval mode)::

    distill = mean over supervised positions of KL(p_teacher || p_base)      # per token, not x T
    loss    = distill + target_ce_weight * CE(base, stored ground truth)     # replay rows only

The teacher is a top-k distribution (Hinton et al., 2015, restricted to the teacher's k largest logits,
renormalised): stored at wake time (``replay.teacher=stored_topk``) or recomputed from the current system
(``recompute``). The online-EWC penalty gradient is added after the single backward, at the gradients' true scale (after
the fp16 GradScaler's unscale; see ``ewc.py``).
``distill_kl`` is measured on a fixed replay probe before and after the cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from biollm_cls.benchmarks.base import IGNORE, Batch, to_device
from biollm_cls.config.schema import RunConfig
from biollm_cls.ewc import OnlineEWC
from biollm_cls.learner import Learner, scored_positions
from biollm_cls.replay import Episode, ReservoirReplay, collate
from biollm_cls.step_graphs import padded_inputs
from biollm_cls.token_losses import token_losses, top_logits


@dataclass
class SleepReport:
    steps: int = 0
    distill_loss: float = 0.0
    distill_kl: float = 0.0  # mean per-token KL over the cycle's steps
    distill_kl_before: float = 0.0  # on the fixed probe, before the cycle
    distill_kl_after: float = 0.0
    target_ce: float = 0.0
    ewc_penalty: float = 0.0
    pseudo_batch_size: float = 0.0
    replay_batch_size_sleep: float = 0.0
    sleep_mix_ratio_pseudo: float = 0.0
    fisher_replay_samples: int = 0
    fisher_pseudo_samples: int = 0
    fisher_source_mode: str = "none"
    pseudo_source_mode: str = "off"
    skipped_steps: int = 0
    # budget (counted into the run's ledger, see budget.py)
    gradient_rows: int = 0  # replay + pseudo rows in the base's gradients
    forward_passes: int = 0  # forward-only passes: pseudo teachers, the distill probe
    fisher_backwards: int = 0  # per-sequence backwards of the Fisher estimate
    hippocampal_replay_steps: int = 0


def pseudo_counts(replay_count: int, cfg: RunConfig) -> tuple[int, int]:
    """(n_echo, n_random) pseudo examples for a replay batch of `replay_count` (the reference's rules)."""
    c = cfg.consolidation
    if not c.pseudo_rehearsal or replay_count == 0:
        return 0, 0
    total = max(1, round(replay_count * c.pseudo_ratio))
    if c.pseudo_source == "replay_echo":
        return total, 0
    if c.pseudo_source == "random_tokens":
        return 0, total
    n_rand = round(total * c.pseudo_random_fraction)
    if total >= 2:
        n_rand = min(max(n_rand, 1), total - 1)
    return total - n_rand, n_rand


def random_prompts(n: int, length: int, vocab_size: int, pad_id: int, generator: torch.Generator) -> Batch:
    """n uniform-random token sequences, every position supervised (its teacher is the system)."""
    ids = torch.randint(0, vocab_size, (n, length), generator=generator)  # (n, T)
    tgt = torch.zeros(n, length, dtype=torch.long)  # placeholder: pseudo rows carry no ground truth
    return Batch(ids, tgt, torch.ones(n, length, dtype=torch.bool), torch.full((n,), -1))


@torch.no_grad()
def system_topk(learner: Learner, batch: Batch, k: int, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The current system's top-k logits at supervised positions: ([N,k] values, [N,k] ids), eval mode."""
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        hidden = learner.system_hidden(batch.input_ids, batch.attention_mask)  # (B, T, H)
        logits = learner.logits(hidden[batch.supervised])  # (N, V), the autocast dtype
    learner.neocortex.train(was)
    values, ids = top_logits(logits, k, compiled=learner.compiled_losses)  # (N, k); exact: fp32 holds every bf16 value
    return values.float(), ids


def topk_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_ids: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(p_T || p_S) over the teacher's top-k ids: [N,V],[N,k],[N,k] -> [N].

    Both distributions are renormalised over the *same* k ids, so the loss is a proper KL between two
    k-point distributions: 0 exactly when the student's logits on those ids match the teacher's up to a
    constant, and its gradient vanishes there. (Renormalising only the teacher, as before, left the
    student's full softmax on the other side: a student equal to the teacher still paid ~1.5 nats at k=8
    and descent moved it away from the teacher.) Mass outside the k ids is left to the ground-truth CE."""
    t = temperature
    log_pt = torch.log_softmax(teacher_values.float() / t, dim=-1)  # (N, k)
    log_ps = torch.log_softmax(student_logits.gather(1, teacher_ids.long()).float() / t, dim=-1)  # (N, k)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1) * (t * t)  # (N,)


def teacher_better(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_ids: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """[N] bool: the teacher gives the gold token more probability than the student, both renormalised over
    the teacher's k ids (as in `topk_kl`); a gold token outside the teacher's top k counts as 0 for it."""
    hit = teacher_ids.long() == targets.unsqueeze(1)  # (N, k)
    p_teacher = (torch.softmax(teacher_values.float(), -1) * hit).sum(-1)  # (N,)
    p_student = (torch.softmax(student_logits.gather(1, teacher_ids.long()).float(), -1) * hit).sum(-1)  # (N,)
    return p_teacher > p_student


def stored_teacher(episodes: list[Episode], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    values = to_device(torch.cat([e.teacher_values for e in episodes]), device)
    ids = to_device(torch.cat([e.teacher_ids for e in episodes]), device)
    return values, ids


def _teacher(learner: Learner, episodes: list[Episode], batch: Batch, cfg: RunConfig):
    if cfg.replay.teacher == "stored_topk" and episodes[0].teacher_values is not None:
        return stored_teacher(episodes, learner.device)
    return system_topk(learner, batch, cfg.replay.teacher_topk)


def concat_batches(a: Batch, b: Batch, pad_id: int) -> Batch:
    """Stack two batches row-wise, right-padding to the longer one."""
    T = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        return F.pad(x, (0, T - x.shape[1]), value=value)

    return Batch(
        torch.cat([pad(a.input_ids, pad_id), pad(b.input_ids, pad_id)]),
        torch.cat([pad(a.targets, IGNORE), pad(b.targets, IGNORE)]),
        torch.cat([pad(a.attention_mask, False), pad(b.attention_mask, False)]),
        torch.cat([a.task_ids, b.task_ids]),
    )


def _pseudo_inputs(replay: ReservoirReplay, replay_count: int, cfg: RunConfig, length: int, pad_id: int,
                   vocab_size: int, generator: torch.Generator) -> Batch | None:
    """The pseudo examples that go with a replay batch of `replay_count` rows (CPU), or None."""
    n_echo, n_rand = pseudo_counts(replay_count, cfg)
    parts = []
    if n_echo:
        parts.append(collate(replay.sample(n_echo), pad_id))
    if n_rand:
        parts.append(random_prompts(n_rand, length, vocab_size, pad_id, generator))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else concat_batches(*parts, pad_id)


@dataclass
class PseudoPool:
    """Every pseudo example of one sleep cycle with its teacher, made in a few batched passes up front.

    The teacher is the system as it stands when the cycle begins (a fixed target, like the stored replay
    teachers) rather than re-running the system at every step: one large teacher pass instead of one small
    pass per step, which on a GPU costs about as much as a single small pass.
    """

    batches: list[Batch]
    values: list[torch.Tensor]
    ids: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.batches)


def prepare_pseudo_pool(learner: Learner, replay: ReservoirReplay, cfg: RunConfig, steps: int, pad_id: int,
                        vocab_size: int, generator: torch.Generator, chunk_rows: int = 256) -> PseudoPool | None:
    replay_count = min(cfg.replay.batch_size, len(replay))
    per_step = [_pseudo_inputs(replay, replay_count, cfg, cfg.model.seq_len, pad_id, vocab_size, generator)
                for _ in range(steps)]
    if not per_step or per_step[0] is None:
        return None
    batches = [b.to(learner.device) for b in per_step]
    values, ids = [], []
    for start in range(0, len(batches), max(1, chunk_rows // len(batches[0]))):
        group = batches[start : start + max(1, chunk_rows // len(batches[0]))]
        merged = group[0]
        for b in group[1:]:
            merged = concat_batches(merged, b, pad_id)
        v, i = system_topk(learner, merged, cfg.replay.teacher_topk)  # row-major over supervised positions
        sizes = [int(b.supervised.sum()) for b in group]
        values += list(v.split(sizes))
        ids += list(i.split(sizes))
    return PseudoPool(batches, values, ids)


class RecentQueue:
    """The episodes since the last sleep, replayed in shuffled passes: every one of them once before any of
    them twice (independent draws per step would leave about a third of them unreplayed in a sleep)."""

    def __init__(self, replay: ReservoirReplay, since_step: int):
        self.replay, self.pool, self.order = replay, replay.recent(since_step), []

    def take(self, n: int) -> list[Episode]:
        out: list[Episode] = []
        while len(out) < n and self.pool:
            if not self.order:
                self.order = self.replay.rng.sample(self.pool, len(self.pool))
            take = min(n - len(out), len(self.order))
            out += self.order[:take]
            self.order = self.order[take:]
        return out


def sample_sleep_episodes(replay: ReservoirReplay, cfg: RunConfig, recent: RecentQueue | None = None) -> list[Episode]:
    """One sleep batch of episodes: `recent_fraction` of them from the episodes since the last sleep (the
    `recent` queue), the rest drawn uniformly from the whole memory (an episode may appear in both parts)."""
    n = cfg.replay.batch_size
    fresh = recent.take(round(n * cfg.consolidation.recent_fraction)) if recent is not None else []
    return fresh + replay.sample(n - len(fresh))


def build_sleep_batch(learner: Learner, replay: ReservoirReplay, cfg: RunConfig, pad_id: int, vocab_size: int,
                      generator: torch.Generator, pseudo: tuple[Batch, torch.Tensor, torch.Tensor] | None = None,
                      recent: RecentQueue | None = None):
    """One sleep mini-batch on the device: (batch, teacher values, teacher ids, n_replay_rows, n_pseudo).

    `pseudo` is this step's share of a `PseudoPool`; without it (and with pseudo-rehearsal on) the pseudo
    examples and their teacher (the current system) are made here."""
    episodes = sample_sleep_episodes(replay, cfg, recent)
    batch = collate(episodes, pad_id).to(learner.device)
    if cfg.consolidation.distill_weight == 0:  # ground truth only (the er_matched replay steps): no teacher
        return batch, None, None, len(episodes), 0
    values, ids = _teacher(learner, episodes, batch, cfg)
    if pseudo is None:
        inputs = _pseudo_inputs(replay, len(episodes), cfg, batch.input_ids.shape[1], pad_id, vocab_size, generator)
        if inputs is None:
            return batch, values, ids, len(episodes), 0
        inputs = inputs.to(learner.device)
        pseudo = (inputs, *system_topk(learner, inputs, cfg.replay.teacher_topk))
    p_batch, p_values, p_ids = pseudo
    # Row order inside one batch does not change a full-batch gradient, so replay rows stay first
    # (their stored teacher rows line up with the supervised positions in row-major order).
    mixed = concat_batches(batch, p_batch, pad_id)
    return mixed, torch.cat([values, p_values.to(values.dtype)]), torch.cat([ids, p_ids.to(ids.dtype)]), \
        len(episodes), len(p_batch)


def sleep_step(learner: Learner, batch: Batch, t_values: torch.Tensor | None, t_ids: torch.Tensor | None,
               n_replay: int, cfg: RunConfig, ewc: OnlineEWC) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One base update on a sleep batch. Returns (distill KL, target CE, applied), all on the device: `applied`
    is False where the loss was non-finite and the update was skipped. With ``train.cuda_graphs`` (CUDA) the
    step is a captured graph (`_captured_sleep_step`); otherwise it runs eagerly here."""
    if learner.graphs is not None and learner.precision.scaler is None:
        return _captured_sleep_step(learner, batch, t_values, t_ids, n_replay, cfg, ewc)
    learner.neocortex.train()
    # Perf: free the previous step's gradients before the forward, not after it (peak memory: the old
    # gradients and this step's activations are never alive together). Nothing reads .grad in between.
    learner.base_optimizer.zero_grad(set_to_none=True)
    # The supervised positions' count: known from the teacher's rows, else the step's one other host sync.
    size = t_values.shape[0] if t_values is not None else int(batch.supervised.sum())
    distill, target_ce, loss = sleep_losses(learner, batch, t_values, t_ids, n_replay, cfg, size)
    if not torch.isfinite(loss):  # the step's host sync: a non-finite loss must not reach the weights
        return distill.detach(), target_ce.detach(), torch.zeros((), dtype=torch.bool, device=loss.device)
    learner.backward(loss)
    learner.step_optimizer(learner.base_optimizer, learner.base_parameters(), cfg.consolidation.slow_lr,
                           cfg.train.grad_clip, add_grad=lambda: ewc.add_penalty_grad(learner.neocortex))
    learner.end_update()
    return distill.detach(), target_ce.detach(), torch.ones((), dtype=torch.bool, device=loss.device)


def sleep_losses(learner: Learner, batch: Batch, t_values: torch.Tensor | None, t_ids: torch.Tensor | None,
                 n_replay: int, cfg: RunConfig, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(distill, target CE, loss) of the base alone on a sleep batch, with autograd.

    `size` positions are scored: the supervised ones in row-major order (the order of the teacher's rows), then
    padding that every mean leaves out. `t_values`/`t_ids` ([size,k]) have a row per scored position. The eager
    step scores exactly the supervised positions; a captured step scores B*T (a shape fixed by the batch's)."""
    T = batch.input_ids.shape[1]
    flat, real = scored_positions(batch.supervised, size)  # (size,) each
    with learner.precision.autocast():
        hidden = learner.base_hidden(batch.input_ids, batch.attention_mask)  # (B, T, H)
        logits = learner.logits(hidden.flatten(0, 1)[flat])  # (size, V), the autocast dtype
    c = cfg.consolidation
    targets = batch.targets.flatten()[flat]  # (size,)
    is_replay = (flat // T < n_replay) & real  # (size,) replay rows come first; pseudo rows have no ground truth
    n_real = real.sum().clamp(min=1)
    # both per-token losses in one fused pass over the logits (token_losses.py: no fp32 [size, V] copies)
    token_ce, per_token = token_losses(logits, targets if c.target_ce_weight > 0 else None, t_values, t_ids,
                                       c.distill_temperature, compiled=learner.compiled_losses)  # (size,) each
    distill = torch.zeros((), device=logits.device)
    if t_values is not None:
        keep = real
        if c.distill_gate == "teacher_better":
            keep = keep & (teacher_better(logits.detach(), t_values, t_ids, targets) | ~is_replay)
        distill = (per_token * keep).sum() / n_real  # mean over the supervised positions, gated ones count 0
    target_ce = torch.zeros((), device=logits.device)
    if c.target_ce_weight > 0:  # mean over the replay rows' tokens (a masked mean: no host sync for their count)
        target_ce = (token_ce * is_replay).sum() / is_replay.sum().clamp(min=1)
    return distill, target_ce, c.distill_weight * distill + c.target_ce_weight * target_ce


def _captured_sleep_step(learner: Learner, batch: Batch, t_values: torch.Tensor | None,
                         t_ids: torch.Tensor | None, n_replay: int, cfg: RunConfig, ewc: OnlineEWC):
    """`sleep_step` as a CUDA graph (step_graphs.py): the same losses over B*T scored positions (the teacher's
    rows padded to that), the finite check on the device (the fused AdamW skips the update, its step count
    included, when ``found_inf`` is set), no host sync."""
    inputs, size = padded_inputs(batch, cfg.model.seq_len)
    if t_values is not None:
        inputs["t_values"] = F.pad(t_values, (0, 0, 0, size - t_values.shape[0]))  # (size, k)
        inputs["t_ids"] = F.pad(t_ids, (0, 0, 0, size - t_ids.shape[0]))
    opt, params = learner.base_optimizer, learner.base_parameters()
    c = cfg.consolidation

    def step(x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        learner.neocortex.train()
        opt.zero_grad(set_to_none=True)
        padded = Batch(x["input_ids"], x["targets"], x["attention_mask"], batch.task_ids)
        distill, target_ce, loss = sleep_losses(learner, padded, x.get("t_values"), x.get("t_ids"), n_replay,
                                                cfg, size)
        finite = torch.isfinite(loss)
        loss.backward()
        learner.step_optimizer(opt, params, c.slow_lr, cfg.train.grad_clip,
                               add_grad=lambda: ewc.add_penalty_grad(learner.neocortex), skip=~finite)
        return distill.detach(), target_ce.detach(), finite

    key = ("sleep", n_replay, c.slow_lr, ewc.revision, ewc.active)
    return learner.graphs.run(key, step, inputs, after_capture=lambda: opt.zero_grad(set_to_none=True))


def hippocampal_replay_step(learner: Learner, batch: Batch, t_values: torch.Tensor, t_ids: torch.Tensor,
                            n_replay: int, cfg: RunConfig) -> bool:
    """Optional (``consolidation.hippocampal_replay``): after the base update, the hippocampus relearns the
    same replayed episodes on top of the consolidated base (system -> teacher, the wake loss on replay).

    Where the base now predicts an episode's teacher by itself, the best delta there is ~0, so the
    hippocampus learns to stop overriding consolidated tasks; where it does not, the hippocampus keeps it.
    Without it, the delta learned for the newest task is added to every sequence and the deployed system
    forgets what the base has kept. Costs one wake-like step (frozen base) per sleep step."""
    hip = learner.hippocampus
    sup = batch.supervised
    with learner.frozen_base():
        learner.neocortex.eval()
        with learner.precision.autocast():
            logits = learner.logits(learner.system_hidden(batch.input_ids, batch.attention_mask)[sup]).float()
        loss = topk_kl(logits, t_values, t_ids, cfg.consolidation.distill_temperature).mean()
        if cfg.consolidation.target_ce_weight > 0:
            n_tokens = int(sup[:n_replay].sum())
            loss = loss + cfg.consolidation.target_ce_weight * F.cross_entropy(logits[:n_tokens],
                                                                               batch.targets[sup][:n_tokens])
        if not torch.isfinite(loss):
            return False
        learner.fast_optimizer.zero_grad(set_to_none=True)
        learner.backward(loss)
        learner.step_optimizer(learner.fast_optimizer, list(hip.parameters()), cfg.experts.fast_lr,
                               cfg.train.grad_clip)
        learner.end_update()
    hip.update_drift()
    return True


@torch.no_grad()
def probe_kl(learner: Learner, episodes: list[Episode], pad_id: int, cfg: RunConfig) -> float:
    """Mean per-token KL(teacher || base) on a fixed set of replay episodes, eval mode."""
    if not episodes:
        return 0.0
    batch = collate(episodes, pad_id).to(learner.device)
    values, ids = _teacher(learner, episodes, batch, cfg)
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        logits = learner.logits(learner.base_hidden(batch.input_ids, batch.attention_mask)[batch.supervised])
    learner.neocortex.train(was)
    return float(topk_kl(logits.float(), values, ids, cfg.consolidation.distill_temperature).mean())


def sleep_cycle(learner: Learner, replay: ReservoirReplay, ewc: OnlineEWC, steps: int, cfg: RunConfig,
                pad_id: int, vocab_size: int, generator: torch.Generator, since_step: int = 0) -> SleepReport:
    """`steps` consolidation updates, then the online-EWC Fisher at the consolidated weights.
    `since_step`: the previous sleep's step (episodes after it are "recent", see recent_fraction)."""
    report = SleepReport(pseudo_source_mode=cfg.consolidation.pseudo_source
                         if cfg.consolidation.pseudo_rehearsal else "off")
    if len(replay) == 0 or steps <= 0:
        return report
    distills = cfg.consolidation.distill_weight > 0
    probe = replay.sample(cfg.replay.batch_size) if distills else []
    report.distill_kl_before = probe_kl(learner, probe, pad_id, cfg)
    report.forward_passes += 2 * bool(probe)  # the probe, before and after
    # Per step, on the device (no host sync per step): distill, target CE, loss (0 where skipped: a skipped
    # step's non-finite losses stay out of the means) and whether it was applied; read once after the cycle.
    tallies, rows = [], []
    pool = prepare_pseudo_pool(learner, replay, cfg, steps, pad_id, vocab_size, generator) if distills else None
    recent = RecentQueue(replay, since_step) if cfg.consolidation.recent_fraction > 0 else None
    if pool is not None:
        report.forward_passes += math.ceil(len(pool) / max(1, 256 // len(pool.batches[0])))
    c = cfg.consolidation
    for step in range(steps):
        pseudo = (pool.batches[step], pool.values[step], pool.ids[step]) if pool is not None else None
        batch, t_values, t_ids, n_replay, n_pseudo = build_sleep_batch(learner, replay, cfg, pad_id, vocab_size,
                                                                       generator, pseudo, recent)
        distill, target_ce, applied = sleep_step(learner, batch, t_values, t_ids, n_replay, cfg, ewc)
        if c.hippocampal_replay and learner.hippocampus is not None and bool(applied):
            report.hippocampal_replay_steps += hippocampal_replay_step(learner, batch, t_values, t_ids, n_replay, cfg)
        step_losses = torch.stack([distill, target_ce, c.distill_weight * distill + c.target_ce_weight * target_ce])
        # a new tensor: a captured step's outputs are overwritten by its next replay
        tallies.append(torch.cat([torch.where(applied, step_losses, 0.0), applied.float().reshape(1)]))
        rows.append((n_replay, n_pseudo))
    sums = [0.0, 0.0, 0.0]
    replay_total = pseudo_total = 0
    for (*step_losses, ok), (n_replay, n_pseudo) in zip(torch.stack(tallies).tolist(), rows, strict=True):
        if not ok:
            report.skipped_steps += 1
            continue
        sums = [a + b for a, b in zip(sums, step_losses, strict=True)]
        replay_total, pseudo_total = replay_total + n_replay, pseudo_total + n_pseudo
        report.steps += 1
    report.gradient_rows = replay_total + pseudo_total
    n = max(report.steps, 1)
    report.distill_kl, report.target_ce, report.distill_loss = (v / n for v in sums)
    report.pseudo_batch_size = pseudo_total / n
    report.replay_batch_size_sleep = replay_total / n
    report.sleep_mix_ratio_pseudo = pseudo_total / max(pseudo_total + replay_total, 1)
    report.ewc_penalty = float(ewc.penalty(learner.neocortex))
    report.distill_kl_after = probe_kl(learner, probe, pad_id, cfg)
    _consolidate_fisher(learner, replay, ewc, cfg, pad_id, vocab_size, generator, report)
    return report


def _consolidate_fisher(learner: Learner, replay: ReservoirReplay, ewc: OnlineEWC, cfg: RunConfig, pad_id: int,
                        vocab_size: int, generator: torch.Generator, report: SleepReport) -> None:
    if ewc.lambda_ <= 0:
        return
    n = cfg.ewc.fisher_samples
    n_echo, n_rand = pseudo_counts(n, cfg) if cfg.consolidation.fisher_use_capability_mix else (0, 0)
    n_echo, n_rand = min(n_echo, n - 1), min(n_rand, n - 1 - min(n_echo, n - 1))
    replay_part = collate(replay.sample(n - n_echo - n_rand), pad_id)
    parts = [replay_part]
    if n_echo:
        parts.append(collate(replay.sample(n_echo), pad_id))
    if n_rand:
        parts.append(random_prompts(n_rand, replay_part.input_ids.shape[1], vocab_size, pad_id, generator))
    batches = [p.to(learner.device) for p in parts]
    report.fisher_replay_samples = len(replay_part)
    report.fisher_pseudo_samples = sum(len(p) for p in parts[1:])
    n_pseudo = report.fisher_pseudo_samples
    report.fisher_source_mode = "mixed_replay_pseudo" if n_pseudo else "replay_only"
    ewc.consolidate(learner.neocortex, batches, learner.base_hidden, learner.logits, learner.precision.autocast,
                    generator)
    report.fisher_backwards += sum(len(b) for b in batches)  # one backward per sequence (true Fisher)
