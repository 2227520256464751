"""Expert refresh: recycle experts whose knowledge the neocortex has absorbed.

After every sleep, each expert ``e`` is tested on replay episodes that were
routed to it: does the base alone now predict what the system predicted when it learned them? If the
per-token ``KL(p_teacher || p_base)`` (the stored top-k teacher, over supervised positions, eval mode) is
below ``consolidation.refresh.kl_threshold`` — or the base is already at least as good as the system on the
episodes' ground truth (a base trained on the ground truth moves away from a wrong teacher) — the expert
is partially reset toward its initial weights
(``theta <- theta0 + reset_factor * (theta - theta0)``) and its optimizer moments are cleared, so it can
learn something new. All experts are tested in one batch: one base pass and one system pass in total.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from biollm_cls.config.schema import RunConfig
from biollm_cls.learner import Learner, per_row_mean, supervised_rows
from biollm_cls.replay import ReservoirReplay, collate
from biollm_cls.sleep import topk_kl


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
def expert_absorption(learner: Learner, replay: ReservoirReplay, samples_per_expert: int, pad_id: int
                      ) -> Absorption:
    """Absorption of every expert on its own routed episodes, in one batch: a base pass and a system pass."""
    hip = learner.hippocampus
    rows, owners = [], []
    for e, episodes in enumerate(replay.sample_per_expert(hip.num_experts, samples_per_expert)):
        for ep in episodes:
            if ep.teacher_values is not None and ep.teacher_values.numel():
                rows.append(ep)
                owners.append(e)
    if not rows:
        return Absorption({}, {}, {})
    batch = collate(rows, pad_id).to(learner.device)
    owner = torch.tensor(owners, device=learner.device)
    values = torch.cat([ep.teacher_values for ep in rows]).to(learner.device)  # (N, k)
    ids = torch.cat([ep.teacher_ids for ep in rows]).to(learner.device)  # (N, k)
    sup = batch.supervised
    targets = batch.targets[sup]  # (N,)
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        base = learner.logits(learner.base_hidden(batch.input_ids, batch.attention_mask)[sup]).float()  # (N, V)
        system = learner.logits(learner.system_hidden(batch.input_ids, batch.attention_mask)[sup]).float()
    learner.neocortex.train(was)
    token_rows = supervised_rows(sup)
    counts = torch.bincount(owner, minlength=hip.num_experts).float()

    def per_expert(token_values: torch.Tensor) -> dict[int, float]:  # [N] per token -> {expert: mean}
        row = per_row_mean(token_values, token_rows, len(rows))  # (rows,)
        total = torch.zeros(hip.num_experts, device=learner.device).index_add_(0, owner, row)
        mean = (total / counts.clamp(min=1)).tolist()
        return {e: mean[e] for e in range(hip.num_experts) if counts[e] > 0}

    return Absorption(
        teacher_kl=per_expert(topk_kl(base, values, ids)),
        base_ce=per_expert(F.cross_entropy(base, targets, reduction="none")),
        system_ce=per_expert(F.cross_entropy(system, targets, reduction="none")),
    )


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
