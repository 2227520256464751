"""Pretrain the tiny neocortex on a pack's ``pretrain.jsonl``, and save/load base checkpoints.

Why: a randomly initialised tiny transformer cannot learn an instruction task in a few hundred steps, so a
continual run on it measures little. A short pretraining phase on *other* task families (copy, index,
length, case, successor, max/min; disjoint from the eight continual tasks) gives the base general in-context
skills first, the way a pretrained LM comes to a continual benchmark already able to read its prompts.

Training is plain next-token cross-entropy on the response tokens (the stream's encoding: byte tokenizer,
``benchmark.prompt_template``, ``model.seq_len``), AdamW with linear warm-up and cosine decay, batches drawn
with ``step_generator(seed, step)``. The model shape comes from the same config overrides as the runs that
will load it (``model.hidden_size=...``), so a checkpoint fits its runs by construction; a mismatch at load
time is a one-line error naming the differing keys.

CLI: ``python -m biollm_cls.cli pretrain --pack-dir D --output P [--steps N] [--batch-size B] [--lr LR]
[--seed S] [model.key=value ...]``. Writes ``P`` (atomically) and ``P`` with suffix ``.stats.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from biollm_cls.benchmarks.base import IGNORE, step_generator
from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.instruction import Counts, PromptEncoder, TaskData, to_task_data
from biollm_cls.benchmarks.packs.builder import is_pack, verify_pack
from biollm_cls.benchmarks.packs.sources import read_json_records
from biollm_cls.benchmarks.tokenizers import ByteTokenizer
from biollm_cls.config.schema import ConfigError, ModelConfig, RunConfig

CHECKPOINT_FORMAT = "biollm-cls-base/1"
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "seq_len")  # must match to load
USAGE_ERROR = 2


@dataclass
class PretrainStats:
    steps: int
    batch_size: int
    lr: float
    seed: int
    train_rows: int
    heldout_rows: int
    parameters: int
    loss_first: float  # mean CE of the first 1% of steps (nats per response token)
    loss_final: float  # mean CE of the last 10% of steps
    loss_curve: list[list[float]]  # [step, mean CE over the window ending there], ~20 points
    heldout_token_acc: float  # teacher-forced, response tokens of held-out pretrain rows
    heldout_exact_match: float
    heldout_loss: float
    wall_time_s: float
    steps_per_s: float
    model: dict  # the ModelConfig the base was trained with (vocab resolved)


# ---- data --------------------------------------------------------------------------------------------


def pretrain_file(pack_dir: Path, verify: bool) -> Path:
    file = pack_dir / "pretrain.jsonl"
    if not file.is_file():
        raise DataError(f"{file}: no such file (build the pack with --source synthetic, or give a pack that has one)")
    if verify and is_pack(file):
        verify_pack(file)
    return file


def load_pretrain_data(pack_dir: Path, cfg: RunConfig, heldout_fraction: float = 0.05) -> tuple[TaskData, TaskData]:
    """(train, held-out) encodings of pretrain.jsonl, exactly as the stream encodes instructions."""
    b = cfg.benchmark
    file = pretrain_file(pack_dir, b.verify_checksums)
    encoder = PromptEncoder(ByteTokenizer(), b.prompt_template, cfg.model.seq_len, Counts())
    encoded = []
    for line, record in read_json_records(file):
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{file}:{line} (field {key!r}): missing or not text")
        enc = encoder.encode(record["instruction"], record["output"])
        if enc is not None:
            encoded.append(enc)
    n_held = min(512, max(1, int(len(encoded) * heldout_fraction)))
    if len(encoded) <= n_held:
        raise DataError(f"{file}: only {len(encoded)} usable rows at model.seq_len={cfg.model.seq_len}")
    pad = ByteTokenizer.pad_id
    return (to_task_data(encoded[n_held:], cfg.model.seq_len, pad, True),
            to_task_data(encoded[:n_held], cfg.model.seq_len, pad, True))


# ---- training ----------------------------------------------------------------------------------------


def resolved_model_config(cfg: ModelConfig) -> ModelConfig:
    """The tiny model's config with `vocab_size=0` replaced by the byte tokenizer's size."""
    if cfg.provider != "tiny":
        raise ConfigError(f"pretrain trains the tiny neocortex; model.provider={cfg.provider!r} is not supported")
    size = ByteTokenizer.vocab_size
    if 0 < cfg.vocab_size < size:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} is smaller than the byte tokenizer's {size} ids: "
                          f"set model.vocab_size=0 (use the tokenizer's size) or >= {size}")
    return dataclasses.replace(cfg, vocab_size=cfg.vocab_size or size)


def masked_ce(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE over supervised positions, argmax-correct flags [N]); projects only supervised positions."""
    hidden = model.hidden(input_ids, mask)  # (B, T, H)
    sup = targets != IGNORE  # (B, T)
    logits = model.logits(hidden[sup])  # (N, V)
    labels = targets[sup]  # (N,)
    return F.cross_entropy(logits, labels), logits.argmax(-1) == labels


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of lr."""
    warmup = max(1, steps // 20)
    if step <= warmup:
        return lr * step / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 256) -> tuple[float, float, float]:
    """(token accuracy, exact match, mean CE) on supervised positions, teacher-forced."""
    was_training = model.training
    model.eval()
    correct = tokens = exact = 0
    nll = 0.0
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        hidden = model.hidden(data.input_ids[sl], data.attention_mask[sl])  # (b, T, H)
        targets = data.targets[sl]  # (b, T)
        logits = model.logits(hidden)  # (b, T, V)
        sup = targets != IGNORE
        hit = (logits.argmax(-1) == targets) & sup  # (b, T)
        correct += int(hit.sum())
        tokens += int(sup.sum())
        exact += int(((hit | ~sup).all(1) & sup.any(1)).sum())
        nll += float(F.cross_entropy(logits[sup], targets[sup], reduction="sum"))
    model.train(was_training)
    return correct / max(tokens, 1), exact / max(len(data), 1), nll / max(tokens, 1)


def pretrain_base(cfg: RunConfig, pack_dir: Path, steps: int = 1500, batch_size: int = 64, lr: float = 2e-3,
                  seed: int | None = None, progress: bool | None = None) -> tuple[nn.Module, PretrainStats]:
    """Train a fresh TinyNeocortex on pack_dir/pretrain.jsonl; returns (model in eval mode, stats)."""
    from biollm_cls.neocortex.tiny import TinyNeocortex

    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ConfigError(f"--steps={steps}, --batch-size={batch_size} and --lr={lr} must be > 0")
    seed = cfg.seed if seed is None else seed
    model_cfg = resolved_model_config(cfg.model)
    train, held = load_pretrain_data(pack_dir, cfg)
    torch.manual_seed(seed)
    model = TinyNeocortex(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    losses: list[float] = []
    show = sys.stderr.isatty() if progress is None else progress
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="pretrain", unit="step", disable=not show)
    model.train()
    for step in bar:
        rows = torch.randint(0, len(train), (batch_size,), generator=step_generator(seed, step))  # (B,)
        loss, _ = masked_ce(model, train.input_ids[rows], train.targets[rows], train.attention_mask[rows])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    wall = time.perf_counter() - start
    acc, exact, held_loss = evaluate(model, held)
    model.eval()
    stats = PretrainStats(
        steps=steps, batch_size=batch_size, lr=lr, seed=seed, train_rows=len(train), heldout_rows=len(held),
        parameters=sum(p.numel() for p in model.parameters()),
        loss_first=_mean(losses[: max(1, steps // 100)]), loss_final=_mean(losses[-max(1, steps // 10):]),
        loss_curve=_curve(losses), heldout_token_acc=acc, heldout_exact_match=exact, heldout_loss=held_loss,
        wall_time_s=wall, steps_per_s=steps / max(wall, 1e-9), model=dataclasses.asdict(model_cfg),
    )
    return model, stats


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def _curve(losses: list[float], points: int = 20) -> list[list[float]]:
    window = max(1, len(losses) // points)
    return [[end, round(_mean(losses[end - window:end]), 4)] for end in range(window, len(losses) + 1, window)]


# ---- checkpoints -------------------------------------------------------------------------------------


def save_base_checkpoint(model: nn.Module, cfg: ModelConfig, path: str | Path, extra: dict | None = None) -> None:
    """Atomically write {format, state_dict, model_config, tokenizer, extra} (loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dataclasses.asdict(cfg),
        "tokenizer": ByteTokenizer().describe(),
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _model_shape(model: nn.Module) -> dict[str, int]:
    return {"vocab_size": model.vocab_size, "hidden_size": model.hidden_size, "num_layers": len(model.blocks),
            "num_heads": model.blocks[0].heads, "seq_len": model.seq_len}


def load_base_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load a `pretrain` checkpoint into a TinyNeocortex; returns the checkpoint's model_config/tokenizer/extra.

    Raises ConfigError (one line) when the file is missing or not a base checkpoint, or when its shape keys
    differ from the model's (naming each differing key and both values)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.init_checkpoint={path} does not exist; run `biollm-cls pretrain` first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of many types; one line is enough
        raise ConfigError(f"model.init_checkpoint={path} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"model.init_checkpoint={path} is not a base checkpoint written by `pretrain`")
    saved, current = ckpt["model_config"], _model_shape(model)
    diffs = [f"model.{k}: checkpoint {saved.get(k)} vs run {current[k]}" for k in SHAPE_KEYS
             if saved.get(k) != current[k]]
    if diffs:
        raise ConfigError(f"model.init_checkpoint={path} does not fit this model ({'; '.join(diffs)}): "
                          f"set the same model.* values or re-run pretrain")
    missing, unexpected = _key_mismatch(model.state_dict(), ckpt["state_dict"])
    if missing or unexpected:
        raise ConfigError(f"model.init_checkpoint={path} has different parameters "
                          f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    model.load_state_dict(ckpt["state_dict"])
    return {k: ckpt[k] for k in ("model_config", "tokenizer", "extra")}


def _key_mismatch(own: dict, saved: dict) -> tuple[list[str], list[str]]:
    missing = sorted(k for k in own if k not in saved or saved[k].shape != own[k].shape)
    return missing, sorted(k for k in saved if k not in own)


# ---- CLI ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="biollm-cls pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack-dir", required=True, type=Path, help="a pack with pretrain.jsonl (build-pack --source synthetic)")
    p.add_argument("--output", required=True, type=Path, help="checkpoint path (e.g. results/data/base.pt)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="tqdm bar (default: only when stderr is a TTY)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden_size=128 model.seq_len=64")
    return p


def main(argv: list[str] | None = None) -> int:
    from biollm_cls.config import load_config

    try:
        args = parser().parse_intermixed_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].lstrip("+~") == "model.vocab_size" for o in overrides):
        overrides.insert(0, "model.vocab_size=0")  # tiny + bytes: size the model from the tokenizer
    try:
        cfg = load_config(overrides)
        model, stats = pretrain_base(cfg, args.pack_dir, args.steps, args.batch_size, args.lr, args.seed,
                                     args.progress)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    stats_dict = dataclasses.asdict(stats)
    save_base_checkpoint(model, resolved_model_config(cfg.model), args.output,
                         extra={"pack_dir": str(args.pack_dir), "heldout_token_acc": stats.heldout_token_acc})
    stats_path = args.output.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats_dict, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: stats_dict[k] for k in ("loss_first", "loss_final", "heldout_token_acc",
                                                 "heldout_exact_match", "wall_time_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
