"""The hippocampus: a fast, sparse mixture of expert MLPs injected at the neocortex's mid layer.

A router scores ``E`` experts and keeps the ``top_k`` per sequence (pooled over non-padding positions,
the reference's behaviour) or per token. Each expert is ``Linear(H->eh) -> GELU -> Linear(eh->H)``;
the hippocampal delta is the routing-weighted sum of the selected experts' outputs, added to the
residual stream (McClelland et al., 1995: a fast learner beside a slow one).

Implementation notes (why it looks like this):
* All experts' weights are stacked tensors ``w_in [E,H,eh]``, ``w_out [E,eh,H]``; dispatch is one dense,
  gated einsum (unselected experts get gate 0, hence zero output and zero gradient). No Python loop over
  rows or experts and no host sync: with small experts the dense form is faster than a gather.
* Output layers start at zero, so ``delta == 0`` at step 0 and the system equals the base.
* The initial weights are buffers (saved, moved with ``.to``), so ``partial_reset_expert`` moves an
  expert back toward its initial weights after a reload too.
* Usage is an EMA of routing mass (recent load, not all history); drift is ``||theta_e - theta_e^0||``;
  both stay on the device.
* Load balancing uses the Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (Fedus et al., 2021),
  which has a gradient through the router probabilities ``P_e`` (the reference's regulariser had none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biollm_cls.config.schema import ExpertsConfig

_EXPERT_PARAMS = ("w_in", "b_in", "w_out", "b_out")


@dataclass
class Routing:
    """Which experts a forward used. Per-sequence routing: [B,k] / [B,E]; per-token: [B,T,k] / [B,T,E]."""

    expert_ids: torch.Tensor  # long
    weights: torch.Tensor  # renormalised top-k weights (sum to 1 over k)
    router_probs: torch.Tensor  # softmax over all experts (with gradient)
    gates: torch.Tensor  # dense gates [B,E] or [B,T,E]: weights scattered into expert slots


class Hippocampus(nn.Module):
    def __init__(self, hidden_size: int, cfg: ExpertsConfig):
        super().__init__()
        E, H, eh = cfg.num_experts, hidden_size, cfg.expert_hidden
        self.cfg = cfg
        self.num_experts, self.top_k = E, cfg.top_k
        self.router = nn.Linear(H, E)
        bound = 1.0 / math.sqrt(H)
        self.w_in = nn.Parameter(torch.empty(E, H, eh).uniform_(-bound, bound))
        self.b_in = nn.Parameter(torch.zeros(E, eh))
        self.w_out = nn.Parameter(torch.zeros(E, eh, H))  # zero: delta = 0 at step 0
        self.b_out = nn.Parameter(torch.zeros(E, H))
        for name in _EXPERT_PARAMS:
            self.register_buffer(f"{name}_init", getattr(self, name).detach().clone())
        self.register_buffer("router_weight_init", self.router.weight.detach().clone())
        self.register_buffer("router_bias_init", self.router.bias.detach().clone())
        self.register_buffer("usage", torch.full((E,), 1.0 / E))  # EMA share of routing mass, sums to 1
        self.register_buffer("activation_counts", torch.zeros(E))  # cumulative selections (reported only)
        self.register_buffer("expert_drift", torch.zeros(E))  # ||theta_e - theta_e^0||, see update_drift()

    # ---- routing -------------------------------------------------------------------------------------
    def capacity_scores(self) -> torch.Tensor:
        """[E] in [0,1]: half load (usage vs. twice the fair share), half drift from the initial weights."""
        load = (self.usage * self.num_experts / 2.0).clamp(max=1.0)
        drift_score = 1.0 - torch.exp(-self.expert_drift / self.cfg.drift_scale)
        return 0.5 * (load + drift_score)

    @torch.no_grad()
    def update_drift(self) -> None:
        """Recompute the [E] L2 distance of each expert from its initial weights (after each update)."""
        sq = sum(
            (getattr(self, n) - getattr(self, f"{n}_init")).pow(2).flatten(1).sum(1) for n in _EXPERT_PARAMS
        )
        self.expert_drift.copy_(sq.sqrt())

    def saturation_ratio(self) -> torch.Tensor:
        return (self.capacity_scores() > self.cfg.saturation_threshold).float().mean()

    def route(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> Routing:
        if self.cfg.routing == "sequence":
            if attention_mask is None:
                pooled = h.mean(dim=1)  # (B, H)
            else:
                m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H), padding excluded
            scores = self.router(pooled)  # (B, E)
        else:
            scores = self.router(h)  # (B, T, E)
        with torch.no_grad():
            bonus = self.cfg.utilization_bonus * (1.0 - (self.usage * self.num_experts).clamp(max=1.0))
            adjust = bonus - self.cfg.capacity_penalty * self.capacity_scores()  # (E,)
        probs = torch.softmax(scores.float() + adjust, dim=-1)  # (..., E)
        top_w, top_i = probs.topk(self.top_k, dim=-1)  # (..., k)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)  # (..., E)
        return Routing(expert_ids=top_i, weights=top_w, router_probs=probs, gates=gates)

    # ---- experts -------------------------------------------------------------------------------------
    def mix(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """h [B,T,H], gates [B,E] or [B,T,E] -> delta [B,T,H] = sum_e gate_e * expert_e(h)."""
        B, T, H = h.shape
        if gates.dim() == 2:
            gates = gates.unsqueeze(1).expand(B, T, -1)  # (B, T, E)
        gates = gates.to(h.dtype)
        z = torch.einsum("bth,ehf->btef", h, self.w_in.to(h.dtype)) + self.b_in.to(h.dtype)  # (B, T, E, eh)
        z = F.gelu(z) * gates.unsqueeze(-1)  # unselected experts contribute (and learn) nothing
        delta = torch.einsum("btef,efh->bth", z, self.w_out.to(h.dtype))  # (B, T, H)
        return delta + gates @ self.b_out.to(h.dtype)  # (B, T, H)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None,
                track_stats: bool = False) -> tuple[torch.Tensor, Routing]:
        routing = self.route(h, attention_mask)
        if track_stats:
            self._track(routing, attention_mask)
        return self.mix(h, routing.gates), routing

    def apply_selected(self, h: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor | float = 1.0
                       ) -> torch.Tensor:
        """Forced mixing: h [B,T,H], expert_ids [B,k] (long), weights [B,k] or a scalar -> delta [B,T,H]."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=h.device).expand(expert_ids.shape)
        gates = torch.zeros(expert_ids.shape[0], self.num_experts, device=h.device).scatter_add(1, expert_ids, w)
        return self.mix(h, gates)

    @torch.no_grad()
    def _track(self, routing: Routing, attention_mask: torch.Tensor | None) -> None:
        gates = routing.gates.detach().float()
        if gates.dim() == 3:  # per token: average over real tokens
            if attention_mask is not None:
                m = attention_mask.float().unsqueeze(-1)
                gates = (gates * m).sum(1) / m.sum(1).clamp(min=1.0)
            else:
                gates = gates.mean(1)
        share = gates.mean(0)  # (E,), sums to 1
        d = self.cfg.usage_decay
        # A non-finite forward (NaN/Inf in the hidden state) is no experience: it leaves the statistics as they
        # were (a NaN usage would stay in the EMA and the router's adjustment for good). Masked, no host sync.
        finite = torch.isfinite(share).all()
        self.usage.copy_(torch.where(finite, self.usage.mul(d).add(share, alpha=1.0 - d), self.usage))
        self.activation_counts.add_((gates > 0).float().sum(0) * finite)

    def routing_regulariser(self, routing: Routing, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Switch-Transformer load-balancing loss E * sum_e f_e * P_e (1 when perfectly balanced)."""
        probs = routing.router_probs
        selected = (routing.gates > 0).float()
        per_token = probs.dim() == 3
        if per_token:
            probs, selected = probs.flatten(0, 1), selected.flatten(0, 1)  # (B*T, E)
        keep = torch.ones(probs.shape[0], 1, device=probs.device)  # (N, 1) the positions that count
        if per_token and attention_mask is not None:  # real tokens only
            keep = attention_mask.flatten().to(probs.dtype).unsqueeze(1)  # (a weighted mean: no host sync)
        n = keep.sum().clamp(min=1.0)
        f = (selected * keep).sum(0) / n / self.top_k  # (E,) fraction of selections, no gradient
        p = (probs * keep).sum(0) / n  # (E,) mean router probability, with gradient
        return self.num_experts * (f * p).sum()

    def utilization_entropy(self) -> torch.Tensor:
        p = self.usage / self.usage.sum().clamp(min=1e-12)
        return -(p * (p + 1e-12).log()).sum()

    # ---- refresh -------------------------------------------------------------------------------------
    @torch.no_grad()
    def partial_reset_expert(self, experts: torch.Tensor | list[int] | int, factor: float,
                             optimizer: torch.optim.Optimizer | None = None) -> None:
        """theta_e <- theta_e^0 + factor * (theta_e - theta_e^0) for the given experts (router row and bias
        too). Their Adam first moments are zeroed so the optimizer does not push them straight back; the second
        moments are kept: the step count (bias correction) is per tensor, not per expert, so zeroed second
        moments would make the reset experts' next ~40 steps 1.6-3.4x larger than the learning rate (a
        freshly reset expert then overshoots and the deployed system can fall far below its base)."""
        idx = torch.as_tensor(experts, dtype=torch.long, device=self.w_in.device).reshape(-1)
        if idx.numel() == 0:
            return
        pairs = [(getattr(self, n), getattr(self, f"{n}_init")) for n in _EXPERT_PARAMS]
        pairs += [(self.router.weight, self.router_weight_init), (self.router.bias, self.router_bias_init)]
        for param, init in pairs:
            param[idx] = init[idx] + factor * (param[idx] - init[idx])
            if optimizer is not None and "exp_avg" in optimizer.state.get(param, {}):
                optimizer.state[param]["exp_avg"][idx] = 0.0
        self.update_drift()
        self.usage[idx] = self.usage[idx] * factor + (1.0 - factor) / self.num_experts
        self.usage.div_(self.usage.sum())
