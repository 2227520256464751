"""The continual-learning loop: wake -> maybe sleep (-> refresh) -> evaluate at task boundaries -> log.

``run_training(cfg)`` builds the parts (``build_run``), then for every step of the stream:

1. WAKE: the hippocampus (or, in the baselines, the base) learns the batch; the batch enters replay.
2. PRESSURE: saturation, novelty and forgetting update the sleep pressure.
3. SLEEP: when the scheduler says so, consolidate system -> base, then REFRESH absorbed experts.
4. BOUNDARY: after each task, evaluate every seen task in both views (system, base), checkpoint.
5. LOG: one metrics row per step (``metrics.jsonl``; mirrored to W&B when enabled).

The loop's wall time is split by phase (``PhaseClock``: wake, sleep, fisher, refresh, evaluation,
checkpoint) into ``run_metadata.json``'s ``timing.phase_s``.

Everything a run used is recorded next to its outputs (docs/run_outputs.md). Re-running the same
command on the same output directory resumes from the last checkpoint; with ``restart_stale`` (the CLI's
``train --restart-stale``, used by the pipeline) a directory that cannot be resumed by this command (another
config, another library version, newer inputs, a completed run) is deleted and the run starts over.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from biollm_cls.benchmarks import Batch, build_stream, is_boundary, task_at
from biollm_cls.benchmarks.base import is_right_padded
from biollm_cls.benchmarks.errors import DataError
from biollm_cls.budget import BudgetLedger
from biollm_cls.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    checkpoint_step,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from biollm_cls.config import RunConfig, to_dict, total_steps
from biollm_cls.config.schema import ConfigError
from biollm_cls.continual_metrics import ContinualMatrix
from biollm_cls.device import configure_precision, device_facts, resolve_device, seed_everything
from biollm_cls.evaluation import TaskScore, evaluate_seen
from biollm_cls.ewc import OnlineEWC
from biollm_cls.hippocampus import Hippocampus
from biollm_cls.learner import Learner, Precision, per_row_mean, supervised_rows
from biollm_cls.metric_glossary import write_glossary
from biollm_cls.neocortex import build_neocortex
from biollm_cls.refresh import RefreshReport, refresh_experts
from biollm_cls.replay import ReservoirReplay, collate, episodes_from_batch
from biollm_cls.run_io import MetricsLog, library_commit, now, versions, write_json, write_task_matrix
from biollm_cls.scheduler import PressureSignals, SleepScheduler, clip01
from biollm_cls.sleep import SleepReport, concat_batches, sleep_cycle, stored_teacher
from biollm_cls.step_graphs import StepGraphs
from biollm_cls.wake import WakeOutcome, wake_step

VIEWS = ("system", "base")


class RunError(RuntimeError):
    """A run that cannot start or continue (reported as one line, exit code 2)."""


@dataclass
class RunState:
    """What the loop carries from step to step (all of it goes into checkpoints)."""

    step: int = 0
    sleep_count: int = 0
    refresh_count_total: int = 0
    base_updates_in_sleep: int = 0
    non_finite_step_count: int = 0
    first_non_finite_step: int = -1
    non_finite_sleep_step_count: int = 0  # consolidation updates skipped because their loss was NaN/Inf
    routing_ema: list[float] | None = None  # slow running average of routing shares
    routing_fast: list[float] | None = None
    loss_ema: float | None = None
    forgetting_signal: float = 0.0
    old_task_loss: float = float("nan")
    wall_time_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=dict)  # wall seconds per phase (PhaseClock)
    task_matrix_rows: list[dict] = field(default_factory=list)
    ledger: BudgetLedger = field(default_factory=BudgetLedger)
    sleep_log: list[list[int]] = field(default_factory=list)  # [step, base steps, rows per step] per sleep


# The loop's phases (run_metadata.json timing.phase_s): wake = everything outside the others (batch assembly,
# the wake step, replay insertion, sleep pressure and its forgetting probes, step rows); sleep = the
# consolidation updates (pseudo-rehearsal teachers included); fisher = every online-EWC Fisher estimate
# (after a sleep, or at a boundary for ewc_only); refresh = the expert tests and resets after a sleep;
# evaluation = the boundary evaluation of both views; checkpoint = every checkpoint write.
PHASES = ("wake", "sleep", "fisher", "refresh", "evaluation", "checkpoint")


class PhaseClock:
    """The loop's wall time (`RunState.wall_time_s`) and its split by phase (`RunState.phase_s`).

    One phase runs at a time and `enter` closes its lap, so the phase totals add up to the wall time at every
    lap. On CUDA the GPU is synchronised when the phase changes (the kernels a phase queued belong to it),
    never inside a phase. Both totals continue from the values a resumed state holds."""

    def __init__(self, state: RunState, device: torch.device):
        self.state, self.phase = state, "wake"
        self.sync = device.type == "cuda"
        self.mark = time.perf_counter()
        self.started = self.mark - state.wall_time_s

    def tick(self) -> None:
        """The wall time so far (no lap, no synchronisation)."""
        self.state.wall_time_s = time.perf_counter() - self.started

    def enter(self, phase: str) -> str:
        """Close the running phase's lap and start `phase`; returns the phase that was running."""
        previous = self.phase
        if phase != previous:
            self.lap()
            self.phase = phase
        return previous

    def lap(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now, st = time.perf_counter(), self.state
        st.phase_s[self.phase] = st.phase_s.get(self.phase, 0.0) + (now - self.mark)
        st.wall_time_s, self.mark = now - self.started, now

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        previous = self.enter(phase)
        try:
            yield
        finally:
            self.enter(previous)


@contextmanager
def _phase(run: Run, phase: str) -> Iterator[None]:
    """`run.clock.timed(phase)`; nothing without a clock (parts driven outside `run_training`)."""
    if run.clock is None:
        yield
    else:
        with run.clock.timed(phase):
            yield


def _time_fisher(run: Run) -> None:
    """Route every Fisher estimate (also the one inside `sleep_cycle`) through the clock's `fisher` phase."""
    consolidate = run.ewc.consolidate

    def timed_consolidate(*args, **kwargs):
        with _phase(run, "fisher"):
            return consolidate(*args, **kwargs)

    run.ewc.consolidate = timed_consolidate


@dataclass
class Run:
    cfg: RunConfig
    run_dir: Path
    stream: object
    learner: Learner
    replay: ReservoirReplay | None
    ewc: OnlineEWC
    scheduler: SleepScheduler
    generator: torch.Generator  # sleep sampling and pseudo tokens
    matrices: dict[str, ContinualMatrix]
    state: RunState
    recent: list[Batch] = field(default_factory=list)  # the current task's last batches (boundary Fisher)
    plan: dict[int, tuple[int, int]] | None = None  # consolidation.sleep_plan: sleep here, not by pressure
    wandb: object | None = None  # the W&B mirror, when logging.use_wandb
    clock: PhaseClock | None = None  # wall time by phase (run_training sets it)

    @property
    def sleeps(self) -> bool:
        return not self.cfg.train.ablation_no_sleep

    @property
    def pad_id(self) -> int:
        return self.stream.pad_id


# ---------------------------------------------------------------------------------------------------------
def run_training(cfg: RunConfig, restart_stale: bool = False) -> dict:
    run = build_run(cfg, restart_stale)
    total = total_steps(cfg)
    log = MetricsLog(run.run_dir / "metrics.jsonl", resume_step=run.state.step or None, mirrors=_mirrors(run))
    bar = tqdm(total=total, initial=run.state.step, desc="wake", dynamic_ncols=True,
               disable=None if cfg.train.progress else True)
    run.clock = PhaseClock(run.state, run.learner.device)
    _time_fisher(run)
    if run.state.step == 0:  # the neocortex split facts (hf_injection_*), once, at step 0
        log.log({"kind": "runtime", "step": 0, **run.learner.neocortex.runtime_info()})
    try:
        for step in range(run.state.step + 1, total + 1):
            task = task_at(step, cfg.benchmark.switch_every)
            batch, stream_rows, replay_teacher = wake_batch(run, step)
            wake = wake_step(run.learner, batch.to(run.learner.device), cfg, run.ewc, stream_rows,
                             keep_teacher=_keeps_teacher(run), replay_teacher=replay_teacher)
            remember(run, batch, stream_rows, wake, step)
            signals = pressure_signals(run, wake, step, task)
            pressure = run.scheduler.pressure  # as it stood when the scheduler decided (sleep resets it)
            sleep, refresh = maybe_sleep(run, step, task, bar)
            run.state.step = step
            run.clock.tick()
            if step % cfg.logging.log_interval == 0 or sleep.steps:
                log.log(step_row(run, step, task, wake, signals, pressure, sleep, refresh))
            if is_boundary(step, cfg.benchmark.switch_every):
                log.log(evaluate_boundary(run, step, task))
                _save(run)
            elif cfg.logging.checkpoint_interval and step % cfg.logging.checkpoint_interval == 0:
                _save(run)
            bar.update(1)
            bar.set_postfix(task=run.stream.task_names[task], loss=f"{wake.loss:.3f}", sleeps=run.state.sleep_count)
        summary = finish(run, log)
    except BaseException:
        if run.wandb is not None:
            run.wandb.finish({}, _run_files(run), exit_code=1)  # mark the W&B run failed, keep local files
        raise
    finally:
        bar.close()
        log.close()
    return summary


# ---- set-up ---------------------------------------------------------------------------------------------
def build_run(cfg: RunConfig, restart_stale: bool = False) -> Run:
    """The run's parts; resumed from `logging.output_dir`'s newest intact checkpoint when it has one.

    `restart_stale`: a directory that this command cannot resume (see `stale_reason`) is deleted, with one
    ``note:`` line, and the run starts over, instead of being refused."""
    run_dir = Path(cfg.logging.output_dir)
    if (run_dir / "summary.json").exists() and not restart_stale:
        raise RunError(f"{run_dir} already holds a completed run (summary.json); choose another "
                       f"logging.output_dir or delete that directory to run again")
    device = resolve_device(cfg.device)
    if cfg.require_cuda and device.type != "cuda":
        raise RunError("require_cuda=true but CUDA is not available (see `python -m biollm_cls.cli check-device`)")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed, cfg.train.deterministic, device)
    configure_precision(device, cfg.train.allow_tf32, cfg.train.matmul_precision)
    stream = build_stream(cfg)  # before anything is written: bad data fails early
    if cfg.model.provider == "tiny" and cfg.model.vocab_size == 0:
        cfg.model.vocab_size = stream.vocab_size
    if cfg.model.provider == "tiny" and cfg.model.vocab_size < stream.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the benchmark's "
                          f"{stream.vocab_size} token ids: set model.vocab_size={stream.vocab_size} (or 0)")
    learner = build_learner(cfg, device)
    needs_replay = not cfg.train.ablation_no_sleep or cfg.replay.wake_mix > 0
    generator = torch.Generator().manual_seed(cfg.seed + 17)
    run = Run(
        cfg=cfg, run_dir=run_dir, stream=stream, learner=learner,
        replay=ReservoirReplay(cfg.replay.capacity, cfg.seed + 1, cfg.replay.recent_capacity) if needs_replay else None,
        ewc=OnlineEWC.from_config(cfg.ewc),
        scheduler=SleepScheduler(cfg.scheduler, cfg.consolidation), generator=generator,
        matrices={v: ContinualMatrix(cfg.benchmark.num_tasks) for v in VIEWS}, state=RunState(),
        plan=load_sleep_plan(cfg),
    )
    if restart_stale:
        reason = stale_reason(run_dir, cfg)
        if reason is not None:  # nothing was written yet: deleting now is a fresh start
            _note(f"starting {run_dir} over: {reason}")
            shutil.rmtree(run_dir)
    if list_checkpoints(run_dir):
        _resume(run)  # from the newest intact checkpoint
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "validated_config.json", to_dict(cfg))
        write_json(run_dir / "run_metadata.json", _metadata(run, status="running"))
    return run


