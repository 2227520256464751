"""Checkpoints that hold everything needed to continue a run, saved and loaded safely.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (base, hippocampus with its
initial weights, both optimizers, the GradScaler, replay, EWC, scheduler, novelty tracker, metric
matrices, counters, RNG states, step), so ``torch.load(..., weights_only=True)`` can read it.
Files are written to a temp name and renamed, so a killed process never leaves a torn checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_PATTERN = re.compile(r"step_(\d{7})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _PATTERN.search(p.name))


def save_checkpoint(state: dict, run_dir: Path, step: int, keep_last: int) -> Path:
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, device: torch.device) -> dict:
    return torch.load(path, map_location=device, weights_only=True)
