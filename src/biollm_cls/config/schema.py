"""Typed configuration of one run.

Every key a run reads lives in these dataclasses; the YAML presets under ``conf/`` only choose values.
The composed YAML is merged onto ``OmegaConf.structured(RunConfig)``, so an unknown key or a value of
the wrong type fails once, at load time, before anything is written (see ``config.load``).
Cross-field rules live in ``validate`` below and raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line (exit code 2)."""


@dataclass
class ModelConfig:
    provider: str = "tiny"  # tiny | hf
    vocab_size: int = 64  # tiny: vocabulary size. hf: 0 = the model's whole vocabulary, N = the first N ids
    hidden_size: int = 64  # tiny width
    num_layers: int = 4  # tiny depth
    num_heads: int = 4
    seq_len: int = 32  # tokens per sequence (also the tiny positional table size)
    dropout: float = 0.0
    injection_layer: int = 1  # tiny: index of the last block run before the hippocampal delta is added
    init_checkpoint: str | None = None  # tiny: start the base from this `pretrain` checkpoint
    hf_model_name: str | None = None
    hf_revision: str | None = None
    hf_trust_remote_code: bool = False
    hf_torch_dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (weights of a trained base stay fp32 unless allowed)
    hf_allow_half_precision_base: bool = False  # opt in to half-precision weights for a base that trains
    hf_attn_implementation: str | None = None
    hf_gradient_checkpointing: bool = False
    # False: the model runs pure-causal attention and only the hippocampus sees the mask. Every batch is
    # right-padded (a causal query never sees a later pad key), so every real position is unchanged, and SDPA
    # can use its flash kernel without a host sync per forward. True: the [B,T] mask goes to the model.
    hf_pass_attention_mask: bool = False
    hf_local_files_only: bool = False
    hf_injection_fraction: float = 0.7
    hf_allow_legacy_injection_fallback: bool = True


@dataclass
class BenchmarkConfig:
    name: str = "toy"  # toy | instruction
    switch_every: int = 100  # wake steps per task
    num_tasks: int = 4
    order: str = "sequential"  # sequential | joint (all tasks shuffled together: the `joint` upper bound)
    heldout_size: int = 64  # toy: held-out sequences per task
    task_cue: bool = True  # toy: first token names the task, so tasks are separable in principle
    dataset_name: str | None = None
    dataset_config: str | None = None
    dataset_split: str = "train"
    local_path: str | None = None
    eval_local_path: str | None = None
    prompt_field: str = "instruction"
    response_field: str = "output"
    task_field: str | None = "task"
    task_selection_seed: int = 42
    max_examples: int = 0  # 0 = all
    min_examples_per_task: int = 32
    heldout_per_task: int = 32
    tokenizer_name: str | None = None  # hf: tokenizer id/path (default: the model's). tiny: ignored (bytes)
    tokenizer_trust_remote_code: bool = False
    ignore_prompt_loss: bool = True
    prompt_template: str = "### Instruction:\n{prompt}\n\n### Response:\n"
    verify_checksums: bool = True  # refuse a pack whose files do not match metadata.json


@dataclass
class ExpertsConfig:
    num_experts: int = 8
    expert_hidden: int = 128
    top_k: int = 2
    routing: str = "sequence"  # sequence (pooled over non-padding positions) | token
    fast_lr: float = 1e-2
    reward_alpha: float = 0.5
    routing_reg_weight: float = 0.01
    utilization_bonus: float = 0.1
    capacity_penalty: float = 0.1
    saturation_threshold: float = 0.7
    usage_decay: float = 0.99  # EMA decay of expert usage per wake step (recent load, not all history)
    drift_scale: float = 1.0  # drift (L2 from init) at which the drift score reaches 1 - 1/e