def compile_neocortex(neocortex: torch.nn.Module, scope: str = "layers", **options) -> None:
    """``train.compile_model``: `torch.compile` of the neocortex's forward (``train.compile_scope``).
    ``layers`` (the default): each decoder layer alone (regional; one compiled layer serves every layer).
    ``trunk``: the whole stack, embeddings to the final norm, one graph per variant with the injection hook and
    the hippocampus traced into it (a graph break, should one occur, splits it, and the rest stays compiled).
    Shapes vary between wake, sleep, refresh, the Fisher pass and evaluation, and grad mode / train mode / base
    or system view each make a variant: room for them all in dynamo's cache, or it would fall back to eager
    without a word."""
    import torch._dynamo

    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    if scope == "trunk":
        neocortex.compile_trunk(**options)
    else:
        neocortex.compile_layers(**options)


def build_learner(cfg: RunConfig, device: torch.device) -> Learner:
    trains_base = not cfg.train.ablation_no_sleep or cfg.consolidation.wake_base_lr_scale > 0
    neocortex = build_neocortex(cfg.model, device, trains_base=trains_base)
    for p in neocortex.parameters():
        p.requires_grad_(trains_base)
    if cfg.train.compile_model:
        compile_neocortex(neocortex, cfg.train.compile_scope, mode=cfg.train.compile_mode)
    base_params = [p for p in neocortex.parameters() if p.requires_grad]
    # On CUDA the fused AdamW kernel: bench/RESULTS_notes.md measured ~1 GB less peak memory in plain FT and in
    # sleep at the Qwen-0.5B shape (no foreach temporaries); the CPU keeps the default (and its numbers).
    fused = {"fused": True} if device.type == "cuda" else {}
    graphs = StepGraphs(device) if cfg.train.cuda_graphs and device.type == "cuda" else None
    if graphs is not None:
        fused["capturable"] = True  # a captured step reads the step count and the lr on the device
    base_opt = torch.optim.AdamW(base_params or [torch.nn.Parameter(torch.zeros(1, device=device))],
                                 lr=cfg.consolidation.slow_lr, **fused)
    hippocampus, fast_opt = None, None
    if not cfg.train.ablation_disable_hippocampus:
        hippocampus = Hippocampus(neocortex.hidden_size, cfg.experts).to(device)
        fast_opt = torch.optim.AdamW(hippocampus.parameters(), lr=cfg.experts.fast_lr, weight_decay=0.0, **fused)
    precision = Precision.build(device, cfg.train.amp_enabled, cfg.train.amp_dtype)
    # with train.compile_model on CUDA the losses over the head's logits are compiled kernels too (the CPU keeps
    # the eager chunks: inductor's C++ builds would cost more than they save there)
    compiled_losses = cfg.train.compile_model and device.type == "cuda"
    return Learner(neocortex, hippocampus, base_opt, fast_opt, precision, device, graphs=graphs,
                   compiled_losses=compiled_losses)


