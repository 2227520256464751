"""GPU benchmark of the CLS learner against plain fine-tuning, in one process (a script, not a test).

What it times (median of ``--steps`` CUDA-synchronised steps after ``--warmup`` steps, per shape B x T):

* ``plain_ft_strong`` the strongest plain fine-tuning step this script can build from the library's parts, and
                    the unit every ratio is taken against: zero_grad; ``neocortex.hidden`` with no attention
                    mask (pure causal: SDPA takes its flash kernel; the batches have no padding) +
                    ``neocortex.logits`` (the first ``--vocab`` head rows only) + CE on all positions, under
                    ``torch.compile`` on CUDA (``--no-compile``: eager); backward; ``torch.optim.AdamW`` built
                    ``fused=True`` on CUDA (``foreach=True`` on the CPU) over ``learner.base_parameters()`` with
                    the base optimizer's hyper-parameters; deterministic algorithms off during the step (a plain
                    fine-tuning recipe does not turn them on); no ``.item()``, no clipping. Every base weight is
                    updated.
* ``plain_ft``      the old denominator, kept for continuity: the same step eager, with the attention mask, through
                    ``learner.base_optimizer`` (the learner's own AdamW), deterministic algorithms as the trainer
                    sets them.
* ``base_forward``  the base forward alone (no grad, eval mode), for reference.
* ``wake``          ``wake_step`` as the trainer calls it (hippocampus on, keep_teacher=True); its batches fill
                    the replay (``episodes_from_batch``, outside the timed region).
* ``sleep``         ``build_sleep_batch`` + ``sleep_step``, replay batch = B, EWC active (one
                    ``OnlineEWC.consolidate`` first), pseudo-rehearsal off.
* ``sleep_pseudo``  the same with pseudo-rehearsal on (the default mixed source and ratio).
* ``refresh``       ``refresh_experts`` over the replay filled by the wake steps (all experts with episodes).
* ``refresh_full``  the same after re-labelling the replay so that every expert owns >= samples_per_expert
                    episodes (the design point: E x samples_per_expert rows).

Interleaving: each timed step of a phase is preceded by one ``plain_ft`` and one ``plain_ft_strong`` step, timed
too, and the phase's ratios are its median over the medians of *those* steps (the host's speed drifts).

Peak GPU memory (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) is taken over 2 steps of
each phase alone and includes everything the process holds at that point (weights, optimizer moments, EWC
state, ...) except the moments of the other plain fine-tuning optimizer, which only the benchmark holds: the
strong step's fused AdamW state is subtracted from every other phase's peak, the learner's base optimizer state
from the strong step's (exact: those bytes stay allocated, unchanged, over the window). Bytes per replay
episode come from ``ReservoirReplay.bytes_per_episode()``.

Throughput: tokens/s = positions of the step's batch (B x T, or rows x T) / median step time. MFU(6N) =
k * N * tokens/s / PEAK_FLOPS_H200_BF16 with k = 6 for a training step (plain FT, wake, sleep) and k = 2 per
forward pass for forward-only phases (base forward; refresh: 1 + the upper layers' share of a pass when
the system pass resumes at the injection point, else 2), N = the base parameters whose
matmuls run in the forward (all of them, trainable or frozen, except the embedding table; the head counted as
its first ``--vocab`` rows). Attention's own FLOPs are not counted (the usual 6N convention).

The model is a Qwen2.5-0.5B-shaped Qwen2 (24 layers, hidden 896, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151,936, tied embeddings: 494 M parameters, N = 373 M at vocab 16,384), random-init, saved to a
directory and loaded through ``build_neocortex`` with ``model.vocab_size=16384`` (fp32 master weights, bf16
autocast).

Usage (GPU machine)::

    PYTHONPATH=src python3 bench/bench_cls.py --label final --json-out out.json
    python3 bench/bench_cls.py --report a.json b.json ... --md bench/RESULTS.md   # no GPU needed

``--tiny`` runs a small model on the CPU (a smoke test of the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

# bf16 dense matmul rate of the lent H200 as measured here (/work/.library/device/KINDS.md: an 8192^3 bf16
# product through PyTorch ran at 788 TFLOP/s on random data, 769-798 on another machine); the datasheet says
# about 990. The H100 SXM of the earlier runs has the same tensor-core rate. --peak-flops overrides it.
PEAK_FLOPS_H200_BF16 = 790e12
GB = 1e9

# The reference's figures (BENCHMARKS.md), per shape.
REFERENCE = {
    "4x256": {"plain_ft_s": 0.109, "wake_ratio": 1.31, "sleep_ratio": 2.98, "sleep_pseudo_ratio": 3.73,
              "refresh_s": 1.13, "plain_peak_gb": 5.05, "sleep_peak_gb": 10.90, "mem_ratio": 2.16,
              "bytes_per_episode": 8.39e6},
    "8x512": {"plain_ft_s": 0.127, "wake_ratio": 3.10, "sleep_ratio": 2.62, "sleep_pseudo_ratio": 3.32,
              "refresh_s": 0.95, "plain_peak_gb": 10.70, "sleep_peak_gb": 14.58, "mem_ratio": 1.36,
              "bytes_per_episode": 16.79e6},
}
# Issue 12's targets; every ratio is against the strongest plain FT step. sleep_mfu is checked at 16x1024 only.
TARGETS = {"wake_ratio": 0.6, "sleep_ratio": 1.2, "sleep_pseudo_ratio": 1.4, "mem_ratio": 1.2,
           "bytes_per_episode": 84e3, "refresh_ratio": 2.0, "sleep_mfu": 0.40}
MFU_TARGET_SHAPE = "16x1024"

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)


# ---- set-up -------------------------------------------------------------------------------------------
def save_model(model_dir: Path, tiny: bool, device: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    if (model_dir / "config.json").exists():
        return
    torch.manual_seed(0)
    config = Qwen2Config(**(TINY if tiny else QWEN_05B))
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(model_dir)
    del model


def make_config(model_dir: Path, B: int, T: int, vocab: int, device: str, extra: list[str]):
    from biollm_cls.config import load_config

    return load_config([
        "model=hf_causal_lm", f"model.hf_model_name={model_dir}", "model.hf_local_files_only=true",
        f"model.vocab_size={vocab}", f"model.seq_len={T}", f"train.batch_size={B}", f"replay.batch_size={B}",
        f"device={device}", "train.progress=false", *extra,
    ])


def random_batches(n: int, B: int, T: int, vocab: int, device, seed: int):
    """n batches of uniform random tokens, every position supervised (next token), no padding."""
    import torch

    from biollm_cls.benchmarks.base import Batch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), torch.ones(B, T, dtype=torch.bool),
                         torch.zeros(B, dtype=torch.long)).to(device))
    return out


class Timer:
    """Median wall time of CUDA-synchronised calls, and the peak memory over a few calls of the phase alone."""

    def __init__(self, device, warmup: int, steps: int, profile_dir=None, label="", shape="", profile_phases=None):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.profile_dir, self.label, self.shape = profile_dir, label, shape
        self.profile_phases = profile_phases  # None: every phase
        self.kernels: dict[str, int] = {}
        # plain FT steps interleaved with the timed steps (name -> step), each timed before every phase step
        self.pairs: dict = {}
        self.mem_steps = 2
        self.reset = None  # called before the memory steps
        self.exclude = None  # default exclude_bytes of run()

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, i: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn(i)
        self.sync()
        return time.perf_counter() - t0

    def profile(self, fn, name: str) -> None:
        """One extra profiled step, outside the timed ones: a torch.profiler table, the same by operator and
        input shapes (which tensor a copy or an elementwise kernel moves), and the kernel count."""
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts, record_shapes=True) as prof:
            fn(self.warmup)
            self.sync()
        events = prof.key_averages()
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if cuda else 0
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = events.table(sort_by=sort, row_limit=40)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total" if cuda else sort,
                                                                      row_limit=60, max_name_column_width=40,
                                                                      max_shapes_column_width=100)
        Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(self.profile_dir, f"prof_{self.label}.txt"), "a") as fh:
            fh.write(f"\n##### {self.shape} {name}: {kernels} CUDA kernel/memcpy events\n{table}\n"
                     f"\n##### {self.shape} {name}, by operator and input shapes\n{by_shape}\n")
        self.kernels[name] = kernels

    def run(self, fn, name: str = "", exclude_bytes=None) -> dict:
        """Warm-up, profile (optional), peak memory, then the timed steps interleaved with ``self.pairs``.

        exclude_bytes: a callable giving bytes that stay allocated over the memory steps but that the phase does
        not own (another optimizer's moments); they are subtracted from the peak.
        """
        import torch

        for i in range(self.warmup):
            fn(i)
        self.sync()
        if self.profile_dir is not None and name and (self.profile_phases is None or name in self.profile_phases):
            self.profile(fn, name)
        out: dict = {}
        if self.device.type == "cuda":  # peak memory over a few steps of this phase alone
            if self.reset is not None:
                self.reset()  # drop the base gradients an interleaved plain FT step left behind
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for i in range(self.mem_steps):
                fn(self.warmup + i)
            self.sync()
            exclude_bytes = exclude_bytes or self.exclude
            excluded = exclude_bytes() if exclude_bytes is not None else 0
            peak = torch.cuda.max_memory_allocated()
            # A replayed CUDA graph allocates nothing: its activations and gradients live in the graphs' private
            # pool, which stays reserved. So the phase's peak is the allocated peak outside that pool plus the
            # whole pool (reserved, used by every replay).
            pool_reserved, pool_allocated = graph_pool_bytes()
            peak += pool_reserved - pool_allocated
            out.update(peak_gb=(peak - excluded) / GB, peak_raw_gb=peak / GB, excluded_gb=excluded / GB,
                       resident_before_gb=(base - excluded) / GB, graph_pool_gb=pool_reserved / GB)
        times: list[float] = []
        paired: dict[str, list[float]] = {k: [] for k in self.pairs}
        for i in range(self.steps):
            for k, pair in self.pairs.items():  # plain FT steps right before each step: drift hits all alike
                paired[k].append(self.timed(pair, i))
            times.append(self.timed(fn, self.warmup + self.mem_steps + i))
        out.update(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
                   max_s=max(times), n=len(times))
        if paired:
            out["paired_median_s"] = {k: statistics.median(v) for k, v in paired.items()}
            if "plain_ft" in paired:  # the key the reports of earlier runs read
                out["paired_plain_median_s"] = out["paired_median_s"]["plain_ft"]
        return out


def graph_pool_bytes() -> tuple[int, int]:
    """(reserved, allocated) bytes of the CUDA graphs' private memory pools (0, 0 without graphs)."""
    import torch

    segments = [seg for seg in torch.cuda.memory._snapshot()["segments"]
                if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(seg["total_size"] for seg in segments), sum(seg["allocated_size"] for seg in segments)


def watch_graph_memory(graphs) -> list[dict]:
    """Per warm-up step and per capture of `graphs` (a learner's StepGraphs): the bytes it allocated at its peak
    above what was allocated before it, and the graphs' pool afterwards: a captured step should need what its
    eager warm-up step needed. Instrumentation of the bench only (it resets the peak statistics, which the
    phases' own memory measurement resets again before it starts)."""
    import torch

    log: list[dict] = []

    def watched(kind: str, fn):
        def call(step, inputs, *rest):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn(step, inputs, *rest)
            torch.cuda.synchronize()
            reserved, allocated = graph_pool_bytes()
            log.append({"kind": kind, "inputs": {k: list(t.shape) for k, t in inputs.items()},
                        "peak_above_before_gb": (torch.cuda.max_memory_allocated() - before) / GB,
                        "kept_gb": (torch.cuda.memory_allocated() - before) / GB,
                        "pool_reserved_gb": reserved / GB, "pool_allocated_gb": allocated / GB})
            return out
        return call

    graphs._on_stream = watched("eager", graphs._on_stream)
    graphs._capture = watched("capture", graphs._capture)
    return log


def optimizer_state_bytes(opt) -> int:
    """Bytes of an optimizer's state tensors on the GPU (AdamW: the two moments, and the fused step counts)."""
    import torch

    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.is_cuda)


def forward_params(neo, vocab: int) -> int:
    """N of MFU(6N): the base parameters whose matmuls run in the forward (the embedding table is a lookup and is
    left out; the LM head counts as its first `vocab` rows, as the capped logits use it). Frozen ones included."""
    emb = neo.model.get_input_embeddings().weight
    head = neo.model.get_output_embeddings()
    skip = {id(emb), id(head.weight)}
    n = sum(p.numel() for p in neo.parameters() if id(p) not in skip)
    return n + vocab * head.weight.shape[1] + (vocab if getattr(head, "bias", None) is not None else 0)


def strong_ft_step(learner, cfg, batches, compile_: bool, compile_mode: str | None):
    """The strongest plain fine-tuning step built from the library's parts (see the module docstring).

    Returns (step(i), its fused/foreach AdamW, facts for the JSON). Shares the base's weights with the learner.
    """
    import torch
    import torch.nn.functional as F

    neo = learner.neocortex
    params = learner.base_parameters()
    d = learner.base_optimizer.defaults
    kind = {"fused": True} if learner.device.type == "cuda" else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=cfg.consolidation.slow_lr, betas=d["betas"], eps=d["eps"],
                            weight_decay=d["weight_decay"], **kind)
    ac = learner.precision.autocast

    def loss_fn(input_ids, targets):
        h = neo.hidden(input_ids, None)  # (B, T, H), no mask: pure causal attention
        logits = neo.logits(h)  # (B, T, V), the first V head rows
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    forward = [torch.compile(loss_fn, dynamic=False, mode=compile_mode) if compile_ else loss_fn]
    compiled_ok = [False]

    def one_step(b):
        opt.zero_grad(set_to_none=True)
        neo.train()
        with ac():
            loss = forward[0](b.input_ids, b.targets)  # () fp32
        loss.backward()
        opt.step()

    def step(i):
        b = batches[i % len(batches)]
        det, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(False)
        try:
            one_step(b)
            compiled_ok[0] = True
        except Exception as e:  # a compiler failure in the first (warm-up) step: say so, go on eager
            if forward[0] is loss_fn or compiled_ok[0]:
                raise
            facts.update(compile=False, compile_error=f"{type(e).__name__}: {e}"[:2000])
            print(f"WARNING: torch.compile of the strongest plain FT step failed, timing it eager: "
                  f"{facts['compile_error'][:300]}", file=sys.stderr, flush=True)
            forward[0] = loss_fn
            one_step(b)
        finally:
            torch.use_deterministic_algorithms(det, warn_only=warn)

    facts = {"optimizer": kind, "compile": compile_, "compile_mode": compile_mode, "params": len(params),
             "trainable_numel": sum(p.numel() for p in params), "attention_mask": None,
             "attn_implementation": getattr(neo.model.config, "_attn_implementation", None),
             "deterministic": False}
    return step, opt, facts