@dataclass
class ReplayConfig:
    capacity: int = 2000  # episodes in memory, in all (the short-term store below included)
    # > 0: the episodes since the last sleep are kept in full in a short-term store of this many episodes
    # (part of `capacity`), so sleep can replay every one of them (consolidation.recent_fraction); they move
    # on to the long-term reservoir when the sleep ends. 0 = one reservoir, which late in a stream keeps
    # only capacity/seen of the new episodes.
    recent_capacity: int = 0
    batch_size: int = 32
    teacher: str = "stored_topk"  # stored_topk | recompute
    teacher_topk: int = 8  # logits kept per supervised position when teacher=stored_topk
    wake_mix: int = 0  # replay episodes mixed into every wake batch (the learner's and the `er` baselines')
    wake_distill_weight: float = 0.0  # DER++: KL(stored top-k teacher || system) on the replayed wake rows


@dataclass
class RefreshConfig:
    kl_threshold: float = 0.3  # per-token KL(stored teacher || base) on the expert's episodes, nats: absorbed below
    reset_factor: float = 0.1  # keep this fraction of the learned deviation; >= 1 disables refresh
    samples_per_expert: int = 8


@dataclass
class ConsolidationConfig:
    slow_lr: float = 1e-3
    wake_base_lr_scale: float = 0.0  # > 0: wake also trains the base at slow_lr * scale
    sleep_min_interval: int = 50
    sleep_max_interval: int = 200
    min_sleep_steps: int = 10
    max_sleep_steps: int = 40
    pseudo_rehearsal: bool = True
    pseudo_ratio: float = 0.25
    pseudo_source: str = "mixed"  # mixed | replay_echo | random_tokens
    pseudo_random_fraction: float = 0.5
    fisher_use_capability_mix: bool = True
    target_ce_weight: float = 0.0  # weight of CE on the stored ground-truth targets during sleep
    # fraction of each sleep batch drawn from the episodes experienced since the last sleep (the rest: the
    # whole reservoir). Hippocampal replay favours recent memories; 0 = uniform over the reservoir
    recent_fraction: float = 0.0
    distill_weight: float = 1.0  # weight of the top-k KL to the teacher during sleep; 0 = ground truth only
    # `er_matched`: a full_cls run's summary.json; sleep then happens exactly where that run slept, for as many
    # steps, so the baseline gets the same base-gradient budget (the learner's own scheduler is not used)
    sleep_plan: str | None = None
    # what the plan matches: base_rows (extra replay steps until the base-gradient rows equal that run's) or
    # total_rows (that run's fast + base gradient rows all go to the base)
    sleep_plan_match: str = "base_rows"
    distill_temperature: float = 1.0
    # which replayed tokens sleep distils: all (none), or only those where the stored teacher gives the gold
    # token more probability than the base does (teacher_better, CLS-ER's choice of target): a teacher stored
    # while the task was new can be worse than the base that has consolidated it since. Pseudo rows: always.
    distill_gate: str = "none"
    hippocampal_replay: bool = False  # the hippocampus also relearns each sleep batch on the consolidated base
    refresh: RefreshConfig = field(default_factory=RefreshConfig)


@dataclass
class EWCConfig:
    lambda_: float = 1.0  # the tiny toy: 100 (the reference) froze the base after its first sleep
    fisher_decay: float = 0.9  # online EWC: F <- decay * F + F_new, once per consolidation
    fisher_samples: int = 64  # sequences used to estimate the Fisher
    fisher_update: str = "sleep"  # sleep (after each sleep) | boundary (at each task boundary: `ewc_only`)
    # fp32 | bf16 (half the Fisher's memory, rounded to 0.4 %) | fp8 (a quarter: e4m3 with a per-row scale,
    # rounded to 6.25 %, values below ~2^-18 of their row's largest dropped; ewc.py)
    fisher_dtype: str = "fp32"
    # fp32 | bf16: the linear layers' anchors in bf16 (half their memory), exact: the consolidated linear
    # weights are rounded to bf16 first, which under bf16 autocast changes no output (ewc.py)
    anchor_dtype: str = "fp32"