def _keeps_teacher(run: Run) -> bool:
    c = run.cfg
    return (run.replay is not None and run.sleeps and c.replay.teacher == "stored_topk"
            and (c.consolidation.distill_weight > 0 or c.replay.wake_distill_weight > 0))


def _mirrors(run: Run) -> list:
    if not run.cfg.logging.use_wandb:
        return []
    from biollm_cls.wandb_logging import open_wandb_mirror

    mirror = open_wandb_mirror(run.cfg, run.run_dir, run.learner.neocortex.runtime_info())
    run.wandb = mirror
    if mirror is None:
        return []
    mirror.watch(run.learner.neocortex)
    return [mirror]


# ---- the phases -----------------------------------------------------------------------------------------
def wake_batch(run: Run, step: int) -> tuple[Batch, int, tuple[torch.Tensor, torch.Tensor] | None]:
    """This step's data, with `replay.wake_mix` replayed episodes mixed in (the learner and the `er`
    baselines): (batch, new rows, the replayed rows' stored teachers or None)."""
    batch = run.stream.train_batch(step, run.cfg.train.batch_size)
    if not is_right_padded(batch.attention_mask):  # a custom stream's batch (ours are right-padded)
        raise DataError(f"the {run.cfg.benchmark.name} stream's batch of step {step} is left-padded or has holes "
                        f"(attention_mask is False before a real position); replay and the HF neocortex's "
                        f"pure-causal attention need right padding: put the pad positions at the end of each row")
    mix = run.cfg.replay.wake_mix
    if mix > 0 and run.replay is not None and len(run.replay) > 0:
        episodes = run.replay.sample(mix)
        teacher = None
        if run.cfg.replay.wake_distill_weight > 0 and episodes[0].teacher_values is not None:
            teacher = stored_teacher(episodes, run.learner.device)
        return concat_batches(batch, collate(episodes, run.pad_id), run.pad_id), len(batch), teacher
    return batch, len(batch), None


