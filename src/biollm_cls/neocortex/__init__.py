"""Neocortex backends: the tiny built-in transformer and Hugging Face causal LMs."""

from __future__ import annotations

import torch
from torch import nn

from biollm_cls.config.schema import ModelConfig
from biollm_cls.neocortex.base import Injection, Neocortex, full_logits

__all__ = ["Injection", "Neocortex", "build_neocortex", "full_logits"]


def build_neocortex(cfg: ModelConfig, device: torch.device, trains_base: bool = True) -> nn.Module:
    """Build the configured base. `trains_base` tells the HF backend whether fp32 master weights are needed."""
    if cfg.provider == "tiny":
        from biollm_cls.neocortex.tiny import TinyNeocortex

        model = TinyNeocortex(cfg)
        if cfg.init_checkpoint:
            from biollm_cls.neocortex.pretrain import load_base_checkpoint

            load_base_checkpoint(model, cfg.init_checkpoint)
        return model.to(device)
    from biollm_cls.neocortex.hf import HFNeocortex

    return HFNeocortex(cfg, device=device, trains_base=trains_base)