@dataclass
class SchedulerConfig:
    saturation_weight: float = 0.4
    forgetting_weight: float = 0.4
    novelty_weight: float = 0.2
    pressure_threshold: float = 0.5
    pressure_decay: float = 0.9  # pressure is an EMA of the weighted signals (integrated, not instantaneous)
    novelty_decay: float = 0.98  # slow EMA that novelty compares recent routing (and loss) against
    forgetting_scale: float = 1.0  # nats of replay-probe loss increase that count as full forgetting
    probe_interval: int = 25  # wake steps between replay-probe forgetting measurements
    probe_size: int = 32  # replay episodes of seen, non-current tasks in the probe


@dataclass
class TrainConfig:
    batch_size: int = 16
    max_steps: int = 0  # 0 = num_tasks * switch_every; any other value must equal it
    eval_interval: int = 100
    eval_batch_size: int = 64
    ablation_no_sleep: bool = False
    ablation_disable_hippocampus: bool = False
    reward_from_correctness: bool = True
    amp_enabled: bool = True  # only on CUDA
    amp_dtype: str = "bf16"  # bf16 | fp16
    allow_tf32: bool = True
    matmul_precision: str = "high"
    compile_model: bool = False
    # what compile_model compiles: layers = each decoder layer alone (regional: one compiled layer serves all,
    # compiles in about a minute); trunk = the neocortex's whole forward, embeddings to final norm, one graph
    # per view with the injection and the hippocampus traced in. Measured (bench/RESULTS_notes.md, H200,
    # Qwen-0.5B shape, 4x256): trunk made sleep ~5 % and sleep+pseudo ~12 % faster but took ~9 min of compiling
    # per process (the Fisher pass alone 62 s), so layers is the default
    compile_scope: str = "layers"
    # torch.compile's mode for compile_model: default | max-autotune-no-cudagraphs (autotuned kernels, longer
    # compiles). Not reduce-overhead: CUDA graphs of each compiled layer fail (measured, H200): a layer's output,
    # the next layer's input, is overwritten by that next replay of the same graph (bench/RESULTS_notes.md);
    # train.cuda_graphs captures whole steps instead
    compile_mode: str = "default"
    # CUDA only: capture whole wake steps (those that train only the hippocampus) and sleep steps as CUDA graphs
    # and replay them (src/biollm_cls/step_graphs.py): the host launches one graph instead of ~2,000 kernels
    # per step, which bounds small batches on a large GPU (H200, 4x256: sleep 1.60x -> 0.42x the strongest plain
    # FT step). Costs memory: the graphs' activations and gradients stay reserved in one pool (with an fp8
    # Fisher and the pool's expandable segments, sleep peak 1.19x / 1.16x / 1.07x plain FT at 4x256 / 8x512 /
    # 16x1024, bench/RESULTS.md); on in train=qwen_0_5b_fast, off in the 12 GB presets. Batches are right-padded to a
    # multiple of 64 positions (masked out of every loss) so that few shapes occur, one graph each, captured
    # after 2 eager steps. Needs bf16 or no autocast (fp16's GradScaler decides on the host). Ignored on the CPU
    cuda_graphs: bool = False
    grad_clip: float = 1.0  # 0 disables
    deterministic: bool = True
    progress: bool = True  # tqdm bar (hidden when stderr is not a TTY)
    num_threads: int = 0  # CPU threads for torch; 0 = torch's default. 1 is fastest for the tiny model