def remember(run: Run, batch: Batch, stream_rows: int, wake: WakeOutcome, step: int) -> None:
    """Store the new rows as episodes (replay) and keep the task's last batches (boundary Fisher)."""
    st = run.state
    hip_trains = run.learner.hippocampus is not None
    base_trains = run.cfg.consolidation.wake_base_lr_scale > 0
    if not wake.applied:
        st.non_finite_step_count += 1
        st.first_non_finite_step = step if st.first_non_finite_step < 0 else st.first_non_finite_step
    else:
        st.ledger.add_wake(len(batch), len(batch) - stream_rows, hip_trains, base_trains,
                           forward_passes=int(wake.teacher_values is not None))
    new = Batch(batch.input_ids[:stream_rows], batch.targets[:stream_rows], batch.attention_mask[:stream_rows],
                batch.task_ids[:stream_rows])
    if run.replay is not None and wake.applied:  # a skipped (non-finite) step stores nothing: no NaN teachers
        for episode in episodes_from_batch(new, step, wake.expert_ids, wake.expert_weights, wake.row_loss,
                                           wake.teacher_values, wake.teacher_ids):
            run.replay.add(episode)
    if run.cfg.ewc.fisher_update == "boundary" and run.ewc.lambda_ > 0:
        run.recent.append(new)
        while sum(len(b) for b in run.recent[1:]) >= run.cfg.ewc.fisher_samples:
            run.recent.pop(0)


def pressure_signals(run: Run, wake: WakeOutcome, step: int, task: int) -> PressureSignals:
    st, hip, sc = run.state, run.learner.hippocampus, run.cfg.scheduler
    novelty = 0.0
    # routing shift: a fast vs a slow running average of expert shares (a non-finite step's routing is no
    # reading: it would stay in both averages for good)
    if wake.expert_share is not None and bool(torch.isfinite(wake.expert_share).all()):
        share = wake.expert_share.tolist()
        fast = st.routing_fast or share
        slow = st.routing_ema or share
        st.routing_fast = [0.8 * a + 0.2 * b for a, b in zip(fast, share, strict=True)]
        st.routing_ema = [sc.novelty_decay * a + (1 - sc.novelty_decay) * b for a, b in zip(slow, share, strict=True)]
        novelty = 0.5 * sum(abs(a - b) for a, b in zip(st.routing_fast, st.routing_ema, strict=True))
    if st.loss_ema is not None and wake.applied:
        novelty = max(novelty, clip01((wake.loss - st.loss_ema) / max(st.loss_ema, 1e-6)))
    if wake.applied:
        st.loss_ema = wake.loss if st.loss_ema is None else sc.novelty_decay * st.loss_ema + (
            1 - sc.novelty_decay) * wake.loss
    if run.sleeps and run.plan is None and step % sc.probe_interval == 0:
        probe_forgetting(run, task)
    saturation = float(hip.saturation_ratio()) if hip is not None else 0.0
    signals = PressureSignals(saturation=saturation, novelty=clip01(novelty), forgetting=st.forgetting_signal)
    run.scheduler.update(signals)
    return signals


def probe_forgetting(run: Run, task: int) -> None:
    """Update the forgetting signal from a probe. A non-finite probe (NaN/Inf system loss) is no reading: the
    signal keeps its last value (clip01 would turn NaN into 0.0, "nothing forgotten", and lower the pressure);
    `old_task_loss` records what the probe measured (null in the metrics row)."""
    signal, run.state.old_task_loss = forgetting_probe(run, task)
    if signal is not None:
        run.state.forgetting_signal = signal


@torch.no_grad()
def forgetting_probe(run: Run, task: int) -> tuple[float | None, float]:
    """Loss rise of the system on replayed episodes of seen, non-current tasks since they were experienced:
    (signal in [0, 1], or None when the probe's loss is not finite; mean probe loss)."""
    episodes = run.replay.sample(run.cfg.scheduler.probe_size, exclude_task=task) if run.replay else []
    if not episodes:
        return 0.0, float("nan")
    run.state.ledger.forward_only_passes += 1
    learner = run.learner
    batch = collate(episodes, run.pad_id).to(learner.device)
    learner.neocortex.eval()
    with learner.precision.autocast():
        logits = learner.logits(learner.system_hidden(batch.input_ids, batch.attention_mask)[batch.supervised])
    token = torch.nn.functional.cross_entropy(logits.float(), batch.targets[batch.supervised], reduction="none")
    now_loss = per_row_mean(token, supervised_rows(batch.supervised), len(episodes)).cpu()
    then = torch.tensor([e.wake_loss for e in episodes])
    rise = (now_loss - then).clamp(min=0).mean().item()
    if not math.isfinite(rise):
        return None, now_loss.mean().item()
    return clip01(rise / run.cfg.scheduler.forgetting_scale), now_loss.mean().item()


