"""Expert refresh: recycle experts whose knowledge the neocortex has absorbed.

After every sleep, each expert ``e`` is tested on replay episodes that were
routed to it: does the base alone now predict what the system predicted when it learned them? If the
per-token ``KL(p_teacher || p_base)`` (the stored top-k teacher, over supervised positions, eval mode) is
below ``consolidation.refresh.kl_threshold`` — or the base is already at least as good as the system on the
episodes' ground truth (a base trained on the ground truth moves away from a wrong teacher) — the expert
is partially reset toward its initial weights
(``theta <- theta0 + reset_factor * (theta - theta0)``) and its optimizer moments are cleared, so it can
learn something new. All experts are tested together (rows in chunks): one base pass and one system pass over
their rows, the system pass starting from the base pass's state at the injection point where the neocortex allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from biollm_cls.benchmarks.base import to_device
from biollm_cls.config.schema import RunConfig
from biollm_cls.learner import Learner, per_row_mean
from biollm_cls.replay import ReservoirReplay, collate
from biollm_cls.token_losses import token_losses


@dataclass
class RefreshReport:
    refresh_count: int = 0
    refresh_avg_kl: float = 0.0  # mean KL over the experts that were tested
    tested: int = 0
    expert_kl: dict[int, float] = field(default_factory=dict)
    reset_experts: list[int] = field(default_factory=list)


@dataclass
class Absorption:
    """Per expert (that has routed episodes with teachers): how well the base alone covers its episodes."""

    teacher_kl: dict[int, float]  # per-token KL(stored teacher || base)
    base_ce: dict[int, float]  # per-token CE of the base on the stored ground truth
    system_ce: dict[int, float]  # the same for the system (base + hippocampus as routed now)

    def absorbed(self, kl_threshold: float) -> list[int]:
        """Absorbed: the base reproduces what the system predicted when it learned the episodes, or the base
        is already at least as good as the system on their ground truth (the expert no longer helps there)."""
        return [e for e, kl in self.teacher_kl.items() if kl < kl_threshold or self.base_ce[e] <= self.system_ce[e]]


@torch.no_grad()
def expert_absorption(learner: Learner, replay: ReservoirReplay, samples_per_expert: int, pad_id: int,
                      chunk_tokens: int = 16384) -> Absorption:
    """Absorption of every expert on its own routed episodes: all experts' rows together, a chunk of rows
    (`chunk_tokens` positions) at a time, each a base pass and a system pass (the latter from the base's
    injection-point state)."""
    hip = learner.hippocampus
    # Perf: an episode routed to several experts (each keeps its top-k) can be sampled for more than one; it is
    # scored once (`rows`), and each (expert, episode) pair reads its row (`row_of`): 1/8 fewer rows at the
    # bench's design point, the same scores.
    rows, owners, row_of, index = [], [], [], {}
    for e, episodes in enumerate(replay.sample_per_expert(hip.num_experts, samples_per_expert)):
        for ep in episodes:
            if ep.teacher_values is not None and ep.teacher_values.numel():
                if id(ep) not in index:
                    index[id(ep)] = len(rows)
                    rows.append(ep)
                row_of.append(index[id(ep)])
                owners.append(e)
    if not rows:
        return Absorption({}, {}, {})
    owner = torch.tensor(owners, device=learner.device)  # (pairs,)
    was = learner.neocortex.training
    learner.neocortex.eval()
    # [3, rows]: per row, the mean per-token KL(teacher || base), CE of the base, CE of the system. In chunks of
    # at most `chunk_tokens` positions: the [N, V] logits of all rows at once are GBs at long sequences (64 rows
    # x 1024 tokens x 16k vocab); short rows still go in one batch (few, large passes).
    per_row = torch.cat([_row_scores(learner, chunk, pad_id) for chunk in _chunks(rows, chunk_tokens)], dim=1)
    learner.neocortex.train(was)
    per_pair = per_row[:, torch.tensor(row_of, device=learner.device)]  # (3, pairs)
    counts = torch.bincount(owner, minlength=hip.num_experts).float()
    total = torch.zeros(3, hip.num_experts, device=learner.device).index_add_(1, owner, per_pair)
    mean = (total / counts.clamp(min=1)).tolist()  # the one host sync
    experts = [e for e in range(hip.num_experts) if counts[e] > 0]
    kl, base_ce, system_ce = ({e: m[e] for e in experts} for m in mean)
    return Absorption(teacher_kl=kl, base_ce=base_ce, system_ce=system_ce)


def _chunks(rows: list, chunk_tokens: int) -> list[list]:
    """Consecutive groups of rows whose padded batch (rows x longest row) stays within `chunk_tokens`."""
    out, group, longest = [], [], 0
    for row in rows:
        longest_with = max(longest, len(row.input_ids))
        if group and longest_with * (len(group) + 1) > chunk_tokens:
            out.append(group)
            group, longest_with = [], len(row.input_ids)
        group.append(row)
        longest = longest_with
    return out + [group] if group else out


def _row_scores(learner: Learner, rows: list, pad_id: int) -> torch.Tensor:
    """[3, len(rows)] per-row mean per-token (KL(teacher || base), CE base, CE system), eval mode, no grad.
    Perf: the system view starts from the base pass's injection-point state where the neocortex can resume
    (the same base weights, so the same state): the lower layers run once for both views."""
    batch = collate(rows, pad_id)  # CPU
    # Perf: the supervised positions (row-major, as a boolean mask would give them) found on the host and
    # copied with the batch: indexing by a device mask would wait for the GPU (a host sync) three times a chunk
    flat = batch.supervised.flatten().nonzero().squeeze(1)  # (N,)
    token_rows = to_device(flat // batch.input_ids.shape[1], learner.device)  # (N,)
    flat, batch = to_device(flat, learner.device), batch.to(learner.device)
    values = to_device(torch.cat([ep.teacher_values for ep in rows]), learner.device)  # (N, k)
    ids = to_device(torch.cat([ep.teacher_ids for ep in rows]), learner.device)  # (N, k)
    targets = batch.targets.flatten()[flat]  # (N,)
    resume = learner.can_resume
    with learner.precision.autocast():
        # (N, V) each, the autocast dtype: token_losses scores them in fp32 chunks, without fp32 copies
        hidden = learner.base_hidden(batch.input_ids, batch.attention_mask, keep_split=resume)  # (B, T, H)
        base = learner.logits(hidden.flatten(0, 1)[flat])
        base_ce, kl = token_losses(base, targets, values, ids, compiled=learner.compiled_losses)  # (N,) each
        del base, hidden
        if resume:
            system_h = learner.system_hidden_from_split(learner.last_split, batch.attention_mask)
            learner.last_split = None
        else:
            system_h = learner.system_hidden(batch.input_ids, batch.attention_mask)
        system_ce, _ = token_losses(learner.logits(system_h.flatten(0, 1)[flat]), targets,
                                    compiled=learner.compiled_losses)  # (N,)
    scores = (kl, base_ce, system_ce)  # 3 x (N,)
    return torch.stack([per_row_mean(v, token_rows, len(rows)) for v in scores])  # (3, rows)


def refresh_experts(learner: Learner, replay: ReservoirReplay, cfg: RunConfig, pad_id: int) -> RefreshReport:
    r = cfg.consolidation.refresh
    report = RefreshReport()
    if learner.hippocampus is None or r.reset_factor >= 1.0:
        return report
    absorption = expert_absorption(learner, replay, r.samples_per_expert, pad_id)
    kls = absorption.teacher_kl
    absorbed = absorption.absorbed(r.kl_threshold)
    learner.hippocampus.partial_reset_expert(absorbed, r.reset_factor, learner.fast_optimizer)
    report.expert_kl, report.reset_experts = kls, absorbed
    report.tested, report.refresh_count = len(kls), len(absorbed)
    report.refresh_avg_kl = sum(kls.values()) / len(kls) if kls else 0.0
    return report
