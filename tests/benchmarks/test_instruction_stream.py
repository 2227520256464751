"""The instruction stream: encoding rules, task order, held-out splits, determinism and refusals."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from biollm_cls.benchmarks.base import IGNORE, ContinualStream
from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.instruction import (
    Counts,
    PromptEncoder,
    build_instruction_stream,
    resolve_vocab_size,
    to_task_data,
)
from biollm_cls.benchmarks.tokenizers import ByteTokenizer
from biollm_cls.config.schema import ConfigError

TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
MARKER = "\n\n### Response:\n"


def rows(tasks: dict[str, int], prefix: str = "q") -> list[dict]:
    return [{"task": t, "instruction": f"{prefix} {t} {i}", "output": f"a{i}"} for t, n in tasks.items() for i in range(n)]


# ---- encoding ----------------------------------------------------------------------------------------


def test_short_example_is_prefix_response_eos():
    tok = ByteTokenizer()
    enc = PromptEncoder(tok, TEMPLATE, seq_len=64).encode("add 1", "2")
    prefix = list(TEMPLATE.replace("{prompt}", "add 1").encode())
    assert enc.ids == prefix + [ord("2"), tok.eos_id]
    assert enc.n_prefix == len(prefix)


def test_long_prompt_keeps_marker_and_end_of_body():
    tok, counts = ByteTokenizer(), Counts()
    body = "x" * 100 + "THE-END"
    enc = PromptEncoder(tok, TEMPLATE, seq_len=48, counts=counts).encode(body, "yes")
    assert len(enc.ids) == 49  # seq_len + 1
    prefix = tok.decode(enc.ids[: enc.n_prefix])
    assert prefix.startswith("### Instruction:\n") and prefix.endswith(MARKER)
    assert "THE-END" in prefix  # the body's beginning is cut, not its end
    assert enc.ids[enc.n_prefix:] == list(b"yes") + [tok.eos_id]
    assert counts.prompts_truncated == 1 and counts.responses_truncated == 0


def test_no_room_for_a_response_is_dropped_and_counted():
    counts = Counts()
    assert PromptEncoder(ByteTokenizer(), TEMPLATE, seq_len=20, counts=counts).encode("p", "r") is None
    assert counts.no_supervised_dropped == 1


def test_masks_padding_and_prompt_targets():
    tok = ByteTokenizer()
    enc = PromptEncoder(tok, "{prompt}=", seq_len=12).encode("ab", "cd")  # ids: a b = c d EOS
    data = to_task_data([enc], 12, tok.pad_id, ignore_prompt_loss=True)
    ids, tgt, mask = data.input_ids[0], data.targets[0], data.attention_mask[0]
    assert ids[:5].tolist() == list(b"ab=cd") and (ids[5:] == tok.pad_id).all()
    assert mask.tolist() == [True] * 5 + [False] * 7
    assert tgt[:2].tolist() == [IGNORE, IGNORE]  # predicting "b" and "=" is prompt
    assert tgt[2:5].tolist() == [ord("c"), ord("d"), tok.eos_id]
    assert (tgt[5:] == IGNORE).all()
    full = to_task_data([enc], 12, tok.pad_id, ignore_prompt_loss=False)
    assert full.targets[0, :5].tolist() == [ord("b"), ord("="), ord("c"), ord("d"), tok.eos_id]


def test_real_ids_no_aliasing(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", [{"task": "t", "instruction": f"é{i}", "output": "ü"} for i in range(5)])
    stream = build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                      "benchmark.num_tasks=1"))
    batch = stream.train_batch(1, 2)
    assert set("é".encode()) <= set(batch.input_ids[0].tolist())
    sup = batch.targets[0][batch.supervised[0]].tolist()
    assert sup == list("ü".encode()) + [ByteTokenizer.eos_id]
    assert stream.vocab_size == 258 and int(batch.targets.max()) < 258


# ---- the stream --------------------------------------------------------------------------------------


def test_stream_protocol_schedule_and_determinism(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"t0": 12, "t1": 12, "t2": 12}))
    cfg = make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}", "benchmark.num_tasks=3")
    stream = build_instruction_stream(cfg)
    assert isinstance(stream, ContinualStream)
    assert stream.task_names == ["t0", "t1", "t2"]  # exactly num_tasks labels: sorted, no shuffle
    assert stream.train_batch(5, 4).task_ids.tolist() == [0] * 4
    assert stream.train_batch(6, 4).task_ids.tolist() == [1] * 4
    assert stream.train_batch(15, 4).task_ids.tolist() == [2] * 4
    with pytest.raises(ValueError):
        stream.train_batch(16, 4)
    again = build_instruction_stream(cfg)
    a, b = stream.train_batch(7, 8), again.train_batch(7, 8)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert a.input_ids.shape == (8, 64) and a.attention_mask.dtype == torch.bool
    assert resolve_vocab_size(cfg, stream) == 258
    held = list(stream.heldout(1, 2))
    assert sum(len(h) for h in held) == 2  # min(heldout_per_task=4, 12 // 5)
    assert all(h.task_ids.tolist() == [1] * len(h) for h in held)


def test_json_list_file_and_max_examples(tmp_path: Path, make_cfg):
    import json

    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows({"t0": 10, "t1": 10})))
    stream = build_instruction_stream(make_cfg(f"benchmark.local_path={path}", "benchmark.num_tasks=1",
                                               "benchmark.max_examples=8"))
    assert stream.task_names == ["t0"] and stream.describe()["counts"]["records_read"] == 8


def test_joint_order_mixes_tasks(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"t0": 10, "t1": 10, "t2": 10}))
    stream = build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                      "benchmark.num_tasks=3", "benchmark.order=joint"))
    assert len(set(stream.train_batch(1, 64).task_ids.tolist())) == 3


def test_selection_shuffles_when_more_tasks_than_asked(tmp_path: Path, make_cfg, jsonl):
    names = [f"task{c}" for c in "fbdaec"]
    jsonl(tmp_path / "d.jsonl", rows(dict.fromkeys(names, 6)))
    stream = build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                      "benchmark.num_tasks=4", "benchmark.task_selection_seed=3"))
    expected = sorted(names)
    random.Random(3).shuffle(expected)
    assert stream.task_names == expected[:4]


def test_too_few_tasks_is_a_clear_error(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"t0": 6, "t1": 6}))
    with pytest.raises(DataError, match="benchmark.num_tasks=3"):
        build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                 "benchmark.num_tasks=3"))


def test_missing_task_field_names_file_and_line(tmp_path: Path, make_cfg, jsonl):
    data = rows({"t0": 2})
    data.insert(1, {"instruction": "no task here", "output": "x"})
    path = jsonl(tmp_path / "d.jsonl", data)
    with pytest.raises(DataError, match=f"{path}:2 .*'task'"):
        build_instruction_stream(make_cfg(f"benchmark.local_path={path}", "benchmark.num_tasks=1"))


def test_null_task_field_hash_buckets_with_warning(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"x": 40}))
    cfg = make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}", "benchmark.num_tasks=2",
                          "benchmark.task_field=null")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = build_instruction_stream(cfg)
    assert any("hash" in str(w.message) for w in caught)
    assert stream.task_names == ["task_0", "task_1"]


def test_eval_file_duplicates_removed_and_empties_counted(tmp_path: Path, make_cfg, jsonl):
    train = rows({"t0": 6, "t1": 6})
    train.append({"task": "t0", "instruction": "q  t0   shared", "output": "a"})  # same text modulo spaces
    train.append({"task": "t1", "instruction": "   ", "output": "a"})  # empty prompt
    evals = [{"task": "t0", "instruction": "q t0 shared", "output": "a"},
             {"task": "t1", "instruction": "other", "output": "b"}]
    cfg = make_cfg(f"benchmark.local_path={jsonl(tmp_path / 'train.jsonl', train)}",
                          f"benchmark.eval_local_path={jsonl(tmp_path / 'eval.jsonl', evals)}",
                          "benchmark.num_tasks=2")
    facts = build_instruction_stream(cfg).describe()
    assert facts["counts"]["duplicates_removed"] == 1
    assert facts["counts"]["empty_skipped"] == 1
    assert facts["train_rows"] == {"t0": 6, "t1": 6}
    assert facts["heldout_rows"] == {"t0": 1, "t1": 1}


def test_seq_len_too_short_for_template_is_an_error(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"t0": 4}))
    with pytest.raises(DataError, match="model.seq_len"):
        build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                 "benchmark.num_tasks=1", "model.seq_len=16"))


def test_tiny_vocab_smaller_than_bytes_is_refused(tmp_path: Path, make_cfg, jsonl):
    jsonl(tmp_path / "d.jsonl", rows({"t0": 4}))
    with pytest.raises(ConfigError, match="model.vocab_size=0"):
        build_instruction_stream(make_cfg(f"benchmark.local_path={tmp_path / 'd.jsonl'}",
                                                 "benchmark.num_tasks=1", "model.vocab_size=64"))


# ---- packs -------------------------------------------------------------------------------------------


def pack_cfg(make_cfg, pack: Path, *overrides: str):
    return make_cfg(f"benchmark.local_path={pack / 'train.jsonl'}",
                           f"benchmark.eval_local_path={pack / 'eval.jsonl'}", "benchmark.num_tasks=8", *overrides)


def test_pack_order_and_heldout(synthetic_pack: Path, make_cfg):
    import json

    metadata = json.loads((synthetic_pack / "metadata.json").read_text())
    stream = build_instruction_stream(pack_cfg(make_cfg, synthetic_pack))
    assert stream.task_names == metadata["selected_tasks"]  # the builder's order, not sorted
    facts = stream.describe()
    assert facts["source"]["pack"]["checksums_verified"] is True
    assert set(facts["heldout_rows"].values()) == {4}  # capped by heldout_per_task
    assert facts["counts"]["responses_truncated"] == 0 and facts["counts"]["prompts_truncated"] == 0


def test_tampered_pack_is_refused(synthetic_pack: Path, tmp_path: Path, make_cfg):
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(synthetic_pack, pack)
    with (pack / "train.jsonl").open("a") as handle:
        handle.write('{"task": "synth_add_sub", "instruction": "calc: 1+1+1", "output": "3"}\n')
    with pytest.raises(DataError, match="sha256"):
        build_instruction_stream(pack_cfg(make_cfg, pack))
    build_instruction_stream(pack_cfg(make_cfg, pack, "benchmark.verify_checksums=false"))  # opt-out works


def _strip_checksums(synthetic_pack: Path, tmp_path: Path) -> Path:
    import json
    import shutil

    pack = tmp_path / "pack"
    shutil.copytree(synthetic_pack, pack)
    metadata = json.loads((pack / "metadata.json").read_text())
    del metadata["checksums"]
    (pack / "metadata.json").write_text(json.dumps(metadata))
    return pack


def test_pack_without_checksums_is_refused_when_verifying(synthetic_pack: Path, tmp_path: Path, make_cfg):
    pack = _strip_checksums(synthetic_pack, tmp_path)
    with pytest.raises(DataError) as err:
        build_instruction_stream(pack_cfg(make_cfg, pack))
    message = str(err.value)
    assert "\n" not in message and "records no checksums" in message
    assert "rebuild the pack (build-pack) or set benchmark.verify_checksums=false" in message


def test_pack_without_checksums_is_recorded_unverified_when_not_verifying(synthetic_pack: Path, tmp_path: Path,
                                                                          make_cfg):
    pack = _strip_checksums(synthetic_pack, tmp_path)
    facts = build_instruction_stream(pack_cfg(make_cfg, pack, "benchmark.verify_checksums=false")).describe()
    assert facts["source"]["pack"]["checksums"] is None
    assert facts["source"]["pack"]["checksums_verified"] is False


def test_non_utf8_line_names_file_and_line(tmp_path: Path, make_cfg, jsonl):
    data = jsonl(tmp_path / "d.jsonl", rows({"t0": 4}))
    with data.open("ab") as handle:
        handle.write(b'{"task": "t0", "instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as err:
        build_instruction_stream(make_cfg(f"benchmark.local_path={data}", "benchmark.num_tasks=1"))
    message = str(err.value)
    assert message.startswith(f"{data}:5: not valid UTF-8 (byte 0xe9") and "re-save the file as UTF-8" in message
    assert "\n" not in message