def maybe_sleep(run: Run, step: int, task: int, bar) -> tuple[SleepReport, RefreshReport]:
    """Sleep when the scheduler says so (or, for a matched baseline, where its plan says), then refresh."""
    if not run.sleeps or run.replay is None or len(run.replay) == 0:
        return SleepReport(pseudo_source_mode="off"), RefreshReport()
    cfg = run.cfg
    if run.plan is not None:
        if step not in run.plan:
            return SleepReport(pseudo_source_mode="off"), RefreshReport()
        steps, rows = run.plan[step]
        cfg = copy.copy(cfg)
        cfg.replay = replace(cfg.replay, batch_size=rows)  # as many rows per step as the matched run had
    elif run.scheduler.should_sleep(step):
        steps = run.scheduler.recommended_steps()
    else:
        return SleepReport(pseudo_source_mode="off"), RefreshReport()
    bar.set_description("sleep")
    since = run.state.sleep_log[-1][0] if run.state.sleep_log else 0
    with _phase(run, "sleep"):
        report = sleep_cycle(run.learner, run.replay, run.ewc, steps, cfg, run.pad_id, run.stream.vocab_size,
                             run.generator, since)
    refresh = RefreshReport()
    if report.steps:  # each expert's own test decides (the probe's KL drop was a noisy gate: it blocked 3 of 8)
        with _phase(run, "refresh"):
            refresh = refresh_experts(run.learner, run.replay, cfg, run.pad_id)
    run.replay.end_sleep()  # the short-term store has been replayed: on to the long-term reservoir
    bar.set_description("wake")
    run.scheduler.mark_slept(step)
    st = run.state
    st.sleep_count += 1
    st.base_updates_in_sleep += report.steps
    st.non_finite_sleep_step_count += report.skipped_steps
    st.refresh_count_total += refresh.refresh_count
    rows_per_step = round(report.replay_batch_size_sleep + report.pseudo_batch_size) if report.steps else 0
    st.sleep_log.append([step, report.steps, rows_per_step])
    hip_rows = report.hippocampal_replay_steps * rows_per_step
    st.ledger.add_sleep(report.steps, round(report.replay_batch_size_sleep * report.steps),
                        round(report.pseudo_batch_size * report.steps), report.forward_passes + 2 * bool(refresh.tested),
                        report.fisher_backwards, report.hippocampal_replay_steps, hip_rows)
    if run.plan is None and step % run.cfg.scheduler.probe_interval != 0:
        # Forgetting is measured again on the consolidated system, so the signal reflects what sleep repaired
        # (otherwise it held its pre-sleep value until the next probe and drove the next sleep as a timer).
        probe_forgetting(run, task)
    return report, refresh


def evaluate_boundary(run: Run, step: int, task: int) -> dict:
    """Evaluate every seen task in both views (eval mode) and record the boundary row."""
    with _phase(run, "evaluation"):
        return _evaluate_boundary(run, step, task)


def _evaluate_boundary(run: Run, step: int, task: int) -> dict:
    cfg, learner = run.cfg, run.learner
    if cfg.ewc.fisher_update == "boundary" and run.ewc.lambda_ > 0 and run.recent:
        batches = [b.to(learner.device) for b in run.recent]
        run.ewc.consolidate(learner.neocortex, batches, learner.base_hidden, learner.logits,
                            learner.precision.autocast, run.generator)
        run.recent.clear()
    seen = list(range(task + 1))
    learner.neocortex.eval()
    views = {"system": learner.system_hidden, "base": learner.base_hidden}
    row: dict = {"kind": "boundary", "step": step, "boundary_index": task, "boundary_step": step,
                 "task_id": task, "task_name": run.stream.task_names[task], "tasks_completed": task + 1}
    for view in VIEWS if learner.hippocampus is not None else ("base",):
        scores = evaluate_seen(views[view], learner.logits, run.stream, seen, cfg.train.eval_batch_size,
                               learner.device, learner.precision.autocast)
        row.update(_record_view(run, view, task, step, scores))
    if learner.hippocampus is None:  # without a hippocampus the deployed system is the base
        row.update(_record_view(run, "system", task, step, _last_scores(run, "base", task)))
    return row


def _last_scores(run: Run, view: str, task: int) -> dict[int, TaskScore]:
    rows = [r for r in run.state.task_matrix_rows if r["view"] == view and r["boundary_index"] == task]
    return {r["task_id"]: TaskScore(r["token_acc"], r["loss"], r["n_tokens"], r["exact_match"], 0) for r in rows}


