"""The metric glossary: one row per metric a run logs, with its meaning, unit and good direction.

Every key of ``metrics.jsonl`` (``step`` and ``boundary`` rows), of ``summary.json`` and of the suite
dashboard has a row here. Per-view and per-task keys are written as templates: ``<view>`` is ``system``
(base + hippocampus, as deployed) or ``base`` (the consolidated neocortex alone) and ``<task>`` is a task
name, so ``system/task_acc/sort_words`` is described by ``<view>/task_acc/<task>``.

Scopes: ``step`` (one value per logged wake step), ``sleep`` (a value of the sleep cycle, and the refresh
after it, that ran at this step; on the step row, 0 on steps without sleep), ``boundary`` (one value per
task boundary), ``summary`` (once per run: ``summary.json``, flattened with ``/``) and ``suite`` (the
dashboard's aggregates over runs).
Directions: ``higher`` / ``lower`` is better, ``neutral`` is a diagnostic with no better side.

In W&B charts a step metric ``k`` appears as ``core/k``, a sleep metric as ``core/k`` on the steps that
slept only, and a boundary metric ``k`` as ``boundary/k`` (``boundary/system/task_acc/<task>``); text
values and summary metrics go to the run summary (``views/<view>/...``, ``counters/...``). See
``docs/wandb.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

VIEWS = ("system", "base")
PER_TASK = ("task_acc", "task_loss", "task_tokens", "task_exact")
SCOPES = ("step", "sleep", "boundary", "summary", "suite")
COLUMNS = ("metric", "scope", "direction", "unit", "definition", "formula")
JSON_NAME = "metric_glossary.json"
MD_NAME = "metric_glossary.md"


@dataclass(frozen=True)
class MetricDef:
    """One glossary row."""

    metric: str
    scope: str  # step | sleep | boundary | summary | suite
    direction: str  # higher | lower | neutral
    unit: str  # "string" marks a text value (W&B: run summary, never a chart)
    definition: str
    formula: str = ""


_M = MetricDef

_STEP = (
    _M("step", "step", "neutral", "step", "Wake step index (1-based); the x-axis of every chart.", ""),
    _M("task_id", "step", "neutral", "id", "Index of the task the stream is on at this step (training order).", ""),
    _M("task_name", "step", "neutral", "string", "Name of the task the stream is on at this step.", ""),
    _M("task_loss", "step", "lower", "nats/token",
       "Cross-entropy of the system (base + hippocampal delta) on this wake batch before its update, averaged "
       "over supervised target tokens (target -100 ignored; rows mixed in from replay by `er` included).",
       "sum_{supervised t} -log p_system(y_t | x_<t) / N_supervised"),
    _M("task_acc", "step", "higher", "fraction",
       "Token accuracy (argmax) of the system on this wake batch's supervised tokens, before its update.",
       "correct supervised tokens / N_supervised"),
    _M("reward_mult", "step", "neutral", "factor",
       "Learning-rate multiplier of the hippocampus for this step from the correctness reward "
       "(1 when train.reward_from_correctness=false).", "clip(1 + reward_alpha * (2*task_acc - 1), 0.25, 2)"),
    _M("routing_reg", "step", "lower", "ratio",
       "Switch-Transformer load-balancing loss of the router on this batch, weighted by "
       "experts.routing_reg_weight in the wake loss; 1 when routing is perfectly balanced (0 without a hippocampus).",
       "E * sum_e f_e * P_e (f_e: share of top-k selections, P_e: mean router probability)"),
    _M("fast_update_applied", "step", "neutral", "0/1",
       "1 when the hippocampus (fast learner) took an optimizer step; 0 when it is disabled or the loss was "
       "non-finite.", ""),
    _M("batch_supervised_tokens", "step", "neutral", "tokens",
       "Supervised target tokens (target != -100) in this wake batch.", "sum_{b,t} [y_bt != -100]"),
    _M("batch_supervised_fraction", "step", "neutral", "fraction",
       "Supervised target tokens over all B*T positions of the wake batch.", "batch_supervised_tokens / (B*T)"),
    _M("replay_size", "step", "neutral", "episodes", "Episodes in the replay reservoir after this step.", ""),
    _M("replay_added_this_step", "step", "neutral", "episodes",
       "New stream sequences offered to the reservoir this step (reservoir sampling may drop them); "
       "0 when the run keeps no replay.", ""),
    _M("replay_bytes_per_episode", "step", "lower", "bytes",
       "Mean stored size of one replay episode (inputs, targets, routing and top-k teacher).", ""),
    _M("sleep_pressure", "step", "neutral", "[0, 1]",
       "Scheduler pressure after this step's update: an EMA of the weighted mean of the saturation, "
       "forgetting and novelty signals; 0 right after a sleep. Sleep starts when it reaches "
       "scheduler.pressure_threshold (after sleep_min_interval steps; always after sleep_max_interval).",
       "p <- d*p + (1-d) * (w_s*sat + w_f*forget + w_n*novelty) / (w_s + w_f + w_n)"),
    _M("saturation_ratio", "step", "neutral", "fraction",
       "Fraction of experts whose capacity score exceeds experts.saturation_threshold (a pressure signal); "
       "capacity = half load (usage vs. twice the fair share), half drift from the initial weights.",
       "mean_e [0.5*(min(1, E*usage_e/2) + 1 - exp(-drift_e/drift_scale)) > threshold]"),
    _M("novelty_rate", "step", "neutral", "[0, 1]",
       "Novelty pressure signal: total-variation distance between this batch's expert-routing shares and "
       "their running average, or the relative rise of the wake loss over its running average if larger.",
       "max(0.5 * sum_e |share_e - ema_e|, clip((loss - loss_ema) / loss_ema, 0, 1))"),
    _M("forgetting_index", "step", "lower", "[0, 1]",
       "Forgetting pressure signal: mean rise of the system's per-token loss on a replay probe of seen, "
       "non-current tasks over the loss each episode had when experienced, over scheduler.forgetting_scale, "
       "clipped; refreshed every scheduler.probe_interval steps (0 in runs without sleep).",
       "clip(mean_episodes max(0, loss_now - loss_then) / forgetting_scale, 0, 1)"),
    _M("old_task_loss", "step", "lower", "nats/token",
       "System loss on the last replay probe of seen, non-current tasks (mean over episodes of the per-token "
       "loss); null before the first probe and in runs without sleep.", ""),
    _M("sleep_count", "step", "neutral", "count", "Cumulative number of sleep cycles so far.", ""),
    _M("sleep_steps", "step", "neutral", "steps",
       "Base (neocortex) updates applied in this step's sleep cycle (0 on steps without sleep).", ""),
    _M("expert_util_entropy", "step", "higher", "nats",
       "Shannon entropy of the experts' usage (EMA of routing mass): log(E) = perfectly even use, 0 = one "
       "expert (0 without a hippocampus).", "-sum_e u_e log u_e"),
    _M("non_finite_step_count", "step", "lower", "count",
       "Running count of wake steps whose loss was NaN/Inf (their update was skipped).", ""),
    _M("first_non_finite_step", "step", "neutral", "step",
       "First wake step with a NaN/Inf loss; -1 while there has been none.", ""),
    _M("non_finite_sleep_step_count", "step", "lower", "count",
       "Running count of sleep (consolidation) updates whose loss was NaN/Inf (skipped; see skipped_steps).", ""),
    _M("cuda_mem_alloc_mb", "step", "lower", "MiB", "CUDA memory held by tensors (CUDA runs only).", ""),
    _M("cuda_mem_reserved_mb", "step", "lower", "MiB",
       "CUDA memory reserved by the caching allocator (CUDA runs only).", ""),
)

# Values of this step's sleep cycle (and the refresh after it). On the step rows of metrics.jsonl they
# are 0 on steps without sleep; the W&B charts (core/*) only get them on steps that slept.
_SLEEP = (
    _M("distill_kl", "sleep", "lower", "nats/token",
       "Distillation divergence KL(teacher || base) of the sleep updates, teacher = the system's top-k "
       "distribution (stored at wake or recomputed), summed over the teacher's k tokens and averaged over "
       "supervised positions (per token, not summed over T); mean over the cycle's applied steps.",
       "mean_steps mean_t sum_{v in topk} p_T(v) (log p_T(v) - log p_base(v)) * temperature^2"),
    _M("distill_kl_before", "sleep", "lower", "nats/token",
       "Per-token KL(teacher || base) on a fixed replay probe right before the cycle (eval mode).", ""),
    _M("distill_kl_after", "sleep", "lower", "nats/token",
       "The same probe KL right after the cycle; below distill_kl_before = the base moved toward the system "
       "(only then does refresh run).", ""),
    _M("target_ce", "sleep", "lower", "nats/token",
       "Cross-entropy of the base on the stored ground-truth targets of the replay rows (0 when "
       "consolidation.target_ce_weight = 0); mean over the cycle's steps.", ""),
    _M("distill_loss", "sleep", "lower", "nats/token",
       "Sleep objective without the EWC term; mean over the cycle's applied steps.",
       "distill_kl + target_ce_weight * target_ce"),
    _M("ewc_penalty", "sleep", "neutral", "loss",
       "Online-EWC penalty of the base at the end of the cycle (0 when ewc.lambda_=0 or before the first "
       "Fisher). A constraint, not an objective: lower only means the base stayed closer to its anchor.",
       "lambda/2 * sum_i F_i (theta_i - theta*_i)^2"),
    _M("pseudo_batch_size", "sleep", "neutral", "sequences",
       "Pseudo-rehearsal sequences per sleep batch (mean over the cycle).", "max(1, round(R * pseudo_ratio))"),
    _M("replay_batch_size_sleep", "sleep", "neutral", "sequences",
       "Replay episodes R per sleep batch (mean over the cycle).", ""),
    _M("sleep_mix_ratio_pseudo", "sleep", "neutral", "fraction",
       "Pseudo sequences over all sequences of the cycle's batches.", "sum pseudo / sum (replay + pseudo)"),
    _M("fisher_replay_samples", "sleep", "neutral", "sequences",
       "Replay sequences in the Fisher estimate after the cycle.", ""),
    _M("fisher_pseudo_samples", "sleep", "neutral", "sequences",
       "Pseudo (random-token or echo) sequences in the Fisher estimate after the cycle.", ""),
    _M("fisher_source_mode", "sleep", "neutral", "string",
       "Data of the Fisher estimate: replay_only, mixed_replay_pseudo, or none (no EWC).", ""),
    _M("pseudo_source_mode", "sleep", "neutral", "string",
       "Pseudo-rehearsal source of the cycle: mixed, replay_echo, random_tokens, or off.", ""),
    _M("skipped_steps", "sleep", "lower", "steps", "Sleep updates skipped because their loss was NaN/Inf.", ""),
    _M("refresh_count", "sleep", "neutral", "count",
       "Experts partially reset by the refresh after this sleep (absorbed by the base).", ""),
    _M("refresh_avg_kl", "sleep", "neutral", "nats/token",
       "Mean over the tested experts of the per-token KL(base + expert || base) on each expert's own "
       "routed replay episodes (eval mode); an expert below consolidation.refresh.kl_threshold is reset.",
       "mean_e mean_t sum_v p_{base+e}(v) (log p_{base+e}(v) - log p_base(v))"),
)

_BOUNDARY = (
    _M("boundary_index", "boundary", "neutral", "index",
       "0-based index of the task boundary (boundary i follows the i-th task of the stream).", ""),
    _M("boundary_step", "boundary", "neutral", "step", "Wake step at which the boundary evaluation ran.", ""),
    _M("task_id", "boundary", "neutral", "id", "Id of the task just completed.", ""),
    _M("task_name", "boundary", "neutral", "string", "Name of the task just completed.", ""),
    _M("tasks_completed", "boundary", "neutral", "count", "Tasks trained so far (i + 1 at boundary i).", ""),
    _M("<view>/seen_acc_avg", "boundary", "higher", "fraction",
       "Mean held-out token accuracy over the tasks seen so far, in this view; uncovered tasks are skipped.",
       "mean_{j<=i} A[i][j]"),
    _M("<view>/seen_loss_avg", "boundary", "lower", "nats/token",
       "Mean held-out per-token cross-entropy over the tasks seen so far, in this view.", "mean_{j<=i} L[i][j]"),
    _M("<view>/forgetting", "boundary", "lower", "fraction",
       "Average forgetting: how far each earlier task's accuracy has fallen below its best earlier value "
       "(0 at the first boundary; can be negative).", "mean_{j<i} (max_{j<=k<i} A[k][j] - A[i][j])"),
    _M("<view>/bwt", "boundary", "higher", "fraction",
       "Backward transfer: accuracy on earlier tasks now minus right after learning them (negative = forgetting).",
       "mean_{j<i} (A[i][j] - A[j][j])"),
    _M("<view>/plasticity", "boundary", "higher", "fraction",
       "Mean accuracy on each task right after learning it, up to this boundary.", "mean_{k<=i} A[k][k]"),
    _M("<view>/task_acc/<task>", "boundary", "higher", "fraction",
       "Held-out token accuracy (teacher-forced argmax) on this task; null when it has no held-out tokens.",
       "correct supervised tokens / supervised tokens"),
    _M("<view>/task_loss/<task>", "boundary", "lower", "nats/token",
       "Held-out per-token cross-entropy on this task (teacher-forced, supervised tokens only).",
       "sum_t -log p(y_t) / N_tokens"),
    _M("<view>/task_tokens/<task>", "boundary", "neutral", "tokens",
       "Number of held-out supervised tokens scored for this task (0 = uncovered).", ""),
    _M("<view>/task_exact/<task>", "boundary", "higher", "fraction",
       "Held-out sequence exact match: fraction of sequences whose every supervised token is right.", ""),
    _M("<view>/uncovered_tasks", "boundary", "neutral", "string",
       "Seen tasks with no held-out tokens; their scores are null and every mean skips them.", ""),
)

_SUMMARY = (
    _M("final_seen_acc_avg", "summary", "higher", "fraction",
       "<view>/seen_acc_avg at the last boundary (the flat key repeats the system view).", ""),
    _M("final_forgetting", "summary", "lower", "fraction", "<view>/forgetting at the last boundary (system).", ""),
    _M("final_bwt", "summary", "higher", "fraction", "<view>/bwt at the last boundary (system).", ""),
    _M("seen_acc_auc", "summary", "higher", "fraction",
       "Normalised area under the seen_acc_avg curve over boundaries (system; the value itself when n = 1).",
       "trapezoid(seen_acc_avg_0..n-1, dx=1) / (n-1)"),
    _M("views/<view>/final_seen_acc_avg", "summary", "higher", "fraction", "seen_acc_avg at the last boundary.", ""),
    _M("views/<view>/final_seen_loss_avg", "summary", "lower", "nats/token",
       "seen_loss_avg at the last boundary.", ""),
    _M("views/<view>/final_forgetting", "summary", "lower", "fraction", "forgetting at the last boundary.", ""),
    _M("views/<view>/final_bwt", "summary", "higher", "fraction", "bwt at the last boundary.", ""),
    _M("views/<view>/seen_acc_auc", "summary", "higher", "fraction",
       "Normalised area under this view's seen_acc_avg curve.", "trapezoid(seen_acc_avg_0..n-1, dx=1) / (n-1)"),
    _M("views/<view>/plasticity", "summary", "higher", "fraction",
       "Mean accuracy on each task right after learning it.", "mean_i A[i][i]"),
    _M("views/<view>/tasks_completed", "summary", "neutral", "count", "Boundaries recorded in this view.", ""),
    _M("views/<view>/uncovered_tasks", "summary", "neutral", "string",
       "Task indices without held-out tokens at the last boundary (skipped by every mean).", ""),
    _M("counters/sleep_count", "summary", "neutral", "count", "Sleep cycles in the run.", ""),
    _M("counters/refresh_count_total", "summary", "neutral", "count", "Expert resets in the run.", ""),
    _M("counters/base_updates_in_sleep", "summary", "neutral", "steps", "Base updates applied during sleep.", ""),
    _M("counters/non_finite_step_count", "summary", "lower", "count", "Wake steps with a NaN/Inf loss.", ""),
    _M("counters/first_non_finite_step", "summary", "neutral", "step", "First such step; -1 if none.", ""),
    _M("counters/non_finite_sleep_step_count", "summary", "lower", "count",
       "Sleep updates skipped because their loss was NaN/Inf.", ""),
    _M("counters/replay_bytes_per_episode", "summary", "lower", "bytes", "Mean stored size of an episode.", ""),
    _M("counters/replay_bytes_total", "summary", "lower", "bytes", "Replay reservoir size at the end.", ""),
    _M("counters/replay_size", "summary", "neutral", "episodes", "Episodes in the reservoir at the end.", ""),
    _M("counters/wall_time_s", "summary", "lower", "s",
       "Wall time of the training loop, from the first step to the last checkpoint (run_metadata.json timing; a "
       "counter of the suite tables).", ""),
    _M("counters/steps_per_s", "summary", "higher", "steps/s", "Wake steps per second of wall time.", ""),
    # run_metadata.json timing.phase_s: the loop's wall time by phase (train.PhaseClock); they add up to wall_time_s
    _M("timing/phase_s/wake", "summary", "lower", "s",
       "Wall time of the wake phase: batch assembly, wake steps, replay insertion, sleep pressure with its "
       "forgetting probes, step rows (everything outside the other phases).", ""),
    _M("timing/phase_s/sleep", "summary", "lower", "s",
       "Wall time of the sleep consolidation updates (pseudo-rehearsal teachers included, the Fisher not).", ""),
    _M("timing/phase_s/fisher", "summary", "lower", "s",
       "Wall time of the online-EWC Fisher estimates (after each sleep; at each boundary for ewc_only).", ""),
    _M("timing/phase_s/refresh", "summary", "lower", "s", "Wall time of the expert tests and resets after sleeps.", ""),
    _M("timing/phase_s/evaluation", "summary", "lower", "s",
       "Wall time of the boundary evaluations of both views (a boundary Fisher not included).", ""),
    _M("timing/phase_s/checkpoint", "summary", "lower", "s", "Wall time of the checkpoint writes.", ""),
)

_SUITE = (
    _M("mean", "suite", "neutral", "as metric", "Mean of a summary metric over seeds of one ablation and view "
       "(runs with a missing or NaN value are left out, never counted as 0).", "sum x / n"),
    _M("std", "suite", "neutral", "as metric", "Sample standard deviation over seeds (ddof=1; empty when n < 2).", ""),
    _M("n", "suite", "neutral", "runs", "Runs with a finite value that entered the mean.", ""),
    _M("delta", "suite", "neutral", "as metric",
       "Paired per-seed difference baseline_a - baseline_b of one summary metric (same seed and view); its "
       "direction is that of the metric.", "x_a(seed) - x_b(seed)"),
)

GLOSSARY: tuple[MetricDef, ...] = _STEP + _SLEEP + _BOUNDARY + _SUMMARY + _SUITE
_INDEX: dict[tuple[str, str], MetricDef] = {(m.scope, m.metric): m for m in GLOSSARY}


def template_of(key: str) -> str:
    """The glossary name of a concrete key: ``base/task_acc/t0`` -> ``<view>/task_acc/<task>``."""
    head, parts = ([], key.split("/"))
    if parts[0] == "views":  # summary.json: views/<view>/...
        head, parts = ["views"], parts[1:]
    if parts and parts[0] in VIEWS:
        parts[0] = "<view>"
        if len(parts) >= 3 and parts[1] in PER_TASK:
            parts = parts[:2] + ["<task>"]
    return "/".join(head + parts)


def lookup(key: str, scopes: tuple[str, ...] = ("step", "sleep", "boundary", "summary")) -> MetricDef | None:
    """The glossary row of a logged key in the first of ``scopes`` that documents it, else None."""
    name = template_of(key)
    return next((_INDEX[(s, name)] for s in scopes if (s, name) in _INDEX), None)


def names(*scopes: str) -> frozenset[str]:
    """Glossary metric names of the given scopes."""
    return frozenset(m.metric for m in GLOSSARY if m.scope in scopes)


def glossary_rows() -> list[dict[str, str]]:
    """The glossary as plain dicts with the columns of ``COLUMNS``."""
    return [asdict(m) for m in GLOSSARY]


def to_markdown(rows: list[dict[str, str]] | None = None) -> str:
    """A markdown table of the glossary, preceded by the module's explanation of scopes and namespaces."""
    rows = glossary_rows() if rows is None else rows
    lines = ["# Metric glossary", "", (__doc__ or "").strip(), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [str(row[c]).replace("|", "\\|") for c in COLUMNS]
        lines.append("| " + " | ".join(f"`{cells[0]}`" if i == 0 else c for i, c in enumerate(cells)) + " |")
    return "\n".join(lines) + "\n"


def write_glossary(directory: str | Path) -> tuple[Path, Path]:
    """Write ``metric_glossary.json`` and ``metric_glossary.md`` into ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = glossary_rows()
    json_path, md_path = directory / JSON_NAME, directory / MD_NAME
    json_path.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(to_markdown(rows), encoding="utf-8")
    return json_path, md_path


def wandb_table(wandb: Any) -> Any:
    """The glossary as a ``wandb.Table`` (``wandb`` is the imported module, passed in to keep imports lazy)."""
    return wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in glossary_rows()])


def wandb_artifact(wandb: Any, json_path: Path, md_path: Path, name: str = "metric-glossary") -> Any:
    """A W&B artifact (type ``metadata``) holding the glossary files and its table."""
    artifact = wandb.Artifact(name, type="metadata", description="Definitions of every metric a run logs.")
    artifact.add_file(str(json_path), name=JSON_NAME)
    artifact.add_file(str(md_path), name=MD_NAME)
    artifact.add(wandb_table(wandb), "metric_glossary")
    return artifact
