"""Expert refresh: recycle experts whose knowledge the neocortex has absorbed.

After a sleep that lowered the distillation KL, each expert ``e`` is tested on replay episodes that were
routed to it: does the base alone now predict what base + expert ``e`` (at its routing weight) predicts?
If the per-token ``KL(p_{base+e} || p_base)`` over supervised positions, in eval mode, is below
``consolidation.refresh.kl_threshold``, the expert is partially reset toward its initial weights
(``theta <- theta0 + reset_factor * (theta - theta0)``) and its optimizer moments are cleared, so it can
learn something new. All experts are tested in one batch: two forward passes in total (base, and base with
each row's own expert forced in), not a pass per expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from biollm_cls.config.schema import RunConfig
from biollm_cls.learner import Learner, per_row_mean, supervised_rows
from biollm_cls.replay import ReservoirReplay, collate


@dataclass
class RefreshReport:
    refresh_count: int = 0
    refresh_avg_kl: float = 0.0  # mean KL over the experts that were tested
    tested: int = 0
    expert_kl: dict[int, float] = field(default_factory=dict)
    reset_experts: list[int] = field(default_factory=list)


@torch.no_grad()
def expert_absorption_kl(learner: Learner, replay: ReservoirReplay, samples_per_expert: int, pad_id: int
                         ) -> dict[int, float]:
    """Per-token KL(base + expert || base) on each expert's own routed episodes, for every expert with any."""
    hip = learner.hippocampus
    rows, owners, weights = [], [], []
    for e, episodes in enumerate(replay.sample_per_expert(hip.num_experts, samples_per_expert)):
        for ep in episodes:
            rows.append(ep)
            owners.append(e)
            weights.append(float(ep.expert_weights[ep.expert_ids == e].sum()))
    if not rows:
        return {}
    batch = collate(rows, pad_id).to(learner.device)
    owner = torch.tensor(owners, device=learner.device)
    gates = torch.zeros(len(rows), hip.num_experts, device=learner.device)
    gates[torch.arange(len(rows), device=learner.device), owner] = torch.tensor(weights, device=learner.device)
    sup = batch.supervised
    was = learner.neocortex.training
    learner.neocortex.eval()
    with learner.precision.autocast():
        forced = learner.logits(learner.forced_hidden(batch.input_ids, batch.attention_mask, gates)[sup]).float()
        base = learner.logits(learner.base_hidden(batch.input_ids, batch.attention_mask)[sup]).float()
    learner.neocortex.train(was)
    log_f, log_b = torch.log_softmax(forced, -1), torch.log_softmax(base, -1)  # (N, V)
    token_kl = (log_f.exp() * (log_f - log_b)).sum(-1)  # (N,) KL(base + expert || base)
    row_kl = per_row_mean(token_kl, supervised_rows(sup), len(rows))  # (rows,)
    per_expert = torch.zeros(hip.num_experts, device=learner.device).index_add_(0, owner, row_kl)
    counts = torch.bincount(owner, minlength=hip.num_experts).float()
    mean = (per_expert / counts.clamp(min=1)).tolist()
    return {e: mean[e] for e in range(hip.num_experts) if counts[e] > 0}


def refresh_experts(learner: Learner, replay: ReservoirReplay, cfg: RunConfig, pad_id: int) -> RefreshReport:
    r = cfg.consolidation.refresh
    report = RefreshReport()
    if learner.hippocampus is None or r.reset_factor >= 1.0:
        return report
    kls = expert_absorption_kl(learner, replay, r.samples_per_expert, pad_id)
    absorbed = [e for e, kl in kls.items() if kl < r.kl_threshold]
    learner.hippocampus.partial_reset_expert(absorbed, r.reset_factor, learner.fast_optimizer)
    report.expert_kl, report.reset_experts = kls, absorbed
    report.tested, report.refresh_count = len(kls), len(absorbed)
    report.refresh_avg_kl = sum(kls.values()) / len(kls) if kls else 0.0
    return report