def compile_count() -> int:
    """Graphs torch.compile has produced so far in this process (to see recompiles in the timed steps)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return -1
    return int(counters["stats"]["unique_graphs"])


# ---- the measurements ------------------------------------------------------------------------------------
def bench_shape(args, model_dir: Path, B: int, T: int) -> dict:
    import torch
    import torch.nn.functional as F

    import biollm_cls
    from biollm_cls.device import configure_precision, seed_everything
    from biollm_cls.ewc import OnlineEWC
    from biollm_cls.refresh import refresh_experts
    from biollm_cls.replay import ReservoirReplay, collate, episodes_from_batch
    from biollm_cls.sleep import build_sleep_batch, sleep_step
    from biollm_cls.train import build_learner
    from biollm_cls.wake import wake_step

    device = torch.device(args.device)
    cfg = make_config(model_dir, B, T, args.vocab, args.device, args.override)
    import inspect

    seed_args = (cfg.seed, cfg.train.deterministic, device)  # as build_run does
    seed_everything(*seed_args[: len(inspect.signature(seed_everything).parameters)])
    configure_precision(device, cfg.train.allow_tf32, cfg.train.matmul_precision)
    learner = build_learner(cfg, device)
    neo = learner.neocortex
    if args.fused_adamw:  # what-if: the optimizers built fused (a train.py change, not the default)
        learner.base_optimizer = torch.optim.AdamW([p for p in neo.parameters() if p.requires_grad],
                                                   lr=cfg.consolidation.slow_lr, fused=True)
        learner.fast_optimizer = torch.optim.AdamW(learner.hippocampus.parameters(), lr=cfg.experts.fast_lr,
                                                   weight_decay=0.0, fused=True)
    if args.no_mask:
        neo.pass_attention_mask = False
    V = neo.vocab_size
    n_params = sum(p.numel() for p in neo.parameters())
    n_fwd = forward_params(neo, V)
    compile_ = not args.no_compile and (device.type == "cuda" or args.compile_cpu)
    if compile_ and not cfg.train.compile_model:
        # a fresh model per shape: no guards or graphs of the last one. With the library's own regional
        # compilation (train.compile_model) the layer graphs are kept: they take every model's weights as
        # inputs and become shape-dynamic after the first new shape, as in a real run
        torch._dynamo.reset()
    timer = Timer(device, args.warmup, args.steps, args.profile_dir, args.label, f"{B}x{T}",
                  args.profile_phases.split(",") if args.profile_phases else None)
    graph_memory = watch_graph_memory(learner.graphs) if learner.graphs is not None else None
    batches = random_batches(4, B, T, V, device, seed=1)
    res: dict = {"B": B, "T": T, "tokens": B * T, "n_params": n_params, "n_forward_params": n_fwd,
                 "peak_flops": args.peak_flops, "vocab_active": V,
                 "biollm_cls": str(Path(biollm_cls.__file__).parent),
                 "base_optimizer": {k: v for k, v in learner.base_optimizer.defaults.items()
                                    if k in ("fused", "foreach", "weight_decay")},
                 "deterministic": cfg.train.deterministic, "amp": str(learner.precision.dtype),
                 "pass_attention_mask": getattr(neo, "pass_attention_mask", None),
                 "library_compile": cfg.train.compile_model, "can_resume": learner.can_resume,
                 # refresh: a base pass plus a system pass, which resumes at the injection point when it can
                 "refresh_passes": 1 + ((neo.num_layers - neo.injection_layer_idx - 1) / neo.num_layers
                                        if learner.can_resume else 1)}
    ac = learner.precision.autocast

    # -- plain fine-tuning of the base as before (the old unit, kept for continuity)
    opt = learner.base_optimizer
    for group in opt.param_groups:
        group["lr"] = cfg.consolidation.slow_lr

    def plain(i):
        b = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        neo.train()
        with ac():
            logits = neo.logits(neo.hidden(b.input_ids, b.attention_mask))  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), b.targets.flatten())
        loss.backward()
        opt.step()

    res["plain_ft"] = timer.run(plain, "plain")
    # ... plain FT steps leave base gradients that the trainer never has around in wake or refresh
    timer.reset = lambda: opt.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)

    # -- the strongest plain fine-tuning step (the unit every ratio is taken against), interleaved with plain FT;
    # its peak leaves out the learner's base optimizer moments, which plain FT created and it never touches
    strong, strong_opt, facts = strong_ft_step(learner, cfg, batches, compile_, args.compile_mode)
    timer.pairs = {"plain_ft": plain}
    graphs0 = compile_count()
    res["plain_ft_strong"] = timer.run(strong, "plain_strong", exclude_bytes=lambda: optimizer_state_bytes(opt))
    res["plain_ft_strong"].update(facts, graphs_compiled=compile_count() - graphs0,
                                  params_with_grad=sum(p.grad is not None for p in learner.base_parameters()))
    if device.type == "cuda":  # one more step that fails on any host sync (.item(), a D2H copy, nonzero, ...)
        torch.cuda.set_sync_debug_mode("error")
        try:
            strong(0)
            res["plain_ft_strong"]["host_sync_free"] = True
        except RuntimeError as e:
            res["plain_ft_strong"].update(host_sync_free=False, host_sync_error=str(e)[:500])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    graphs1 = compile_count()
    # every later phase alternates its steps with both plain FT steps, and its peak leaves out the strong
    # step's optimizer moments (only the benchmark holds them)
    recompiles = [0]  # graphs compiled *during* the strong step's later calls (the library's own are not counted)

    def strong_counted(i):
        before = compile_count()
        strong(i)
        recompiles[0] += compile_count() - before

    timer.pairs = {"plain_ft": plain, "plain_ft_strong": strong_counted}
    timer.exclude = lambda: optimizer_state_bytes(strong_opt)
    opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward_only(i):
        b = batches[i % len(batches)]
        neo.eval()
        with ac():
            neo.hidden(b.input_ids, b.attention_mask)

    res["base_forward"] = timer.run(forward_only, "forward")

    # -- wake (fills the replay with real episodes)
    replay = ReservoirReplay(cfg.replay.capacity, cfg.seed + 1)
    ewc = OnlineEWC.from_config(cfg.ewc)
    wake_batches = random_batches(max(args.wake_fill, 8), B, T, V, device, seed=2)
    step = [0]

    def wake(i):
        b = wake_batches[i % len(wake_batches)]
        out = wake_step(learner, b, cfg, ewc, stream_rows=B, keep_teacher=True)
        step[0] += 1
        remember.append((b, out, step[0]))

    remember: list = []
    res["wake"] = timer.run(wake, "wake")
    t0 = time.perf_counter()
    for b, out, s in remember:
        for ep in episodes_from_batch(b.to("cpu"), s, out.expert_ids, out.expert_weights, out.row_loss,
                                      out.teacher_values, out.teacher_ids):
            replay.add(ep)
    res["remember_s_per_step"] = (time.perf_counter() - t0) / max(len(remember), 1)
    while len(replay) < args.wake_fill * B:  # more real wake steps until the replay holds wake_fill batches
        b = wake_batches[len(replay) // B % len(wake_batches)]
        out = wake_step(learner, b, cfg, ewc, stream_rows=B, keep_teacher=True)
        for ep in episodes_from_batch(b.to("cpu"), len(replay), out.expert_ids, out.expert_weights, out.row_loss,
                                      out.teacher_values, out.teacher_ids):
            replay.add(ep)
    res["replay_episodes"] = len(replay)
    res["bytes_per_episode"] = replay.bytes_per_episode()

    # -- EWC: one consolidation so the penalty path runs in every sleep step
    generator = torch.Generator().manual_seed(cfg.seed + 17)
    fisher_batch = collate(replay.sample(args.fisher_samples), 0).to(device)
    timer.sync()
    t0 = time.perf_counter()
    ewc.consolidate(neo, [fisher_batch], learner.base_hidden, learner.logits, ac, generator)
    timer.sync()
    res["ewc_consolidate_s"] = time.perf_counter() - t0
    if args.fisher_bf16:  # what-if: a bf16 Fisher (now also `--override ewc.fisher_dtype=bf16`)
        ewc.fisher = {k: v.bfloat16() for k, v in ewc.fisher.items()}
    res["ewc_sparse_rows"] = {k: int(v.numel()) for k, v in ewc.rows.items()}
    res["ewc_state_gb"] = sum(t.numel() * t.element_size() for d in (ewc.fisher, ewc.anchor, ewc.scale) for t in d.values()) / GB
    res["ewc_active"] = ewc.active

    # -- sleep: replay only, then with pseudo-rehearsal
    def sleep(i):
        batch, tv, ti, n_replay, n_pseudo = build_sleep_batch(learner, replay, cfg, 0, V, generator)
        sleep_step(learner, batch, tv, ti, n_replay, cfg, ewc)
        sleep.rows = len(batch)

    cfg.consolidation.pseudo_rehearsal = False
    res["sleep"] = timer.run(sleep, "sleep")
    res["sleep"]["rows"] = sleep.rows
    # With pseudo-rehearsal, sleep_cycle makes the pseudo examples of a whole cycle and their teacher up
    # front (PseudoPool); a step takes its slice. Per-step cost = the step + the pool's cost / cycle length.
    from biollm_cls.sleep import prepare_pseudo_pool

    cfg.consolidation.pseudo_rehearsal = True
    cycle = args.sleep_cycle
    prepare_pseudo_pool(learner, replay, cfg, cycle, 0, V, generator)  # warm-up
    pool_times = []
    for _ in range(3):
        timer.sync()
        t0 = time.perf_counter()
        pool = prepare_pseudo_pool(learner, replay, cfg, cycle, 0, V, generator)
        timer.sync()
        pool_times.append(time.perf_counter() - t0)

    def sleep_pseudo(i):
        k = i % cycle
        batch, tv, ti, n_replay, n_pseudo = build_sleep_batch(learner, replay, cfg, 0, V, generator,
                                                              (pool.batches[k], pool.values[k], pool.ids[k]))
        sleep_step(learner, batch, tv, ti, n_replay, cfg, ewc)
        sleep_pseudo.rows = len(batch)

    res["sleep_pseudo"] = timer.run(sleep_pseudo, "sleep_pseudo")
    res["sleep_pseudo"]["rows"] = sleep_pseudo.rows
    res["sleep_pseudo"]["step_median_s"] = res["sleep_pseudo"]["median_s"]
    res["sleep_pseudo"]["pool_s_per_cycle"] = statistics.median(pool_times)
    res["sleep_pseudo"]["cycle"] = cycle
    res["sleep_pseudo"]["median_s"] += statistics.median(pool_times) / cycle
    learner.base_optimizer.zero_grad(set_to_none=True)

    # -- refresh of all experts
    E, spe = learner.hippocampus.num_experts, cfg.consolidation.refresh.samples_per_expert
    rows = [min(len(x), spe) for x in replay.sample_per_expert(E, spe)]

    def refresh(i):
        refresh.report = refresh_experts(learner, replay, cfg, 0)

    res["refresh"] = timer.run(refresh, "refresh")
    res["refresh"].update(rows=sum(rows), experts_tested=refresh.report.tested)
    # the design point: every expert owns >= samples_per_expert episodes (re-label the replay round-robin)
    for j, ep in enumerate(replay.episodes):
        ep.expert_ids = torch.tensor([j % E, (j + 1) % E])
    rows = [min(len(x), spe) for x in replay.sample_per_expert(E, spe)]
    res["refresh_full"] = timer.run(refresh, "refresh_full")
    res["refresh_full"].update(rows=sum(rows), experts_tested=refresh.report.tested)

    res["cuda_events_per_step"] = timer.kernels
    res["step_graphs"] = learner.graphs.stats() if learner.graphs is not None else None  # train.cuda_graphs
    res["step_graph_memory"] = graph_memory
    res["plain_ft_strong"]["graphs_compiled_later"] = recompiles[0]  # the strong step's recompiles: should be 0
    res["plain_ft_strong"]["graphs_compiled_process_later"] = compile_count() - graphs1  # with the library's own
    derive_figures(res, device.type == "cuda")
    return res


# phase -> (how many forward passes of the base over the step's batch, FLOPs per token and pass in units of N)
WORK = {"plain_ft_strong": (1, 6), "plain_ft": (1, 6), "base_forward": (1, 2), "wake": (1, 6), "sleep": (1, 6),
        "sleep_pseudo": (1, 6), "refresh": (2, 2), "refresh_full": (2, 2)}


def derive_figures(res: dict, cuda: bool) -> None:
    """Ratios (against the interleaved plain FT steps of each phase), tokens/s, MFU and memory ratios, in place."""
    B, T, n_fwd, peak = res["B"], res["T"], res["n_forward_params"], res["peak_flops"]
    for key, (passes, k) in WORK.items():
        v = res[key]
        if key.startswith("refresh"):
            passes = res.get("refresh_passes", passes)
        paired = v.get("paired_median_s", {})
        if key != "plain_ft":
            v["ratio_vs_plain"] = v["median_s"] / paired.get("plain_ft", res["plain_ft"]["median_s"])
        v["ratio_vs_strong"] = v["median_s"] / paired.get("plain_ft_strong", res["plain_ft_strong"]["median_s"])
        v["tokens"] = v.get("rows", B) * T  # positions in the step's batch
        v["tokens_per_s"] = v["tokens"] / v["median_s"]
        v["flops_per_step"] = k * n_fwd * v["tokens"] * passes
        v["mfu"] = v["flops_per_step"] / v["median_s"] / peak
    if cuda:
        for key in WORK:
            for ref in ("plain_ft", "plain_ft_strong"):
                if key != ref:
                    v = res[key]
                    v["mem_ratio_vs_" + ("plain" if ref == "plain_ft" else "strong")] = v["peak_gb"] / res[ref]["peak_gb"]


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "host": platform.node()}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_mem_gb=round(props.total_memory / GB, 1), cuda=torch.version.cuda,
                   sms=props.multi_processor_count)
    return env


# ---- the report --------------------------------------------------------------------------------------------
def _f(x, nd=3):
    return "—" if x is None else f"{x:.{nd}f}"


def _ok(value, target, at_least: bool = False) -> str:
    """✅ met / ❌ not met / — (not measured in this run)."""
    if value is None:
        return "—"
    return "✅" if (value >= target if at_least else value <= target) else "❌"


def _ratio(v: dict, ref: str) -> float | None:
    """A phase's ratio against the interleaved plain FT steps (ref 'strong' or 'plain'); None if not measured."""
    return v.get(f"ratio_vs_{ref}") if v else None