def _record_view(run: Run, view: str, task: int, step: int, scores: dict[int, TaskScore]) -> dict:
    matrix = run.matrices[view]
    matrix.record(task, [scores[j].token_acc for j in range(task + 1)], [scores[j].loss for j in range(task + 1)])
    out = {f"{view}/{k}": v for k, v in matrix.boundary_metrics(task).items()}
    out[f"{view}/uncovered_tasks"] = [run.stream.task_names[j] for j in matrix.uncovered(task)]
    for j, s in scores.items():
        name = run.stream.task_names[j]
        out.update({f"{view}/task_acc/{name}": s.token_acc, f"{view}/task_loss/{name}": s.loss,
                    f"{view}/task_tokens/{name}": s.n_tokens, f"{view}/task_exact/{name}": s.exact_match})
        run.state.task_matrix_rows.append({
            "boundary_index": task, "boundary_step": step, "view": view, "task_id": j, "task_name": name,
            "token_acc": s.token_acc, "loss": s.loss, "n_tokens": s.n_tokens, "exact_match": s.exact_match})
    return out


# ---- logging --------------------------------------------------------------------------------------------
def step_row(run: Run, step: int, task: int, wake: WakeOutcome, signals: PressureSignals, pressure: float,
             sleep: SleepReport, refresh: RefreshReport) -> dict:
    """One step's row; pressure and signals are the values the scheduler decided on (before a sleep reset)."""
    st, hip, replay = run.state, run.learner.hippocampus, run.replay
    row = {
        "kind": "step", "step": step, "task_id": task, "task_name": run.stream.task_names[task],
        "task_loss": wake.loss, "task_acc": wake.accuracy, "reward_mult": wake.reward_mult,
        "routing_reg": wake.routing_reg, "fast_update_applied": int(wake.applied and hip is not None),
        "batch_supervised_tokens": wake.supervised_tokens,
        "batch_supervised_fraction": wake.supervised_tokens / max(wake.batch_tokens, 1),
        "replay_size": len(replay) if replay else 0, "replay_added_this_step": wake.row_loss.numel() if replay and wake.applied else 0,
        "sleep_pressure": pressure, "saturation_ratio": signals.saturation,
        "novelty_rate": signals.novelty, "forgetting_index": signals.forgetting, "old_task_loss": st.old_task_loss,
        "sleep_count": st.sleep_count, "sleep_steps": sleep.steps,
        "expert_util_entropy": float(hip.utilization_entropy()) if hip is not None else 0.0,
        "refresh_count": refresh.refresh_count, "refresh_avg_kl": refresh.refresh_avg_kl,
        "non_finite_step_count": st.non_finite_step_count, "first_non_finite_step": st.first_non_finite_step,
        "non_finite_sleep_step_count": st.non_finite_sleep_step_count,
        "replay_bytes_per_episode": replay.bytes_per_episode() if replay else 0.0,
    }
    row.update({k: v for k, v in asdict(sleep).items() if k not in _LEDGER_ONLY})
    if run.learner.device.type == "cuda":
        row["cuda_mem_alloc_mb"] = torch.cuda.memory_allocated() / 2**20
        row["cuda_mem_reserved_mb"] = torch.cuda.memory_reserved() / 2**20
    return row


# sleep-report fields that go to the budget ledger (summary.json), not to every step row
_LEDGER_ONLY = {"steps", "gradient_rows", "forward_passes", "fisher_backwards", "hippocampal_replay_steps"}


def finish(run: Run, log: MetricsLog) -> dict:
    cfg, st = run.cfg, run.state
    summary = {
        "run": {"ablation": cfg.ablation_name, "seed": cfg.seed, "suite_name": cfg.suite_name,
                "benchmark": cfg.benchmark.name, "num_tasks": cfg.benchmark.num_tasks,
                "task_names": list(run.stream.task_names), "steps": total_steps(cfg)},
        "views": {v: run.matrices[v].summary() for v in VIEWS},
        "counters": {
            "sleep_count": st.sleep_count, "refresh_count_total": st.refresh_count_total,
            "base_updates_in_sleep": st.base_updates_in_sleep, "non_finite_step_count": st.non_finite_step_count,
            "first_non_finite_step": st.first_non_finite_step,
            "non_finite_sleep_step_count": st.non_finite_sleep_step_count,
            "replay_bytes_per_episode": run.replay.bytes_per_episode() if run.replay else 0.0,
            "replay_bytes_total": run.replay.bytes_total() if run.replay else 0,
            "replay_size": len(run.replay) if run.replay else 0,
        },
        "budget": _final_ledger(run),
        "sleep_log": st.sleep_log,  # [step, base steps, rows per step]: a matched baseline's sleep plan
    }
    for view in VIEWS:
        for key, value in summary["views"][view].items():
            if view == "system" and key in ("final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc"):
                summary[key] = value
    if _latest_saved_step(run) != st.step:  # every run ends on a task boundary, already saved: not again
        _save(run)
    if run.clock is not None:
        run.clock.lap()  # the last checkpoint write is part of the loop's wall time
    log.log({"kind": "summary", "step": st.step, **summary})
    timing = {"wall_time_s": round(st.wall_time_s, 3), "steps_per_s": round(st.step / max(st.wall_time_s, 1e-9), 3),
              "phase_s": {name: round(st.phase_s.get(name, 0.0), 3) for name in PHASES}}
    if run.learner.graphs is not None:  # train.cuda_graphs: how many step shapes were captured, how often replayed
        timing["cuda_graphs"] = run.learner.graphs.stats()
    write_task_matrix(run.run_dir / "task_matrix.csv", st.task_matrix_rows)
    write_json(run.run_dir / "run_metadata.json", _metadata(run, status="complete", timing=timing))
    write_glossary(run.run_dir)  # what every logged metric means, next to the metrics
    if run.wandb is not None:
        run.wandb.finish(summary, _run_files(run))  # the summary goes up as the W&B run summary
    write_json(run.run_dir / "summary.json", summary)  # last: its presence means the run completed
    return summary


