"""Configs of tiny random-init Hugging Face causal LMs (GPT-2, Llama, Qwen2, GPT-NeoX, OPT) for the tests."""

from __future__ import annotations

from collections.abc import Callable

from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig, Qwen2Config

TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def tiny_configs(vocab: int, hidden: int = 32, layers: int = 4) -> dict[str, Callable[[], object]]:
    """Architecture name -> a zero-argument factory of its tiny config (dropout off)."""
    llama_like = {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": vocab,
                  "max_position_embeddings": 64, **TOKENS}
    return {
        "gpt2": lambda: GPT2Config(n_layer=layers, n_embd=hidden, n_head=2, vocab_size=vocab, n_positions=64,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **TOKENS),
        "llama": lambda: LlamaConfig(**llama_like),
        "qwen2": lambda: Qwen2Config(**llama_like),
        "gpt_neox": lambda: GPTNeoXConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=vocab, max_position_embeddings=64,
                                          **TOKENS),
        "opt": lambda: OPTConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=4, ffn_dim=64,
                                 vocab_size=vocab, max_position_embeddings=64, word_embed_proj_dim=hidden,
                                 dropout=0.0, **TOKENS),
    }
