"""Device choice, precision settings and seeding."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; anything else goes to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    # CPU kernels are already deterministic; the switch (which also imports torch._inductor, ~6 s) is
    # only needed for CUDA's nondeterministic reductions.
    if deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def configure_precision(device: torch.device, allow_tf32: bool, matmul_precision: str) -> None:
    torch.set_float32_matmul_precision(matmul_precision)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32


def device_facts() -> dict:
    facts: dict = {
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_device_count": torch.cuda.device_count(),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        facts.update(
            cuda_current_device=idx,
            cuda_device_name=props.name,
            cuda_capability=f"{props.major}.{props.minor}",
            cuda_total_mem_gb=round(props.total_memory / 2**30, 2),
            cuda_version=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return facts