@dataclass
class LoggingConfig:
    output_dir: str = "outputs/run"
    use_wandb: bool = False
    wandb_project: str = "biollm-cls"
    wandb_mode: str = "offline"  # offline | online | disabled (WANDB_MODE overrides when set)
    wandb_entity: str | None = None
    wandb_run_name: str | None = None
    wandb_group: str | None = None
    wandb_job_type: str = "train"
    wandb_tags: list[str] = field(default_factory=lambda: ["cls"])
    wandb_notes: str | None = None
    wandb_resume: str | None = None
    wandb_run_id: str | None = None
    wandb_api_key_env_var: str = "WANDB_API_KEY"
    wandb_auto_group: bool = True
    wandb_log_full_history: bool = False
    wandb_watch_model: bool = False
    wandb_watch_log_freq: int = 100
    checkpoint_interval: int = 0  # steps between checkpoints; 0 = only at task boundaries and the end
    checkpoint_keep_last: int = 2
    upload_checkpoints: bool = False
    upload_metrics_artifact: bool = True
    upload_config_artifact: bool = True
    upload_metadata_artifact: bool = True
    log_interval: int = 1  # wake steps between metrics.jsonl step rows


@dataclass
class RunConfig:
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    require_cuda: bool = False
    ablation_name: str = "full_cls"
    suite_name: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)
    ewc: EWCConfig = field(default_factory=EWCConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.provider": ("tiny", "hf"),
    "model.hf_torch_dtype": ("auto", "fp32", "bf16", "fp16"),
    "benchmark.name": ("toy", "instruction"),
    "benchmark.order": ("sequential", "joint"),
    "experts.routing": ("sequence", "token"),
    "replay.teacher": ("stored_topk", "recompute"),
    "consolidation.pseudo_source": ("mixed", "replay_echo", "random_tokens"),
    "consolidation.sleep_plan_match": ("base_rows", "total_rows"),
    "consolidation.distill_gate": ("none", "teacher_better"),
    "ewc.fisher_update": ("sleep", "boundary"),
    "ewc.fisher_dtype": ("fp32", "bf16", "fp8"),
    "ewc.anchor_dtype": ("fp32", "bf16"),
    "train.amp_dtype": ("bf16", "fp16"),
    "train.compile_scope": ("trunk", "layers"),
    "train.compile_mode": ("default", "max-autotune-no-cudagraphs"),
    "train.matmul_precision": ("highest", "high", "medium"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks; raises ConfigError naming the key, the value and the fix."""
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    positive = [
        "model.hidden_size", "model.num_layers", "model.num_heads", "model.seq_len",
        "benchmark.switch_every", "benchmark.num_tasks", "experts.num_experts", "experts.expert_hidden",
        "experts.top_k", "replay.capacity", "replay.batch_size", "replay.teacher_topk", "train.batch_size",
        "train.eval_batch_size", "ewc.fisher_samples", "scheduler.probe_interval", "scheduler.probe_size",
        "consolidation.refresh.samples_per_expert", "logging.log_interval",
    ]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must be > 0")
    m, e, c = cfg.model, cfg.experts, cfg.consolidation
    if m.provider == "tiny":
        if m.hidden_size % m.num_heads:
            raise ConfigError(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
        if not 0 <= m.injection_layer < m.num_layers - 1:
            raise ConfigError(
                f"model.injection_layer={m.injection_layer} must be in [0, {m.num_layers - 2}] "
                f"(at least one block must run after the hippocampal delta)"
            )
    if m.provider == "hf" and not m.hf_model_name:
        raise ConfigError("model.provider=hf needs model.hf_model_name (a hub id or a local directory)")
    if not 0.0 < m.hf_injection_fraction < 1.0:
        raise ConfigError(f"model.hf_injection_fraction={m.hf_injection_fraction} must be in (0, 1)")
    if e.top_k > e.num_experts:
        raise ConfigError(f"experts.top_k={e.top_k} must be <= experts.num_experts={e.num_experts}")
    if c.min_sleep_steps > c.max_sleep_steps:
        raise ConfigError(
            f"consolidation.min_sleep_steps={c.min_sleep_steps} must be <= max_sleep_steps={c.max_sleep_steps}"
        )
    if c.sleep_min_interval > c.sleep_max_interval:
        raise ConfigError(
            f"consolidation.sleep_min_interval={c.sleep_min_interval} must be <= "
            f"sleep_max_interval={c.sleep_max_interval}"
        )
    if not 0 <= cfg.replay.recent_capacity < cfg.replay.capacity:
        raise ConfigError(f"replay.recent_capacity={cfg.replay.recent_capacity} must be in [0, replay.capacity="
                          f"{cfg.replay.capacity}): the short-term store is part of the memory's capacity")
    if not 0.0 <= c.recent_fraction <= 1.0:
        raise ConfigError(f"consolidation.recent_fraction={c.recent_fraction} must be in [0, 1]")
    if not 0.0 <= c.pseudo_random_fraction <= 1.0:
        raise ConfigError(f"consolidation.pseudo_random_fraction={c.pseudo_random_fraction} must be in [0, 1]")
    if min(c.pseudo_ratio, c.wake_base_lr_scale, c.target_ce_weight, c.distill_weight,
           cfg.replay.wake_distill_weight) < 0:
        raise ConfigError("consolidation.pseudo_ratio, wake_base_lr_scale, target_ce_weight, distill_weight and "
                          "replay.wake_distill_weight must be >= 0")
    if cfg.train.cuda_graphs and cfg.train.amp_enabled and cfg.train.amp_dtype == "fp16":
        raise ConfigError("train.cuda_graphs=true needs train.amp_dtype=bf16 (fp16's loss scaler decides on the "
                          "host, which a captured step cannot do): set one of them differently")
    if cfg.train.cuda_graphs and m.provider == "hf" and m.hf_pass_attention_mask:
        raise ConfigError("train.cuda_graphs=true needs model.hf_pass_attention_mask=false (transformers builds a "
                          "padded mask differently while a graph is captured): set one of them differently")
    if c.distill_weight == 0 and c.target_ce_weight == 0:
        raise ConfigError("consolidation.distill_weight=0 and target_ce_weight=0 leave sleep without a loss: "
                          "set one of them > 0")
    if c.distill_weight == 0 and c.pseudo_rehearsal:
        raise ConfigError("consolidation.distill_weight=0 leaves pseudo-rehearsal rows without a loss (they have no "
                          "ground truth): set consolidation.pseudo_rehearsal=false")
    if cfg.ewc.lambda_ < 0 or not 0.0 <= cfg.ewc.fisher_decay <= 1.0:
        raise ConfigError("ewc.lambda_ must be >= 0 and ewc.fisher_decay in [0, 1]")
    if c.refresh.reset_factor < 0:
        raise ConfigError(f"consolidation.refresh.reset_factor={c.refresh.reset_factor} must be >= 0")
    # A command-line override cannot carry a newline (Hydra keeps `\n` literal): read `\n` as a newline.
    cfg.benchmark.prompt_template = cfg.benchmark.prompt_template.replace("\\n", "\n")
    if "{prompt}" not in cfg.benchmark.prompt_template:
        raise ConfigError("benchmark.prompt_template must contain {prompt}")
    planned = cfg.benchmark.num_tasks * cfg.benchmark.switch_every
    if cfg.train.max_steps not in (0, planned):
        raise ConfigError(
            f"train.max_steps={cfg.train.max_steps} must equal benchmark.num_tasks x benchmark.switch_every "
            f"= {planned} (each task gets exactly switch_every steps); set train.max_steps=0 to derive it"
        )
    if cfg.train.ablation_disable_hippocampus and c.wake_base_lr_scale == 0 and cfg.train.ablation_no_sleep:
        raise ConfigError(
            "train.ablation_disable_hippocampus with train.ablation_no_sleep and "
            "consolidation.wake_base_lr_scale=0 trains nothing: set wake_base_lr_scale > 0"
        )
    return cfg


def total_steps(cfg: RunConfig) -> int:
    return cfg.benchmark.num_tasks * cfg.benchmark.switch_every