def _den(v: dict, ref: str) -> str:
    """' (÷ 154 ms)': the median of the interleaved steps a ratio is taken against."""
    paired = v.get("paired_median_s") or ({"plain_ft": v["paired_plain_median_s"]} if "paired_plain_median_s" in v
                                          else {})
    x = paired.get("plain_ft_strong" if ref == "strong" else "plain_ft")
    return f" (÷ {x * 1e3:.0f} ms)" if x else ""


def _cell(v: dict, ref: str, target: float | None = None) -> str:
    r = _ratio(v, ref)
    if r is None:
        return "—"
    text = f"{r:.2f}{_den(v, ref)}"
    return f"**{text}** {_ok(r, target)}" if target is not None else text


def _later_compiles(st: dict) -> str:
    """The strong step's recompiles after its warm-up (runs before stage 8 counted the whole process's)."""
    if "graphs_compiled_process_later" in st:
        return (f"{st['graphs_compiled_later']} during its own calls (recompiles; should be 0), "
                f"{st['graphs_compiled_process_later']} in the whole process (the library's own compiles)")
    return f"{st.get('graphs_compiled_later', '—')} in the whole process (the library's own compiles included)"


def _shape_key(s: dict) -> str:
    return f"{s['B']}x{s['T']}"


# (phase key, label in the tables, target key or None)
PHASE_ROWS = [
    ("plain_ft_strong", "strongest plain FT step (the unit)", None),
    ("plain_ft", "plain FT step as before (`learner.base_optimizer`, eager, masked)", None),
    ("base_forward", "base forward only (no grad)", None),
    ("wake", "wake step", "wake_ratio"),
    ("sleep", "sleep step, replay only", "sleep_ratio"),
    ("sleep_pseudo", "sleep step with pseudo-rehearsal", "sleep_pseudo_ratio"),
    ("refresh", "refresh, all experts with episodes", "refresh_ratio"),
    ("refresh_full", "refresh, design point", "refresh_ratio"),
]
MEM_ROWS = [("plain_ft_strong", "strongest plain FT", None), ("plain_ft", "plain FT as before", None),
            ("wake", "wake", None), ("sleep", "sleep (replay only)", "mem_ratio"),
            ("sleep_pseudo", "sleep with pseudo-rehearsal", None), ("refresh_full", "refresh (design point)", None)]