def _final_ledger(run: Run) -> dict[str, int]:
    ledger = run.state.ledger
    ledger.buffer_episodes = len(run.replay) if run.replay else 0
    ledger.buffer_bytes = run.replay.bytes_total() if run.replay else 0
    return ledger.as_dict()


def load_sleep_plan(cfg: RunConfig) -> dict[int, tuple[int, int]] | None:
    """consolidation.sleep_plan: a completed run's summary.json -> {step: (base steps, rows per step)}.

    The matched baseline sleeps where that run slept, as many steps. Rows per step are scaled so that its
    base-gradient rows equal that run's base-gradient rows (``sleep_plan_match=base_rows``) or that run's
    fast + base gradient rows (``total_rows``), counting the baseline's own wake rows
    (steps x (batch_size + wake_mix), less the first step's empty replay). The ledger records the outcome."""
    path = cfg.consolidation.sleep_plan
    if path is None:
        return None
    file = Path(path)
    if not file.is_file():
        raise RunError(f"consolidation.sleep_plan={path}: no such file; point it at a completed run's summary.json "
                       f"(the pipeline runs the matched full_cls run first)")
    try:
        matched = json.loads(file.read_text())
        entries, budget = matched["sleep_log"], matched["budget"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunError(f"consolidation.sleep_plan={path} holds no sleep_log/budget ({type(exc).__name__}); rerun "
                       f"the matched run with this library version") from None
    target = budget["base_gradient_rows"] + (budget["fast_gradient_rows"]
                                             if cfg.consolidation.sleep_plan_match == "total_rows" else 0)
    own_wake = total_steps(cfg) * (cfg.train.batch_size + cfg.replay.wake_mix) - cfg.replay.wake_mix
    planned = sum(steps * rows for _, steps, rows in entries)
    scale = max(0.0, target - own_wake) / planned if planned else 0.0
    plan = {int(step): (int(steps), round(rows * scale)) for step, steps, rows in entries}
    return {step: (steps, rows) for step, (steps, rows) in plan.items() if steps > 0 and rows > 0}


def _run_files(run: Run) -> dict[str, Path]:
    d = run.run_dir
    files = {"config": d / "validated_config.json", "metadata": d / "run_metadata.json",
             "metrics": d / "metrics.jsonl", "task_matrix": d / "task_matrix.csv",
             "glossary_json": d / "metric_glossary.json", "glossary_md": d / "metric_glossary.md"}
    return {k: v for k, v in files.items() if v.exists()}


def _metadata(run: Run, status: str, timing: dict | None = None) -> dict:
    path = run.run_dir / "run_metadata.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    meta = {
        "status": status, "seed": run.cfg.seed, "ablation": run.cfg.ablation_name,
        "library": {"version": versions()["biollm_cls"], **library_commit()}, "versions": versions(),
        "device": str(run.learner.device), "device_facts": device_facts(),
        "start_time": previous.get("start_time", now()), "end_time": now() if status == "complete" else None,
        "neocortex": run.learner.neocortex.runtime_info(), "benchmark": run.stream.describe(),
        "amp": {"enabled": run.learner.precision.enabled, "dtype": str(run.learner.precision.dtype)},
    }
    if timing:
        meta["timing"] = timing
    return meta


# ---- checkpoint and resume ------------------------------------------------------------------------------
def _save(run: Run) -> None:
    with _phase(run, "checkpoint"):
        _save_checkpoint(run)


def _latest_saved_step(run: Run) -> int | None:
    """The step of the run's newest checkpoint (None: none yet). Perf: the boundary checkpoint of the last step
    holds the state the run ends with (only the ledger's buffer fields and timings are set after it, and a
    resume recomputes them), so the end of a run does not write the same multi-GB state a second time."""
    saved = list_checkpoints(run.run_dir)
    return checkpoint_step(saved[-1]) if saved else None


def _save_checkpoint(run: Run) -> None:
    learner, st = run.learner, run.state
    state = {
        "step": st.step, "run_state": asdict(st),
        "neocortex": learner.neocortex.state_dict(), "base_optimizer": learner.base_optimizer.state_dict(),
        "hippocampus": learner.hippocampus.state_dict() if learner.hippocampus is not None else None,
        "fast_optimizer": learner.fast_optimizer.state_dict() if learner.fast_optimizer is not None else None,
        "scaler": learner.precision.scaler.state_dict() if learner.precision.scaler is not None else None,
        "replay": run.replay.state_dict() if run.replay is not None else None,
        "ewc": run.ewc.state_dict(), "scheduler": run.scheduler.state_dict(),
        "matrices": {v: m.state_dict() for v, m in run.matrices.items()},
        "generator": run.generator.get_state(), "torch_rng": torch.get_rng_state(),
        "recent": [asdict(b) for b in run.recent],
    }
    path = save_checkpoint(state, run.run_dir, st.step, run.cfg.logging.checkpoint_keep_last)
    if run.wandb is not None:
        run.wandb.log_checkpoint(path, st.step)


