"""GPU benchmark of the CLS learner against plain fine-tuning, in one process (a script, not a test).

What it times (median of ``--steps`` CUDA-synchronised steps after ``--warmup`` steps, per shape B x T):

* ``plain_ft``      one ordinary fine-tuning step of the whole base: zero_grad, forward, CE on all positions
                    through the same capped head, backward, ``learner.base_optimizer.step()`` (the learner's own
                    AdamW, so both sides use the same optimizer settings); no clipping.
* ``base_forward``  the base forward alone (no grad, eval mode), for reference.
* ``wake``          ``wake_step`` as the trainer calls it (hippocampus on, keep_teacher=True); its batches fill
                    the replay (``episodes_from_batch``, outside the timed region).
* ``sleep``         ``build_sleep_batch`` + ``sleep_step``, replay batch = B, EWC active (one
                    ``OnlineEWC.consolidate`` first), pseudo-rehearsal off.
* ``sleep_pseudo``  the same with pseudo-rehearsal on (the default mixed source and ratio).
* ``refresh``       ``refresh_experts`` over the replay filled by the wake steps (all experts with episodes).
* ``refresh_full``  the same after re-labelling the replay so that every expert owns >= samples_per_expert
                    episodes (the design point: E x samples_per_expert rows).

Peak GPU memory (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``) is taken over the
timed steps of each phase and includes everything the process holds at that point (weights, optimizer
moments, EWC state, ...). Bytes per replay episode come from ``ReservoirReplay.bytes_per_episode()``.

The model is a Qwen2.5-0.5B-shaped Qwen2 (24 layers, hidden 896, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151,936, tied embeddings: 494 M parameters), random-init, saved to a directory and loaded
through ``build_neocortex`` with ``model.vocab_size=16384`` (fp32 master weights, bf16 autocast).

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

PEAK_FLOPS = 790e12  # the H100's measured bf16 dense rate (BENCHMARKS.md)
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
TARGETS = {"wake_ratio": 0.6, "sleep_ratio": 1.2, "sleep_pseudo_ratio": 1.5, "mem_ratio": 1.2,
           "bytes_per_episode": 84e3, "refresh_ratio": 2.0}

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
    """Median wall time of CUDA-synchronised calls, and the peak memory over the timed calls."""

    def __init__(self, device, warmup: int, steps: int, profile_dir=None, label="", shape=""):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.profile_dir, self.label, self.shape = profile_dir, label, shape
        self.kernels: dict[str, int] = {}
        self.pair = None  # a plain FT step interleaved with the timed steps (set once plain FT is timed)
        self.mem_steps = 2
        self.reset = None  # called before the memory steps

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self, fn, name: str = "") -> dict:
        import torch

        for i in range(self.warmup):
            fn(i)
        self.sync()
        if self.profile_dir is not None and name:  # one extra profiled step, outside the timed ones
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                fn(self.warmup)
                self.sync()
            events = prof.key_averages()
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if self.device.type == "cuda" else 0
            table = events.table(sort_by="self_cpu_time_total", row_limit=30)
            Path(self.profile_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(self.profile_dir, f"prof_{self.label}.txt"), "a") as fh:
                fh.write(f"\n##### {self.shape} {name}: {kernels} CUDA kernel/memcpy events\n{table}\n")
            self.kernels[name] = kernels
        cuda = self.device.type == "cuda"
        out: dict = {}
        if cuda:  # peak memory over a few steps of this phase alone
            if self.reset is not None:
                self.reset()  # drop the base gradients an interleaved plain FT step left behind
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for i in range(self.mem_steps):
                fn(self.warmup + i)
            self.sync()
            out["peak_gb"] = torch.cuda.max_memory_allocated() / GB
            out["resident_before_gb"] = base / GB
        times, paired = [], []
        for i in range(self.steps):
            if self.pair is not None:  # a plain FT step right before each step: drift hits both alike
                self.sync()
                t0 = time.perf_counter()
                self.pair(i)
                self.sync()
                paired.append(time.perf_counter() - t0)
            self.sync()
            t0 = time.perf_counter()
            fn(self.warmup + self.mem_steps + i)
            self.sync()
            times.append(time.perf_counter() - t0)
        out.update(median_s=statistics.median(times), mean_s=statistics.fmean(times), min_s=min(times),
                   max_s=max(times), n=len(times))
        if paired:
            out["paired_plain_median_s"] = statistics.median(paired)
        return out


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
    timer = Timer(device, args.warmup, args.steps, args.profile_dir, args.label, f"{B}x{T}")
    batches = random_batches(4, B, T, V, device, seed=1)
    res: dict = {"B": B, "T": T, "tokens": B * T, "n_params": n_params, "vocab_active": V,
                 "biollm_cls": str(Path(biollm_cls.__file__).parent),
                 "base_optimizer": {k: v for k, v in learner.base_optimizer.defaults.items()
                                    if k in ("fused", "foreach", "weight_decay")},
                 "deterministic": cfg.train.deterministic, "amp": str(learner.precision.dtype),
                 "pass_attention_mask": getattr(neo, "pass_attention_mask", None)}
    ac = learner.precision.autocast

    # -- plain fine-tuning of the base (the unit every ratio is taken against)
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
    timer.pair = plain  # every later phase alternates its steps with plain FT steps
    # ... and those leave base gradients that the trainer never has around in wake or refresh
    timer.reset = lambda: opt.zero_grad(set_to_none=True)
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
    ewc = OnlineEWC(cfg.ewc.lambda_, cfg.ewc.fisher_decay,
                    torch.bfloat16 if cfg.ewc.fisher_dtype == "bf16" else torch.float32)
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
    res["ewc_state_gb"] = sum(t.numel() * t.element_size() for d in (ewc.fisher, ewc.anchor) for t in d.values()) / GB
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
    # -- derived figures
    plain_s = res["plain_ft"]["median_s"]
    for key in ("base_forward", "wake", "sleep", "sleep_pseudo", "refresh", "refresh_full"):
        # against the plain FT steps interleaved with this phase's steps (robust to drift in CPU speed)
        res[key]["ratio_vs_plain"] = res[key]["median_s"] / res[key].get("paired_plain_median_s", plain_s)
    for key, toks in (("plain_ft", B * T), ("wake", B * T), ("sleep", res["sleep"]["rows"] * T),
                      ("sleep_pseudo", res["sleep_pseudo"]["rows"] * T)):
        res[key]["tokens_per_s"] = toks / res[key]["median_s"]
        res[key]["mfu_6N"] = 6 * n_params * res[key]["tokens_per_s"] / PEAK_FLOPS
    if device.type == "cuda":
        p = res["plain_ft"]["peak_gb"]
        for key in ("wake", "sleep", "sleep_pseudo", "refresh", "refresh_full"):
            res[key]["mem_ratio_vs_plain"] = res[key]["peak_gb"] / p
    return res


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


def _per(v: dict) -> str:
    """' (÷ 154 ms)': the interleaved plain FT median a ratio is taken against."""
    return f" (÷ {v['paired_plain_median_s'] * 1e3:.0f} ms)" if "paired_plain_median_s" in v else ""


def _ok(value, target) -> str:
    return "✅" if value is not None and value <= target else "❌"


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
    "s1_final_fused": "what-if, **not** the default: the same library with both AdamW optimizers built "
                      "`fused=True` (a `build_learner` change in train.py)",
}


def write_report(runs: list[dict], md_path: Path, notes: dict[str, str], final_label: str | None = None) -> str:
    final = next((r for r in runs if r["label"] == final_label), runs[-1])
    env = final["env"]
    lines = [
        "# CLS benchmark results",
        "",
        "Written by `bench/bench_cls.py --report` from the JSON of the runs below; see `bench/README.md` for",
        "what each figure is and how it is measured.",
        "",
        f"* device: **{env.get('gpu', 'cpu')}** ({env.get('gpu_mem_gb', '—')} GB, {env.get('sms', '—')} SMs), "
        f"CUDA {env.get('cuda', '—')}",
        f"* torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"* model: Qwen2.5-0.5B-shaped Qwen2, random init, {final['shapes'][0]['n_params'] / 1e6:.0f} M parameters, "
        f"active vocabulary {final['shapes'][0]['vocab_active']}, fp32 master weights, {final['shapes'][0]['amp']} "
        "autocast; 8 experts (hidden 128, top-2)",
        f"* run label: `{final['label']}`; base optimizer {final['shapes'][0]['base_optimizer']}; "
        f"deterministic algorithms: {final['shapes'][0]['deterministic']}; extra overrides: "
        f"{final.get('args', {}).get('override') or 'none'}",
        f"* timing: median of {final['shapes'][0]['plain_ft']['n']} CUDA-synchronised steps after "
        f"{final.get('args', {}).get('warmup', '?')} warm-up steps; every phase's steps alternate with plain FT "
        "steps and its ratio is taken against those interleaved plain steps (the host CPU's speed drifts; the "
        "steps are launch-bound); memory: `max_memory_allocated` over 2 steps of the phase alone (GB = 1e9 "
        "bytes), everything the process holds included",
        "",
        f"## Our figures (run `{final['label']}`)",
        "",
    ]
    for s in final["shapes"]:
        key = f"{s['B']}x{s['T']}"
        ref = REFERENCE.get(key, {})
        pl = s["plain_ft"]
        lines += [
            f"### B={s['B']}, T={s['T']}",
            "",
            "| figure | ours | ratio vs plain FT | target | reference ratio |",
            "|---|---|---|---|---|",
            f"| plain FT step | {_f(pl['median_s'] * 1e3, 1)} ms ({pl['tokens_per_s']:.0f} tok/s, MFU(6N) "
            f"{pl['mfu_6N'] * 100:.1f} %) | 1 | — | 1 ({_f(ref.get('plain_ft_s'))} s) |",
            f"| base forward only (no grad) | {_f(s['base_forward']['median_s'] * 1e3, 1)} ms | "
            f"{_f(s['base_forward']['ratio_vs_plain'], 2)}{_per(s['base_forward'])} | — | — |",
            f"| wake step | {_f(s['wake']['median_s'] * 1e3, 1)} ms ({s['wake']['tokens_per_s']:.0f} tok/s) | "
            f"**{_f(s['wake']['ratio_vs_plain'], 2)}**{_per(s['wake'])} {_ok(s['wake']['ratio_vs_plain'], TARGETS['wake_ratio'])} | "
            f"≤ {TARGETS['wake_ratio']} | {ref.get('wake_ratio', '—')} |",
            f"| sleep step, replay only ({s['sleep']['rows']} rows) | {_f(s['sleep']['median_s'] * 1e3, 1)} ms "
            f"(MFU(6N) {s['sleep']['mfu_6N'] * 100:.1f} %) | **{_f(s['sleep']['ratio_vs_plain'], 2)}**{_per(s['sleep'])} "
            f"{_ok(s['sleep']['ratio_vs_plain'], TARGETS['sleep_ratio'])} | ≤ {TARGETS['sleep_ratio']} | "
            f"{ref.get('sleep_ratio', '—')} |",
            f"| sleep step with pseudo-rehearsal ({s['sleep_pseudo']['rows']} rows) | "
            f"{_f(s['sleep_pseudo']['median_s'] * 1e3, 1)} ms | **{_f(s['sleep_pseudo']['ratio_vs_plain'], 2)}**{_per(s['sleep_pseudo'])} "
            f"{_ok(s['sleep_pseudo']['ratio_vs_plain'], TARGETS['sleep_pseudo_ratio'])} | "
            f"≤ {TARGETS['sleep_pseudo_ratio']} | {ref.get('sleep_pseudo_ratio', '—')} |",
            f"| refresh, all experts with episodes ({s['refresh']['rows']} rows, {s['refresh']['experts_tested']} "
            f"experts) | {_f(s['refresh']['median_s'] * 1e3, 1)} ms | **{_f(s['refresh']['ratio_vs_plain'], 2)}**{_per(s['refresh'])} "
            f"{_ok(s['refresh']['ratio_vs_plain'], TARGETS['refresh_ratio'])} | ≤ {TARGETS['refresh_ratio']} | "
            f"{_f(ref['refresh_s'] / ref['plain_ft_s'], 1) if ref else '—'} |",
            f"| refresh, design point ({s['refresh_full']['rows']} rows, {s['refresh_full']['experts_tested']} "
            f"experts x samples_per_expert) | {_f(s['refresh_full']['median_s'] * 1e3, 1)} ms | "
            f"**{_f(s['refresh_full']['ratio_vs_plain'], 2)}**{_per(s['refresh_full'])} "
            f"{_ok(s['refresh_full']['ratio_vs_plain'], TARGETS['refresh_ratio'])} | ≤ {TARGETS['refresh_ratio']} "
            "| — |",
        ]
        if "peak_gb" in pl:
            lines += [
                f"| peak GPU memory, plain FT | {_f(pl['peak_gb'], 2)} GB | 1 | — | 1 ({ref.get('plain_peak_gb', '—')} GB) |",
                f"| peak GPU memory, wake | {_f(s['wake']['peak_gb'], 2)} GB | {_f(s['wake']['mem_ratio_vs_plain'], 2)} "
                "| — | — |",
                f"| peak GPU memory, sleep (replay only) | {_f(s['sleep']['peak_gb'], 2)} GB | "
                f"**{_f(s['sleep']['mem_ratio_vs_plain'], 2)}** "
                f"{_ok(s['sleep']['mem_ratio_vs_plain'], TARGETS['mem_ratio'])} | ≤ {TARGETS['mem_ratio']} | "
                f"{ref.get('mem_ratio', '—')} |",
                f"| peak GPU memory, sleep with pseudo-rehearsal | {_f(s['sleep_pseudo']['peak_gb'], 2)} GB | "
                f"{_f(s['sleep_pseudo']['mem_ratio_vs_plain'], 2)} | — | — |",
                f"| peak GPU memory, refresh (design point) | {_f(s['refresh_full']['peak_gb'], 2)} GB | "
                f"{_f(s['refresh_full']['mem_ratio_vs_plain'], 2)} | — | — |",
                f"| EWC state (Fisher + anchor) | {_f(s['ewc_state_gb'], 2)} GB | — | — | — |",
            ]
        bpe = s["bytes_per_episode"]
        lines += [
            f"| bytes per replay episode (T={s['T']}) | {bpe / 1e3:.1f} KB | "
            f"{bpe / ref['bytes_per_episode'] * 100:.2f} % of the reference |"
            f" ≤ 84 KB at T=256 {_ok(bpe, TARGETS['bytes_per_episode']) if s['T'] == 256 else ''} | "
            f"{ref.get('bytes_per_episode', 0) / 1e6:.2f} MB |" if ref else f"| bytes per replay episode | {bpe:.0f} | | | |",
            "",
            f"EWC consolidation ({final.get('args', {}).get('fisher_samples', '?')} sequences, once, before the sleep "
            f"steps): {s['ewc_consolidate_s']:.2f} s. Replay filled by {s['replay_episodes']} episodes of real wake steps; "
            f"`remember` (episodes from one wake batch, CPU): {s['remember_s_per_step'] * 1e3:.2f} ms per step.",
            "",
        ]
    if len(runs) > 1:
        lines += ["## What each optimisation bought", "",
                  "Each row is one run of the script on the same machine in the same device call, with the library "
                  "as of that stage (cumulative, top to bottom). Ratios are against the plain FT steps interleaved with each phase in that run.", ""]
        for shape_idx, s in enumerate(final["shapes"]):
            lines += [f"### B={s['B']}, T={s['T']}", "",
                      "| stage | plain FT ms | wake ms (×) | sleep ms (×) | sleep+pseudo ms (×) | refresh design pt ms (×) "
                      "| peak GB plain / sleep (×) |",
                      "|---|---|---|---|---|---|---|"]
            for run in runs:
                r = run["shapes"][shape_idx]
                cell = lambda k, r=r: f"{r[k]['median_s'] * 1e3:.1f} ({r[k]['ratio_vs_plain']:.2f})"  # noqa: E731
                mem = (f"{r['plain_ft']['peak_gb']:.2f} / {r['sleep']['peak_gb']:.2f} "
                       f"({r['sleep']['mem_ratio_vs_plain']:.2f})") if "peak_gb" in r["plain_ft"] else "—"
                lines.append(f"| `{run['label']}` | {r['plain_ft']['median_s'] * 1e3:.1f} | {cell('wake')} | "
                             f"{cell('sleep')} | {cell('sleep_pseudo')} | {cell('refresh_full')} | {mem} |")
            lines.append("")
        lines += ["Stages:", ""]
        for run in runs:
            lines.append(f"* `{run['label']}`: {notes.get(run['label']) or run.get('note') or STAGE_NOTES.get(run['label'], '')}")
        lines.append("")
    text = "\n".join(lines)
    if md_path is not None:
        extra = md_path.with_name("RESULTS_notes.md")
        if extra.exists():
            text += "\n" + extra.read_text()
        md_path.write_text(text)
    return text


# ---- main ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", default="run")
    ap.add_argument("--note", default="", help="what this stage changed (copied into the report)")
    ap.add_argument("--shapes", default="4x256,8x512")
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
    ap.add_argument("--fused-adamw", action="store_true", help="what-if: fused AdamW for both optimizers")
    ap.add_argument("--fisher-bf16", action="store_true", help="what-if: store the EWC Fisher in bf16")
    ap.add_argument("--no-mask", action="store_true", help="neocortex.pass_attention_mask=False")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides (dotted.key=value)")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler table of one step of each phase here")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--report", nargs="*", default=None, help="JSON files of runs -> markdown (no GPU)")
    ap.add_argument("--md", default=None, help="with --report: write the markdown here")
    ap.add_argument("--final", default=None, help="with --report: the label of the run the main tables show")
    args = ap.parse_args(argv)

    if args.report is not None:
        runs = [json.loads(Path(p).read_text()) for p in args.report]
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
        print(f"[{args.label}] B={B} T={T}: " + json.dumps({k: (round(v["median_s"] * 1e3, 2), round(
            v.get("ratio_vs_plain", 1.0), 3), round(v.get("peak_gb", 0.0), 2)) for k, v in res.items()
            if isinstance(v, dict) and "median_s" in v}), flush=True)
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
