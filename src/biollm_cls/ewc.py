"""Online elastic weight consolidation for the neocortex.

EWC (Kirkpatrick et al., 2017, PNAS 114(13)) protects weights that mattered for earlier data with a
quadratic penalty ``(lambda/2) * sum_i F_i (theta_i - theta*_i)^2``. The *online* variant (Schwarz et al.,
2018, "Progress & Compress", ICML) keeps one running Fisher and one anchor instead of one per task:
after each consolidation, ``F <- gamma * F + F_new`` and ``theta* <- theta`` (the consolidated weights).

Estimator: ``F_new`` is the diagonal of the Fisher information at the consolidated weights, estimated on
``fisher_samples`` sequences (replay episodes, plus pseudo inputs when ``fisher_use_capability_mix``) as the
mean over sequences of the squared gradient of ``-sum_t log p(y_t | x)``, with ``y_t`` *sampled from the
model's own predictive distribution* at each supervised position (the true Fisher, one Monte-Carlo sample
per position; not the squared minibatch-mean gradient). Sequences are processed one at a time, so the
estimate does not depend on the batch size.

The penalty gradient ``lambda * F * (theta - theta*)`` is added to ``.grad`` in place after the one backward
of each base update (no second backward, no autograd graph through the penalty), and after the fp16
GradScaler's unscale (``Learner.step_optimizer(add_grad=...)``): the loss's gradients are then at their true
scale, so the penalty is not divided by the loss scale. With ``lambda = 0`` nothing
is estimated, stored or applied.

Storage (``ewc.fisher_dtype``, ``ewc.anchor_dtype``): fp32, or bf16 to save memory on a large base. A bf16
Fisher is the Fisher rounded (0.4 % relative). An fp8 Fisher (a quarter of fp32) keeps each weight matrix as
float8 e4m3 codes times one fp32 scale per row (the row's largest value maps to 448, e4m3's largest): every
value is rounded to at most 6.25 % relative (3 mantissa bits), and values below ~2^-18 of their row's largest
(below the smallest e4m3 subnormal) become 0, i.e. the weights the Fisher says matter least lose their (tiny)
protection. Both errors are far below the Monte-Carlo noise of an estimate from a few dozen sequences (one
sample per position: a relative standard error of tens of percent per element). Vectors (norms, biases) stay
bf16: they are a negligible share of the bytes. A bf16 anchor is exact: at each consolidation the weights of
the ``nn.Linear`` layers are first rounded to bf16 (``theta <- bf16(theta)``, at most 2^-9 relative) and the
anchor is those rounded weights, so the penalty is 0 at the anchor as with fp32. Under bf16 autocast this
changes no output: a matmul casts its fp32 weight to bf16 anyway, to the same rounded value. Embedding
tables, norms and other parameters keep an fp32 anchor (their ops are not autocast to bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from biollm_cls.benchmarks.base import Batch

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)  # storage of the multi-tensor penalty pass


class _LabelSampler:
    """Draws the Fisher's labels ``y ~ p(y | x)``. On the CPU from the run's generator, as always. On CUDA on
    the device, from a CUDA generator seeded once from the run's generator (still reproducible for a config
    and seed): copying [n, V] probabilities to the host and sampling there cost ~0.1 s per sequence at
    T=256, V=16k, more than the sequence's backward."""

    def __init__(self, generator: torch.Generator, device: torch.device):
        self.generator = generator
        if device.type == "cuda":
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logp: torch.Tensor) -> torch.Tensor:
        if self.generator.device.type == logp.device.type:
            return torch.multinomial(logp.exp(), 1, generator=self.generator)  # (n, 1)
        return torch.multinomial(logp.exp().cpu(), 1, generator=self.generator).to(logp.device)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
_FP8_MAX = 448.0  # the largest finite float8 e4m3fn value: each row's largest Fisher value is scaled to it


