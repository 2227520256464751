"""The synthetic 8-task pack: correct answers, short prompts, disjoint pretraining families, determinism."""

from __future__ import annotations

import json
from pathlib import Path

from biollm_cls.benchmarks.packs.cli import main
from biollm_cls.benchmarks.packs.synthetic import PRETRAIN_FAMILIES, TASKS


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answer(task: str, instruction: str) -> str:
    """Re-derive each task's answer from its prompt, independently of the generators."""
    head, arg = instruction.split(": ", 1)
    if task == "synth_first_k":
        return arg[: int(head.split()[1])]
    if task == "synth_skip_k":
        return arg[int(head.split()[1]):]
    if task == "synth_sort_digits":
        return "".join(sorted(arg))
    if task == "synth_unique_digits":
        return "".join(c for i, c in enumerate(arg) if c not in arg[:i])
    if task == "synth_add_sub":
        return str(eval(arg))  # noqa: S307 - digits and +/- only, from our own generator
    if task == "synth_count_letter":
        return str(arg.count(head.split()[1]))
    if task == "synth_reverse_words":
        return " ".join(arg.split()[::-1])
    assert task == "synth_uppercase"
    return arg.upper()


def test_answers_lengths_and_metadata(synthetic_pack: Path):
    rows = read(synthetic_pack / "train.jsonl") + read(synthetic_pack / "eval.jsonl")
    assert {r["task"] for r in rows} == set(TASKS)
    for r in rows:
        assert r["output"] == answer(r["task"], r["instruction"]), r
        assert len((r["instruction"] + r["output"]).encode()) <= 40
    metadata = json.loads((synthetic_pack / "metadata.json").read_text())
    assert metadata["include_definition"] is False  # one-line instructions; definitions in metadata only
    assert all(len(d) > 40 for d in metadata["task_definitions"].values())
    assert "pretrain_jsonl_sha256" in metadata["checksums"]


def test_pretrain_families_are_disjoint(synthetic_pack: Path):
    pretrain = read(synthetic_pack / "pretrain.jsonl")
    assert {r["task"] for r in pretrain} == set(PRETRAIN_FAMILIES)
    task_words = {r["instruction"].split()[0] for r in read(synthetic_pack / "train.jsonl")}
    pretrain_words = {r["instruction"].split()[0] for r in pretrain}
    assert not task_words & pretrain_words


def test_cli_builds_are_deterministic(tmp_path: Path):
    args = ["--source", "synthetic", "--min-usable-per-task", "30", "--train-per-task", "20",
            "--eval-per-task", "10", "--pretrain-per-task", "20"]
    assert main([*args, "--output-dir", str(tmp_path / "a")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "b")]) == 0
    meta_a = json.loads((tmp_path / "a" / "metadata.json").read_text())
    meta_b = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta_a["checksums"] == meta_b["checksums"]
    assert len(meta_a["selected_tasks"]) == 8