# A run directory holds these (and the pipeline's per-run tables/): `restart_stale` deletes nothing else.
RUN_FILES = ("validated_config.json", "run_metadata.json", "metrics.jsonl", "summary.json", "task_matrix.csv",
             "metric_glossary.json", "metric_glossary.md", "checkpoints", "wandb", "tables")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _config_changes(run_dir: Path, cfg: RunConfig) -> list[str] | None:
    """The top-level config keys in which `run_dir`'s validated_config.json differs from `cfg` (None: unreadable)."""
    try:
        saved = json.loads((run_dir / "validated_config.json").read_text())
    except (OSError, ValueError):
        return None
    current = json.loads(json.dumps(to_dict(cfg)))
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def _inputs(cfg: RunConfig) -> list[Path]:
    """The files a run reads (data, base checkpoint, sleep plan), where set."""
    paths = (cfg.benchmark.local_path, cfg.benchmark.eval_local_path, cfg.model.init_checkpoint,
             cfg.consolidation.sleep_plan)
    return [Path(p) for p in paths if p and Path(p).is_file()]


def stale_reason(run_dir: Path, cfg: RunConfig) -> str | None:
    """Why this command must not resume `run_dir` (None: it may, or there is nothing to resume).

    A resumed run equals an uninterrupted one only when the same config, the same library and the same inputs
    produce both halves, so a directory is stale when it holds a completed run (summary.json, or
    run_metadata.json status complete: summary.json removed by a forced rerun), a run of another config, of
    another library version or commit, or one older than an input file (rebuilt since it started), or when
    none of its checkpoints is intact. Raises RunError for a non-empty directory that holds no run."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    if not any((run_dir / name).exists() for name in RUN_FILES):
        raise RunError(f"{run_dir} is not empty and holds no run (no validated_config.json, checkpoints/, ...); "
                       f"refusing to delete it: choose another logging.output_dir (or remove that folder)")
    if (run_dir / "summary.json").exists():
        return "it holds a completed run (summary.json)"
    try:
        meta = json.loads((run_dir / "run_metadata.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not list_checkpoints(run_dir):
        return "it holds no checkpoint to resume from"
    if meta is None:
        return "its run_metadata.json is missing or unreadable"
    if meta.get("status") == "complete":
        return "its run completed (run_metadata.json) and summary.json was removed (a forced rerun)"
    changes = _config_changes(run_dir, cfg)
    if changes is None:
        return "its validated_config.json is missing or unreadable"
    if changes:
        return f"its config differs in: {', '.join(changes)}"
    then = meta.get("library") or {}
    here = {"version": versions()["biollm_cls"], **library_commit()}
    for key in ("version", "git_commit"):
        if "unknown" not in (then.get(key), here[key]) and then.get(key) != here[key]:
            return f"it was started by another library {key} ({then.get(key)}; this is {here[key]})"
    started = (run_dir / "validated_config.json").stat().st_mtime
    newer = [str(p) for p in _inputs(cfg) if p.stat().st_mtime > started]
    if newer:
        return f"an input changed after it started ({', '.join(newer)})"
    if all(checkpoint_problem(path) is not None for path in list_checkpoints(run_dir)):
        return "none of its checkpoints is intact"
    return None


def _resume(run: Run) -> None:
    changes = _config_changes(run.run_dir, run.cfg)
    if changes is None:
        raise RunError(f"{run.run_dir} holds checkpoints but no readable validated_config.json (checkpoints "
                       f"copied from another run?); use another logging.output_dir or delete that directory")
    if changes:
        raise RunError(f"{run.run_dir} holds a run with a different config (differs in: {', '.join(changes)}); "
                       f"use another logging.output_dir")
    warnings: list[str] = []
    try:  # falls back past a torn newest checkpoint, with one warning line that says so
        path, state = load_latest_checkpoint(run.run_dir, run.learner.device, warn=warnings.append)
    except CheckpointError as exc:
        raise RunError(str(exc)) from None
    if warnings:
        print(f"warning: {warnings[0]}", file=sys.stderr, flush=True)
    else:
        _note(f"resuming {run.run_dir} from {path.name} (step {state['step']} of {total_steps(run.cfg)}); "
              f"the steps after it are recomputed")
    learner = run.learner
    learner.neocortex.load_state_dict(state["neocortex"])
    learner.base_optimizer.load_state_dict(state["base_optimizer"])
    if learner.hippocampus is not None:
        learner.hippocampus.load_state_dict(state["hippocampus"])
        learner.fast_optimizer.load_state_dict(state["fast_optimizer"])
    if learner.precision.scaler is not None and state["scaler"]:
        learner.precision.scaler.load_state_dict(state["scaler"])
    if run.replay is not None:
        run.replay.load_state_dict(state["replay"])
    run.ewc.load_state_dict(state["ewc"])
    learner.restored()
    run.scheduler.load_state_dict(state["scheduler"])
    run.matrices = {v: ContinualMatrix.from_state_dict(m) for v, m in state["matrices"].items()}
    run.generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    run.recent = [Batch(**{k: t.cpu() for k, t in b.items()}) for b in state["recent"]]
    run.state = RunState(**state["run_state"])
    run.state.ledger = BudgetLedger(**run.state.ledger)
