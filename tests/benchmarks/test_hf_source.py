"""Hugging Face `datasets` inputs, with `load_dataset` replaced by an in-memory dataset (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from biollm_cls.benchmarks.instruction import build_instruction_stream  # noqa: E402
from biollm_cls.benchmarks.packs.cli import main  # noqa: E402


def ni_rows(n_tasks: int = 3, n: int = 12) -> list[dict]:
    return [{"task_name": f"task{k}", "inputs": f"input {k} {i}", "targets": [f"out {i}"], "definition": f"Do {k}."}
            for k in range(n_tasks) for i in range(n)]


def test_hf_source_retries_without_checks_on_expected_more_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    def fake_load(name, config, split, verification_mode):
        calls.append(verification_mode)
        if verification_mode != "no_checks":
            raise ValueError("ExpectedMoreSplitsError: {'test'}")
        return datasets.Dataset.from_list(ni_rows())

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert main(["--source", "hf", "--output-dir", str(tmp_path / "p"), "--num-tasks", "2",
                 "--min-usable-per-task", "10", "--train-per-task", "6", "--eval-per-task", "4"]) == 0
    assert calls == ["basic_checks", "no_checks"]
    metadata = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert metadata["source"]["verification_mode_used"] == "no_checks"
    assert metadata["dataset_name"] == "Muennighoff/natural-instructions"
    first = json.loads((tmp_path / "p" / "train.jsonl").read_text().splitlines()[0])
    assert first["instruction"].startswith("Do ") and first["output"].startswith("out ")


def test_strict_mode_does_not_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    def fake_load(name, config, split, verification_mode):
        raise ValueError("ExpectedMoreSplitsError: {'test'}")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert main(["--source", "hf", "--output-dir", str(tmp_path / "p"), "--verification-mode", "strict"]) == 2
    assert "cannot load dataset" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_stream_from_a_dataset(monkeypatch: pytest.MonkeyPatch, make_cfg):
    rows = [{"instruction": f"q {t} {i}", "output": "a", "task": t} for t in ("x", "y") for i in range(10)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: datasets.Dataset.from_list(rows))
    stream = build_instruction_stream(make_cfg("benchmark.dataset_name=fake/data", "benchmark.num_tasks=2",
                                               "benchmark.max_examples=15"))
    assert stream.task_names == ["x", "y"]
    facts = stream.describe()  # 15 records: x has 10 (2 held out), y has 5 (1 held out)
    assert facts["counts"]["records_read"] == 15 and facts["train_rows"] == {"x": 8, "y": 4}
