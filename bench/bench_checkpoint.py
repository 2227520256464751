"""Where a checkpoint write's time goes (bench/README.md): a script, never a unit test.

A state shaped like a full_cls run's on the Qwen2.5-0.5B shape (fp32 weights, AdamW's two moments, a bf16
Fisher and an anchor over the EWC-covered weights; ``--gb`` scales it) is written with the library's own
``save_checkpoint`` and its parts are timed one by one: the device-to-host copy, ``torch.save`` of host
tensors, the sha256 of the file, and the whole write. JSON to stdout (and ``--json-out``)::

    python3 bench/bench_checkpoint.py --dir /dev/shm/ckbench --device cuda --json-out $OUT/checkpoint.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from biollm_cls.checkpoint import save_checkpoint
from biollm_cls.run_io import file_sha256

QWEN_05B_PARAMS = 494.0e6  # the bench model's parameters (bench/RESULTS.md)
EWC_PARAMS = 372.6e6  # the EWC-covered weights (row-sparse embedding)


def synthetic_state(gb: float, device: torch.device, tensors: int = 290) -> dict:
    """{step, neocortex, base_optimizer, ewc}: fp32 weights + 2 fp32 moments + bf16 Fisher + anchor, ~`gb` GB."""
    scale = gb * 1e9 / (QWEN_05B_PARAMS * 12 + EWC_PARAMS * 6)
    per = max(1, int(QWEN_05B_PARAMS * scale / tensors))
    ewc_per = max(1, int(EWC_PARAMS * scale / tensors))

    def tensor_set(n: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"t{i:03d}": torch.randn(n, device=device).to(dtype) for i in range(tensors)}

    return {
        "step": 1, "neocortex": tensor_set(per, torch.float32),
        "base_optimizer": {"exp_avg": tensor_set(per, torch.float32), "exp_avg_sq": tensor_set(per, torch.float32)},
        "ewc": {"fisher": tensor_set(ewc_per, torch.bfloat16), "anchor": tensor_set(ewc_per, torch.float32)},
    }


def state_bytes(state) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    return 0


def to_host(state, pinned: bool):
    if isinstance(state, torch.Tensor):
        if not pinned:
            return state.to("cpu")
        out = torch.empty(state.shape, dtype=state.dtype, pin_memory=True)
        return out.copy_(state, non_blocking=True)
    if isinstance(state, dict):
        return {k: to_host(v, pinned) for k, v in state.items()}
    return state


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def torch_save_synced(state, path: Path) -> None:
    with path.open("wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/dev/shm/ckbench", help="scratch folder (deleted afterwards)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gb", type=float, default=8.2, help="state size (the NI8 e2e full_cls checkpoint: 8.2 GB)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        state = synthetic_state(args.gb, device)
        size = state_bytes(state)
        res: dict[str, float | str] = {"device": str(device), "dir": str(root), "state_gb": size / 1e9}
        res["d2h_pageable_s"], host = timed(lambda: to_host(state, pinned=False), device)
        if device.type == "cuda":
            res["d2h_pinned_s"], _ = timed(lambda: to_host(state, pinned=True), device)
        res["torch_save_host_s"], _ = timed(lambda: torch_save_synced(host, root / "host.pt"), device)
        res["sha256_s"], _ = timed(lambda: file_sha256(root / "host.pt"), device)
        res["torch_save_device_s"], _ = timed(lambda: torch_save_synced(state, root / "device.pt"), device)
        for name in ("host.pt", "device.pt"):
            (root / name).unlink()
        res["save_checkpoint_s"], _ = timed(lambda: save_checkpoint(state, root / "run", 1, keep_last=1), device)
        res["save_checkpoint_gb_per_s"] = size / 1e9 / res["save_checkpoint_s"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")


if __name__ == "__main__":
    main()
