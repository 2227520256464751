"""Tokenizers of the instruction benchmark: built-in bytes for the tiny model, the model's own for HF.

* ``ByteTokenizer`` (tiny model): ids 0..255 are the UTF-8 bytes, then ``pad`` (256) and ``eos`` (257).
  Nothing to download, every string is representable, and the id space is small enough for a CPU model.
* ``HFTokenizer`` (``model.provider=hf``): ``AutoTokenizer`` of ``benchmark.tokenizer_name`` or of the model,
  honouring ``hf_revision`` / ``hf_local_files_only`` / trust_remote_code. Without a pad token, padding
  reuses eos: padding is masked out of attention and loss, so the id it carries never matters.

Both expose the same small protocol, so the encoder never branches on the backend. ``vocab_size`` is the
number of ids the tokenizer can emit (``len(tokenizer)`` for HF, which counts added special tokens; the
reference used ``tokenizer.vocab_size``, which does not).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from biollm_cls.config.schema import ConfigError, RunConfig


@runtime_checkable
class TextTokenizer(Protocol):
    name: str
    vocab_size: int  # emitted ids lie in [0, vocab_size)
    pad_id: int
    eos_id: int

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids of `text`; `special` adds the tokenizer's own leading specials (e.g. BOS)."""

    def describe(self) -> dict:
        """Facts recorded in run_metadata.json and in pretrain checkpoints."""


class ByteTokenizer:
    """UTF-8 bytes + pad + eos: 258 ids, no download."""

    name = "bytes"
    pad_id = 256
    eos_id = 257
    vocab_size = 258

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "pad_id": self.pad_id, "eos_id": self.eos_id}


class HFTokenizer:
    """A Hugging Face tokenizer behind the `TextTokenizer` protocol."""

    def __init__(self, tokenizer, name: str, revision: str | None = None):
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(
                f"tokenizer {name!r} has no eos token: responses must end with EOS; "
                f"set benchmark.tokenizer_name to a tokenizer that defines one"
            )
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        self.eos_id = int(eos)
        pad = tokenizer.pad_token_id
        self.pad_id = int(eos if pad is None else pad)
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def describe(self) -> dict:
        return {"kind": "hf", "name": self.name, "revision": self.revision, "vocab_size": self.vocab_size,
                "pad_id": self.pad_id, "eos_id": self.eos_id, "class": type(self.tokenizer).__name__}


def build_tokenizer(cfg: RunConfig) -> TextTokenizer:
    """Bytes for the tiny model; the model's (or `benchmark.tokenizer_name`'s) HF tokenizer otherwise."""
    if cfg.model.provider == "tiny":
        return ByteTokenizer()
    return load_hf_tokenizer(cfg)


def load_hf_tokenizer(cfg: RunConfig) -> HFTokenizer:
    from transformers import AutoTokenizer

    own = cfg.benchmark.tokenizer_name is None
    name = cfg.model.hf_model_name if own else cfg.benchmark.tokenizer_name
    if not name:
        raise ConfigError("benchmark.tokenizer_name or model.hf_model_name must name a tokenizer")
    revision = cfg.model.hf_revision if own else None
    trust = cfg.benchmark.tokenizer_trust_remote_code or (own and cfg.model.hf_trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust, local_files_only=cfg.model.hf_local_files_only
        )
    except (OSError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"cannot load tokenizer {name!r}: {first}") from None
    return HFTokenizer(tok, name, revision)
