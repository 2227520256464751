"""The HF tokenizer path, with a tiny WordLevel tokenizer built and saved locally (no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.instruction import build_instruction_stream
from biollm_cls.benchmarks.tokenizers import ByteTokenizer
from biollm_cls.config import load_config
from biollm_cls.config.schema import ConfigError

WORDS = ["[PAD]", "[EOS]", "[UNK]", "#", "Instruction", "Response", ":", "say", "yes", "no", "high", "low"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}  # "high" = 10, "low" = 11
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")
    out = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(out)
    return out


def hf_cfg(tokenizer_dir: Path, data: Path, *overrides: str):
    return load_config(["benchmark=instruction", "model.provider=hf", f"model.hf_model_name={tokenizer_dir}",
                        "model.hf_local_files_only=true", f"benchmark.local_path={data}", "benchmark.num_tasks=1",
                        "benchmark.min_examples_per_task=1", "model.seq_len=16", *overrides])


def test_hf_tokenizer_encodes_real_ids(tokenizer_dir: Path, tmp_path: Path, jsonl):
    data = jsonl(tmp_path / "d.jsonl", [{"task": "t", "instruction": f"say high {i}", "output": "yes"}
                                        for i in range(6)])
    stream = build_instruction_stream(hf_cfg(tokenizer_dir, data, "model.vocab_size=10"))
    batch = stream.train_batch(1, 2)
    assert 10 in batch.input_ids[0].tolist()  # "high" keeps its id although the model predicts only 10 ids
    assert batch.targets[0][batch.supervised[0]].tolist() == [WORDS.index("yes"), WORDS.index("[EOS]")]
    assert stream.vocab_size == len(WORDS) and stream.target_vocab_size == 10
    assert stream.pad_id == 0 and not batch.attention_mask[0, -1]


def test_target_id_beyond_output_vocab_is_refused(tokenizer_dir: Path, tmp_path: Path, jsonl):
    data = jsonl(tmp_path / "d.jsonl", [{"task": "t", "instruction": "say", "output": "low"}] * 2
                 + [{"task": "t", "instruction": "say yes", "output": "no"}])
    with pytest.raises(DataError, match="target token id 11 >= model.vocab_size=10"):
        build_instruction_stream(hf_cfg(tokenizer_dir, data, "model.vocab_size=10"))


def test_cap_below_eos_is_a_config_error(tokenizer_dir: Path, tmp_path: Path, jsonl):
    data = jsonl(tmp_path / "d.jsonl", [{"task": "t", "instruction": "say", "output": "yes"}] * 2)
    with pytest.raises(ConfigError, match="eos id 1"):
        build_instruction_stream(hf_cfg(tokenizer_dir, data, "model.vocab_size=1"))


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("héllo") + [tok.eos_id]) == "héllo"
    assert tok.vocab_size == 258 and tok.pad_id != tok.eos_id