def _label(s: dict, key: str, label: str) -> str:
    v = s.get(key, {})
    if "rows" in v:
        label += f" ({v['rows']} rows" + (f", {v['experts_tested']} experts" if "experts_tested" in v else "") + ")"
    return label


def _ref_ratio(ref: dict, key: str):
    if not ref:
        return "—"
    if key in ("refresh", "refresh_full"):
        return _f(ref["refresh_s"] / ref["plain_ft_s"], 1) if key == "refresh" else "—"
    if key == "plain_ft":
        return f"1 ({_f(ref.get('plain_ft_s'))} s)"
    return ref.get(f"{key}_ratio", "—")


def shape_tables(s: dict, fisher_samples) -> list[str]:
    """The time, throughput and memory tables of one shape."""
    ref = REFERENCE.get(_shape_key(s), {})
    lines = [f"### B={s['B']}, T={s['T']}", "",
             "| phase | ms | tokens/s | MFU(6N) | × strongest plain FT | target | × plain FT as before | "
             "reference × |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label, tkey in PHASE_ROWS:
        v = s.get(key)
        if v is None:
            continue
        tok = f"{v['tokens_per_s']:.0f}" if "tokens_per_s" in v else "—"
        mfu = f"{v['mfu'] * 100:.1f} %" if "mfu" in v else "—"
        strong = "1" if key == "plain_ft_strong" else _cell(v, "strong", TARGETS.get(tkey) if tkey else None)
        plain = "1" if key == "plain_ft" else _cell(v, "plain")
        target = f"≤ {TARGETS[tkey]}" if tkey else "—"
        lines.append(f"| {_label(s, key, label)} | {_f(v['median_s'] * 1e3, 1)} | {tok} | {mfu} | {strong} | "
                     f"{target} | {plain} | {_ref_ratio(ref, key)} |")
    st = s.get("plain_ft_strong")
    if st:
        how = f"`torch.compile` (mode {st.get('compile_mode') or 'default'})" if st.get("compile") else "eager"
        lines += ["", f"Strongest plain FT step: {how} forward, AdamW {st.get('optimizer')}, attention "
                      f"`{st.get('attn_implementation')}` with no mask, deterministic algorithms off; "
                      f"{st.get('params_with_grad', '?')}/{st.get('params', '?')} base tensors got a gradient; graphs "
                      f"compiled in warm-up: {st.get('graphs_compiled', '—')}, later: {_later_compiles(st)}; "
                      "step free of host syncs (checked with "
                      f"`torch.cuda.set_sync_debug_mode('error')`): {st.get('host_sync_free', '—')}."]
        if st.get("compile_error"):
            lines.append(f"**`torch.compile` failed, the step was timed eager**: `{st['compile_error'][:300]}`")
    lines.append("")
    if "peak_gb" in s["plain_ft"]:
        lines += ["| peak GPU memory | GB | × strongest plain FT | target | × plain FT as before | reference × |",
                  "|---|---|---|---|---|---|"]
        for key, label, tkey in MEM_ROWS:
            v = s.get(key)
            if v is None:
                continue
            m = v.get("mem_ratio_vs_strong")
            r_s = "1" if key == "plain_ft_strong" else (
                _f(m, 2) if tkey is None or m is None else f"**{_f(m, 2)}** {_ok(m, TARGETS[tkey])}")
            r_p = "1" if key == "plain_ft" else _f(v.get("mem_ratio_vs_plain"), 2)
            refm = {"plain_ft": f"1 ({ref.get('plain_peak_gb', '—')} GB)", "sleep": ref.get("mem_ratio", "—")}
            lines.append(f"| {label} | {_f(v['peak_gb'], 2)} | {r_s} | {f'≤ {TARGETS[tkey]}' if tkey else '—'} | "
                         f"{r_p} | {refm.get(key, '—') if ref else '—'} |")
        lines += [f"| EWC state (Fisher + anchor, with fp8 scales) | {_f(s['ewc_state_gb'], 2)} | — | — | — | — |", ""]
    bpe = s["bytes_per_episode"]
    lines += [
        f"Bytes per replay episode (T={s['T']}): {bpe / 1e3:.1f} KB"
        + (f", {bpe / ref['bytes_per_episode'] * 100:.2f} % of the reference's {ref['bytes_per_episode'] / 1e6:.2f} MB"
           if ref else "") + (f" (target ≤ 84 KB at T=256: {_ok(bpe, TARGETS['bytes_per_episode'])})"
                              if s["T"] == 256 else "") + ".",
        f"EWC consolidation ({fisher_samples} sequences, once, before the sleep steps): "
        f"{s['ewc_consolidate_s']:.2f} s. Replay filled by {s['replay_episodes']} episodes of real wake steps; "
        f"`remember` (episodes from one wake batch, CPU): {s['remember_s_per_step'] * 1e3:.2f} ms per step.",
        "",
    ]
    return lines


def target_table(run: dict) -> list[str]:
    """Issue 12's targets, met or not, per shape (ratios against the strongest plain FT step)."""
    shapes = run["shapes"]
    lines = ["| target | " + " | ".join(_shape_key(s) for s in shapes) + " |",
             "|---|" + "---|" * len(shapes)]
    rows = [("wake ≤ 0.6× (time)", "wake", "ratio_vs_strong", "wake_ratio"),
            ("sleep, replay only ≤ 1.2×", "sleep", "ratio_vs_strong", "sleep_ratio"),
            ("sleep with pseudo-rehearsal ≤ 1.4×", "sleep_pseudo", "ratio_vs_strong", "sleep_pseudo_ratio"),
            ("refresh, all experts with episodes ≤ 2×", "refresh", "ratio_vs_strong", "refresh_ratio"),
            ("refresh, design point ≤ 2×", "refresh_full", "ratio_vs_strong", "refresh_ratio"),
            ("sleep peak memory ≤ 1.2×", "sleep", "mem_ratio_vs_strong", "mem_ratio")]
    for label, key, field, tkey in rows:
        cells = []
        for s in shapes:
            x = s.get(key, {}).get(field)
            cells.append("—" if x is None else f"{x:.2f} {_ok(x, TARGETS[tkey])}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for s in shapes:
        x = s["sleep"].get("mfu")
        cells.append("—" if x is None or _shape_key(s) != MFU_TARGET_SHAPE else
                     f"{x * 100:.1f} % {_ok(x, TARGETS['sleep_mfu'], at_least=True)}")
    lines.append(f"| sleep MFU(6N) ≥ {TARGETS['sleep_mfu'] * 100:.0f} % at {MFU_TARGET_SHAPE} | " + " | ".join(cells) + " |")
    cells = [f"{s['bytes_per_episode'] / 1e3:.1f} KB {_ok(s['bytes_per_episode'], TARGETS['bytes_per_episode'])}"
             if s["T"] == 256 else "—" for s in shapes]
    lines += ["| bytes per replay episode ≤ 84 KB at T=256 | " + " | ".join(cells) + " |", "",
              "✅ met, ❌ not met, — not measured at that shape (or not in this run)."]
    return lines + [""]


def stage_tables(runs: list[dict], final: dict, notes: dict[str, str]) -> list[str]:
    lines = ["## What each optimisation bought", "",
             "Each row is one run of the script with the library as of that stage (cumulative, top to bottom). "
             "Cells: ms (× strongest plain FT / × plain FT as before), each against the steps interleaved with the "
             "phase in that run; — where a run did not time the strongest step (runs before issue 12).", ""]
    for fs in final["shapes"]:
        lines += [f"### B={fs['B']}, T={fs['T']}", "",
                  "| stage | strongest FT ms | plain FT ms | wake | sleep | sleep+pseudo | refresh design pt "
                  "| peak GB sleep (× strongest / × plain) |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in runs:
            r = next((x for x in run["shapes"] if _shape_key(x) == _shape_key(fs)), None)
            if r is None:
                continue

            def cell(k, r=r):
                v = r[k]
                return f"{v['median_s'] * 1e3:.1f} ({_f(_ratio(v, 'strong'), 2)} / {_f(_ratio(v, 'plain'), 2)})"

            strong = r.get("plain_ft_strong")
            mem = (f"{r['sleep']['peak_gb']:.2f} ({_f(r['sleep'].get('mem_ratio_vs_strong'), 2)} / "
                   f"{_f(r['sleep'].get('mem_ratio_vs_plain'), 2)})") if "peak_gb" in r["plain_ft"] else "—"
            lines.append(f"| `{run['label']}` | {_f(strong['median_s'] * 1e3, 1) if strong else '—'} | "
                         f"{r['plain_ft']['median_s'] * 1e3:.1f} | {cell('wake')} | {cell('sleep')} | "
                         f"{cell('sleep_pseudo')} | {cell('refresh_full')} | {mem} |")
        lines.append("")
    lines += ["Stages:", ""]
    for run in runs:
        lines.append(f"* `{run['label']}`: {notes.get(run['label']) or run.get('note') or STAGE_NOTES.get(run['label'], '')}")
    return lines + [""]


STAGE_NOTES = {
    "s0_baseline": "the library before this work (commit 04531b2 plus the concurrent edits present when the "
                   "snapshot was taken): wake back-propagates into every base weight, the EWC penalty is a Python "
                   "loop of 4 kernels per parameter, sleep frees the old gradients only after its forward",
    "final2": "the library as delivered (after `s1_final`): pseudo-rehearsal teachers for a whole sleep cycle made "
              "up front in one batched pass (`PseudoPool`, amortised over `--sleep-cycle` 10 steps), EWC state "
              "row-sparse for large matrices (exact: rows whose Fisher is 0 are not stored) and the Fisher in "
              "bf16 (`ewc.fisher_dtype=bf16`, as in the Qwen presets; the anchor stays fp32)",
    "s1_final": "the first optimised library: `Learner.frozen_base` in wake, `zero_grad` before the sleep forward, "
                "EWC penalty and Fisher accumulation as `torch._foreach_*` passes",
    "issue12_s4": "`train.cuda_graphs=true`: whole wake and sleep steps captured as CUDA graphs and replayed; "
                  "peak memory counts the graphs' whole reserved pool",
    "issue12_s5_exp": "`issue12_s4` with `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`: the graph pool at 8x512 "
                      "7.5 -> 6.2 GB, little change at the other shapes",
    "issue12_s5": "captured outputs outside the graph pool, and a first fused per-token CE/KL (log-sum-exp, then "
                  "the softmax rebuilt in several passes): less memory at 16x1024 but slower there (wake 0.65x, "
                  "refresh 2.1x); replaced in `issue12_s6`",
    "issue12_s6": "`train.cuda_graphs=true`; the fused per-token CE/KL as one (log-)softmax kernel per chunk "
                  "(`token_losses.py`), the tied embedding/head gradient added in place (`neocortex/embedding_grad.py`); "
                  "4x256 and 16x1024 only (the session's device time ran out before 8x512)",
    "issue12_s7_prof": "profile of one step per phase, 16x1024, steps eager (`train.cuda_graphs` off), s6 library",
    "issue12_s7_pre": "the s6 library at 8x512 with `train.cuda_graphs=true` (not measured in s6)",
    "issue12_s7": "`train.cuda_graphs=true`, Fisher in fp8 (`ewc.fisher_dtype=fp8`: e4m3 with a per-row scale), "
                  "top-k teacher logits through a block-maximum pass (`top_logits`), and an experiment reverted "
                  "after this run: a captured sleep step's base gradients in a persistent buffer outside the "
                  "graphs' pool (every sleep step then needed the buffer *and* fresh gradients: memory 1.33x at "
                  "4x256)",
    "issue12_s7_stream": "as `issue12_s7`, each shape's work on one non-default CUDA stream shared with the "
                         "captures (what-if, reverted: no change in memory)",
    "issue12_s7_stream_nobuf": "as `issue12_s7_stream` without the gradient buffer, 8x512 only (fp8 Fisher alone: "
                               "sleep memory 1.21x)",
    "issue12_s7_final": "`train.cuda_graphs=true` (the preset `train=qwen_0_5b_fast`): fp8 Fisher, bf16 anchor, "
                        "expandable segments for the graphs' pool (set by `StepGraphs`), `top_logits`",
    "issue12_s8": "`issue12_s7_final` plus the CE backward in one pass less (scale * softmax written in bf16, the "
                  "target and teacher ids apart in fp32) and refresh without host syncs",
    "issue12_s8_prof": "profile of one wake and one refresh step, 16x1024, steps eager, `issue12_s8` library "
                       "(with a table by operator and input shapes)",
    "issue12_s8_fused": "`issue12_s8` with the head losses' passes as `torch.compile` kernels "
                        "(`Learner.compiled_losses`: log-sum-exp + target logit, scale * softmax from the saved "
                        "log-sum-exps, `top_logits`' block maxima)",
    "issue12_s8_final": "`issue12_s8_fused` plus refresh scoring an episode sampled for several experts once; "
                        "the preset `train=qwen_0_5b_fast`",
    "s1_final_fused": "what-if, **not** the default: the same library with both AdamW optimizers built "
                      "`fused=True` (a `build_learner` change in train.py)",
}


def write_report(runs: list[dict], md_path: Path, notes: dict[str, str], final_label: str | None = None) -> str:
    final = next((r for r in runs if r["label"] == final_label), runs[-1])
    env, s0, args = final["env"], final["shapes"][0], final.get("args", {})
    peak = s0.get("peak_flops", PEAK_FLOPS_H200_BF16)
    n_fwd = s0.get("n_forward_params")
    strong = s0.get("plain_ft_strong", {})
    model = "a tiny Qwen2 (CPU smoke test: its numbers mean nothing)" if args.get("tiny") else "Qwen2.5-0.5B-shaped Qwen2"
    compiled = (f"`torch.compile`d (mode {strong.get('compile_mode') or 'default'})" if strong.get("compile")
                else "eager (not compiled)")
    lines = [
        "# CLS benchmark results",
        "",
        "Written by `bench/bench_cls.py --report` from the JSON of the runs below; see `bench/README.md` for",
        "what each figure is and how it is measured.",
        "",
        f"* device: **{env.get('gpu', 'cpu')}** ({env.get('gpu_mem_gb', '—')} GB, {env.get('sms', '—')} SMs), "
        f"CUDA {env.get('cuda', '—')}",
        f"* torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"* model: {model}, random init, {s0['n_params'] / 1e6:.1f} M parameters, "
        f"active vocabulary {s0['vocab_active']}, fp32 master weights, {s0['amp']} autocast; 8 experts "
        "(hidden 128, top-2)",
        f"* run label: `{final['label']}`; base optimizer {s0['base_optimizer']}; deterministic algorithms: "
        f"{s0['deterministic']}; extra overrides: {args.get('override') or 'none'}",
        ("* **unit of every ratio: the strongest plain fine-tuning step** (`plain_ft_strong`): the base's "
         f"`hidden` (no attention mask, pure causal `{strong.get('attn_implementation')}` attention) + the "
         f"capped head (`logits`, first {s0['vocab_active']} rows) + CE, {compiled}, AdamW "
         f"{strong.get('optimizer')} over every base weight, deterministic algorithms off, no host sync. The old "
         "unit (`plain_ft`: eager, masked, the learner's own AdamW, deterministic algorithms as the trainer sets "
         "them) is kept in its own column for continuity") if strong else
        ("* this run predates the strongest plain FT step (issue 12): its ratios are against `plain_ft` only (eager, "
         "masked, the learner's own AdamW), in the 'as before' column"),
        f"* timing: median of {s0['plain_ft']['n']} CUDA-synchronised steps after {args.get('warmup', '?')} warm-up "
        "steps (compilation happens there); every step of a phase is preceded by one plain FT and one strongest "
        "plain FT step, and its ratios are taken against the medians of those interleaved steps (the host's "
        "speed drifts); memory: `max_memory_allocated` over 2 steps of the phase alone (GB = 1e9 bytes), "
        "everything the process holds except the other plain FT optimizer's moments; with `train.cuda_graphs` "
        "plus the whole reserved private pool of the captured steps (a replay allocates nothing: its activations "
        "and gradients live there, and the pool is shared by all of them and stays reserved)",
        f"* MFU(6N) = k · N · tokens/s ÷ {peak / 1e12:.0f} TFLOP/s (the H200's bf16 dense matmul rate measured "
        "on the lent machines, KINDS.md; the datasheet says ~990), k = 6 for a training step (plain FT, wake, "
        "sleep: 6N even where the base is frozen), 2 per forward pass for forward-only phases (base forward; "
        "refresh: a base pass + a system pass, which resumes at the injection point where the model allows: 1.29 "
        "passes at 24 layers split after 17); N = "
        + (f"{n_fwd / 1e6:.1f} M" if n_fwd else "—")
        + " = the base parameters whose matmuls run in the forward (trainable or frozen; the embedding table "
        "left out, the head counted as its active rows); attention FLOPs not counted; tokens = positions of the "
        "step's batch (B·T, or rows·T)",
        "",
        f"## Targets (issue 12, run `{final['label']}`; ratios against the strongest plain FT step)",
        "",
        *target_table(final),
        f"## Our figures (run `{final['label']}`)",
        "",
    ]
    for s in final["shapes"]:
        lines += shape_tables(s, args.get("fisher_samples", "?"))
    if len(runs) > 1:
        lines += stage_tables(runs, final, notes)
    text = "\n".join(lines)
    if md_path is not None:
        extra = md_path.with_name("RESULTS_notes.md")
        if extra.exists():
            text += "\n" + extra.read_text()
        md_path.write_text(text)
    return text


def merge_runs(runs: list[dict]) -> list[dict]:
    """Runs with the same label (one shape per device call, say) become one run with all their shapes."""
    merged: dict[str, dict] = {}
    for run in runs:
        if run["label"] in merged:
            merged[run["label"]]["shapes"] += run["shapes"]
        else:
            merged[run["label"]] = {**run, "shapes": list(run["shapes"])}
    return list(merged.values())


# ---- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="run")
    ap.add_argument("--note", default="", help="what this stage changed (copied into the report)")
    ap.add_argument("--shapes", default="4x256,8x512,16x1024")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=16384, help="model.vocab_size (active vocabulary)")
    ap.add_argument("--wake-fill", type=int, default=16, help="wake batches in the replay before sleep/refresh")
    ap.add_argument("--fisher-samples", type=int, default=16)
    ap.add_argument("--sleep-cycle", type=int, default=10,
                    help="sleep steps per cycle over which the pseudo-teacher pool is amortised")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model-dir", default=None, help="reuse/save the random model here (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="small model (CPU smoke test of this script)")
    ap.add_argument("--no-compile", action="store_true", help="the strongest plain FT step eager (no torch.compile)")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the strongest plain FT step (default: torch's default mode)")
    ap.add_argument("--compile-cpu", action="store_true",
                    help="compile the strongest plain FT step on the CPU too (a test of the compiled path)")
    ap.add_argument("--peak-flops", type=float, default=PEAK_FLOPS_H200_BF16,
                    help="FLOP/s that MFU is taken against (default: the H200's measured bf16 dense rate)")
    ap.add_argument("--fused-adamw", action="store_true", help="what-if: fused AdamW for both optimizers")
    ap.add_argument("--fisher-bf16", action="store_true", help="what-if: store the EWC Fisher in bf16")
    ap.add_argument("--no-mask", action="store_true", help="neocortex.pass_attention_mask=False")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides (dotted.key=value)")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler table of one step of each phase here")
    ap.add_argument("--profile-phases", default=None,
                    help="with --profile-dir: only these phases (comma list: plain, plain_strong, forward, wake, "
                         "sleep, sleep_pseudo, refresh, refresh_full)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--report", nargs="*", default=None, help="JSON files of runs -> markdown (no GPU)")
    ap.add_argument("--md", default=None, help="with --report: write the markdown here")
    ap.add_argument("--final", default=None, help="with --report: the label of the run the main tables show")
    args = ap.parse_args(argv)

    if args.report is not None:
        runs = merge_runs([json.loads(Path(p).read_text()) for p in args.report])
        print(write_report(runs, Path(args.md) if args.md else None, {}, args.final))
        return 0

    if args.tiny:
        args.vocab = min(args.vocab, 512)
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="qwen_shape_"))
    model_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    save_model(model_dir, args.tiny, args.device)
    build_s = time.perf_counter() - t0
    out = {"label": args.label, "note": args.note, "env": environment(args.device), "args": vars(args),
           "model_build_s": build_s, "shapes": []}
    for shape in args.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        res = bench_shape(args, model_dir, B, T)
        out["shapes"].append(res)
        # per phase: (ms, x strongest plain FT, x plain FT, MFU, peak GB)
        print(f"[{args.label}] B={B} T={T}: " + json.dumps({k: (
            round(v["median_s"] * 1e3, 2), round(v["ratio_vs_strong"], 3), round(v.get("ratio_vs_plain", 1.0), 3),
            round(v["mfu"], 4), round(v.get("peak_gb", 0.0), 2)) for k, v in res.items()
            if isinstance(v, dict) and "median_s" in v}), flush=True)
        if args.json_out:  # after every shape: a run cut short by a time limit keeps the shapes it finished
            Path(args.json_out).write_text(json.dumps(out, indent=1, default=str))
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    text = json.dumps(out, indent=1, default=str)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text if not args.json_out else f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