def _as_fp32(tensors: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` in fp32 (the same values: bf16 -> fp32 is exact), shaped like the fp32 list `like`.

    Perf: a ``torch._foreach_*`` op over lists of two dtypes (fp32 weights, bf16 Fisher) leaves CUDA's fused
    multi-tensor path for one kernel per tensor (~290 launches per op at the Qwen-0.5B shape); a multi-tensor
    copy converts dtypes on the fused path, but only from a source list of *one* dtype (a list mixing fp32
    embedding/norm anchors with bf16 linear anchors went to the per-tensor path too, 290 copies per step). So
    only the non-fp32 tensors are converted, one multi-tensor copy per source dtype; fp32 ones pass as they are."""
    out = list(tensors)
    for dtype in sorted({t.dtype for t in tensors} - {torch.float32}, key=str):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        scratch = _fp32_like([like[i] for i in idx])
        torch._foreach_copy_(scratch, [tensors[i] for i in idx])
        for i, t in zip(idx, scratch, strict=True):
            out[i] = t
    return out


def _fp32_like(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised fp32 tensors shaped like `like`: views of one allocation (no kernel, one allocator call)."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=torch.float32, device=like[0].device)
    return [v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


class OnlineEWC:
    def __init__(self, lambda_: float, decay: float, fisher_dtype: torch.dtype = torch.float32,
                 anchor_dtype: torch.dtype = torch.float32):
        self.lambda_ = lambda_
        self.decay = decay
        self.fisher_dtype = fisher_dtype  # bf16 halves the Fisher's memory (0.4 %); fp8 quarters it (6.25 %)
        self.anchor_dtype = anchor_dtype  # bf16: the linear layers' anchors, exact (the module docstring)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        # Row-sparse storage: for a large matrix whose Fisher is zero on most rows (embedding rows of tokens
        # never seen, LM-head rows outside the active vocabulary) only the non-zero rows are kept, with their
        # indices here. Exact: a zero-Fisher row adds nothing to the penalty.
        self.rows: dict[str, torch.Tensor] = {}
        # fp8 storage: the fp32 scale of each stored row ([rows, 1]); the Fisher is fisher.float() * scale
        self.scale: dict[str, torch.Tensor] = {}
        self.updates = 0
        self.revision = 0  # bumped whenever the stored tensors are replaced (a captured step reads them)

    @classmethod
    def from_config(cls, cfg) -> OnlineEWC:
        """From the run config's `ewc` section (EWCConfig)."""
        return cls(cfg.lambda_, cfg.fisher_decay, _DTYPES[cfg.fisher_dtype], _DTYPES[cfg.anchor_dtype])

    @property
    def active(self) -> bool:
        return self.lambda_ > 0 and bool(self.fisher)

    @staticmethod
    def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def penalty(self, model: nn.Module) -> torch.Tensor:
        """(lambda/2) * sum F (theta - theta*)^2, for logging."""
        total = torch.zeros((), device=next(model.parameters()).device)
        if not self.active:
            return total
        for name, p in self._params(model):
            theta = p.detach().float()
            if name in self.rows:
                theta = theta[self.rows[name]]
            total += (self._stored_fisher(name) * (theta - self.anchor[name]).pow(2)).sum()
        return 0.5 * self.lambda_ * total

    # Perf: elements per fused penalty pass. The penalty runs as a few multi-tensor (``torch._foreach_*``)
    # kernels over groups of parameters of at most this many elements (a larger weight is split into flat
    # views), instead of ~4 kernel launches per parameter; the two fp32 temporaries stay <= 64 MB each.
    _CHUNK = 1 << 24

    @torch.no_grad()
    def add_penalty_grad(self, model: nn.Module) -> None:
        """grad += lambda * F * (theta - theta*), after the backward (and the fp16 unscale) of a base update."""
        if not self.active:
            return
        group: list[tuple[torch.Tensor, ...]] = []
        size = 0
        for name, p in self._params(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            fisher, anchor = self.fisher[name], self.anchor[name]
            if name in self.rows:  # row-sparse: grad[rows] += lambda * F_rows * (theta[rows] - theta*_rows)
                idx = self.rows[name]
                step = (p.detach()[idx].float() - anchor) * self.lambda_ * self._stored_fisher(name)
                p.grad.index_add_(0, idx, step.to(p.grad.dtype))
                continue
            if not (p.dtype == p.grad.dtype == torch.float32
                    and anchor.dtype in _FAST_DTYPES and fisher.dtype in _FAST_DTYPES):
                diff = p.detach().float() - anchor  # the general path (half-precision base, ...)
                p.grad.add_((diff * self.lambda_ * self._stored_fisher(name)).to(p.grad.dtype))
                continue
            parts = (p.grad, p, fisher, anchor, self.scale.get(name))
            pieces = [parts]
            if p.numel() > self._CHUNK and all(t.is_contiguous() for t in parts if t is not None):
                rows = max(1, self._CHUNK // max(1, p[0].numel()))  # whole rows: a row's scale stays with it
                pieces = list(zip(*(t.split(rows) if t is not None else [None] * -(-len(p) // rows)
                                    for t in parts), strict=True))
            for piece in pieces:
                group.append(piece)
                size += piece[0].numel()
                if size >= self._CHUNK:
                    self._penalty_pass(group)
                    group, size = [], 0
        if group:
            self._penalty_pass(group)

    def _penalty_pass(self, group: list[tuple[torch.Tensor, ...]]) -> None:
        """g += lambda * F * (theta - theta*), in fp32 whatever the Fisher's storage dtype."""
        grads, thetas, fishers, anchors, scales = (list(t) for t in zip(*group, strict=True))
        diff = torch._foreach_sub(thetas, _as_fp32(anchors, thetas))  # fp32
        fishers = _as_fp32(fishers, thetas)
        scaled = [i for i, s in enumerate(scales) if s is not None]
        if scaled:  # fp8 codes -> values: a [rows, 1] scale broadcast per tensor (one kernel each)
            torch._foreach_mul_([fishers[i] for i in scaled], [scales[i] for i in scaled])
        # Perf: one fused multiply-add (g += lambda * diff * F) instead of three passes over the group.
        torch._foreach_addcmul_(grads, diff, fishers, value=self.lambda_)

    def consolidate(self, model: nn.Module, batches: Iterable[Batch],
                    hidden_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    logits_fn: Callable[[torch.Tensor], torch.Tensor], autocast, generator: torch.Generator
                    ) -> int:
        """Estimate F_new at the current weights, fold it into F, move the anchor. Returns #sequences used."""
        if self.lambda_ <= 0:
            return 0
        params = self._params(model)
        new = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
        count = 0
        was_training = model.training
        model.eval()  # the Fisher of the deployed (deterministic) base
        sampler = _LabelSampler(generator, next(model.parameters()).device)
        for batch in batches:
            has_tokens = batch.supervised.any(1).tolist()  # one host sync per batch, not per sequence
            for b in range(len(batch)):
                sup = batch.supervised[b : b + 1]  # (1, T)
                if not has_tokens[b]:
                    continue
                model.zero_grad(set_to_none=True)
                with autocast():
                    h = hidden_fn(batch.input_ids[b : b + 1], batch.attention_mask[b : b + 1])  # (1, T, H)
                    logp = torch.log_softmax(logits_fn(h[sup]).float(), dim=-1)  # (n, V)
                y = sampler(logp.detach())  # (n, 1) labels drawn from the model's own distribution
                (-logp.gather(1, y).sum()).backward()
                # Perf: new += g * g in one multi-tensor kernel per dtype (same values as += g.pow(2)).
                pairs = [(new[n], p.grad.detach().float()) for n, p in params if p.grad is not None]
                if pairs:
                    acc, grads = (list(t) for t in zip(*pairs, strict=True))
                    torch._foreach_addcmul_(acc, grads, grads)
                count += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if count == 0:
            return 0
        rounded = self._bf16_anchored(model) if self.anchor_dtype == torch.bfloat16 else set()
        for n, p in params:
            f = new.pop(n) / count
            if n in self.fisher:
                f += self.decay * self._dense_fisher(n, p)
            if n in rounded:
                p.data.copy_(p.data.to(torch.bfloat16))  # the anchor below is then exact in bf16
            self._store(n, p, f, torch.bfloat16 if n in rounded else torch.float32)
        self.updates += 1
        self.revision += 1
        return count

    _SPARSE_MIN = 1 << 20  # matrices at least this large may be stored row-sparse

    def _stored_fisher(self, name: str) -> torch.Tensor:
        """The stored Fisher of `name` in fp32 (its stored rows only, when row-sparse)."""
        fisher = self.fisher[name].float()
        return fisher * self.scale[name] if name in self.scale else fisher

    def _dense_fisher(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name not in self.rows:
            return self._stored_fisher(name)
        dense = torch.zeros_like(p, dtype=torch.float32)
        dense[self.rows[name]] = self._stored_fisher(name)
        return dense

    def _keep_fisher(self, name: str, fisher: torch.Tensor) -> None:
        """Store `fisher` (fp32) in `fisher_dtype`; fp8 as e4m3 codes times a per-row fp32 scale (matrices only)."""
        self.scale.pop(name, None)
        if self.fisher_dtype != torch.float8_e4m3fn:
            self.fisher[name] = fisher.to(self.fisher_dtype)
        elif fisher.dim() != 2:
            self.fisher[name] = fisher.to(torch.bfloat16)
        else:
            peak = fisher.amax(1, keepdim=True)  # (rows, 1); a Fisher is >= 0
            scale = torch.where(peak > 0, peak / _FP8_MAX, torch.ones_like(peak))
            self.fisher[name] = (fisher / scale).to(torch.float8_e4m3fn)
            self.scale[name] = scale

    @staticmethod
    def _bf16_anchored(model: nn.Module) -> set[str]:
        """Names of the parameters whose anchor may be bf16: weights and biases of ``nn.Linear`` layers (their
        matmuls are autocast to bf16), not a table an ``nn.Embedding`` also reads (a tied LM head)."""
        linear = {id(t) for m in model.modules() if isinstance(m, nn.Linear) for t in (m.weight, m.bias)
                  if t is not None}
        linear -= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        return {n for n, p in model.named_parameters() if id(p) in linear}

    def _store(self, name: str, p: torch.Tensor, fisher: torch.Tensor, anchor_dtype: torch.dtype) -> None:
        """Keep the Fisher and the anchor, row-sparse when at most half of a large matrix's rows are non-zero."""
        self.rows.pop(name, None)
        if p.dim() == 2 and p.numel() >= self._SPARSE_MIN:
            nonzero = fisher.ne(0).any(1)
            if int(nonzero.sum()) <= p.shape[0] // 2:
                idx = nonzero.nonzero().squeeze(1)
                self.rows[name] = idx
                self._keep_fisher(name, fisher[idx].contiguous())
                self.anchor[name] = p.detach()[idx].to(anchor_dtype).contiguous()
                return
        self._keep_fisher(name, fisher)
        self.anchor[name] = p.detach().to(anchor_dtype, copy=True)

    def state_dict(self) -> dict:
        return {"lambda_": self.lambda_, "decay": self.decay, "fisher": self.fisher, "anchor": self.anchor,
                "rows": self.rows, "scale": self.scale, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchor, self.updates = state["fisher"], state["anchor"], state["updates"]
        self.rows = state.get("rows", {})
        self.scale = state.get("scale", {})
        self.revision += 1
