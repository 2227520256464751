"""A tiny causal pre-LN transformer: the CPU-friendly default neocortex.

Token + learned positional embeddings, ``num_layers`` blocks of ``x += Attn(LN(x)); x += MLP(LN(x))``,
a final LayerNorm and an untied LM head. Blocks ``0..injection_layer`` form the lower stack; the
hippocampal delta is added to their output and the remaining blocks run once on ``h + delta``.
Sequences are right-padded, so causal attention never lets a real token see padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biollm_cls.config.schema import ModelConfig
from biollm_cls.neocortex.base import Injection


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, nh, T, hd)
        x = x + F.dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), p, self.training)
        x = x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), p, self.training)  # (B, T, C)
        return x


class TinyNeocortex(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.injection_layer = cfg.injection_layer
        self.dropout = cfg.dropout
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Embedding(cfg.seq_len, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg.hidden_size, cfg.num_heads, cfg.dropout) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # A random head with std 0.02 caps |logits| near 1 after ln_f, so a frozen random base could not
        # express a confident prediction whatever the hippocampus adds; 1/sqrt(H) gives unit-scale logits.
        nn.init.normal_(self.lm_head.weight, std=cfg.hidden_size ** -0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               inject: Injection | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.seq_len}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)  # (B, T, C)
        x = F.dropout(x, self.dropout, self.training)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i == self.injection_layer and inject is not None:
                x = x + inject(x, attention_mask)  # h + delta, (B, T, C)
        return self.ln_f(x)

    can_resume = True  # `resume` is exact here: the upper blocks see only the residual stream

    def resume(self, h: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h [B,T,C] at the injection point (the lower stack's output, delta included) -> final hidden [B,T,C]:
        the upper blocks only. Equal to `hidden(ids, inject=...)` when h is that pass's state there."""
        x = h
        for block in self.blocks[self.injection_layer + 1 :]:
            x = block(x)
        return self.ln_f(x)

    def compile_layers(self, **options) -> None:
        """Regional compilation: each block's forward under `torch.compile` (the injection stays eager)."""
        for block in self.blocks:
            block.forward = torch.compile(block.forward, **options)

    def compile_trunk(self, **options) -> None:
        """Whole-stack compilation: `hidden` (the injection traced into it) and `resume` under `torch.compile`."""
        self.hidden = torch.compile(self.hidden, **options)
        self.resume = torch.compile(self.resume, **options)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # (..., V)

    def runtime_info(self) -> dict:
        return {
            "neocortex": "tiny",
            "injection_layer_idx": self.injection_layer,
            "num_decoder_layers": len(self.blocks),
            "parameters": sum(p.numel() for p in self.parameters()),
        }
