"""The pack builder: selection with a known answer, determinism, checksums, sources and clean failures."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from biollm_cls.benchmarks.errors import DataError
from biollm_cls.benchmarks.instruction import build_instruction_stream
from biollm_cls.benchmarks.packs.builder import normalize_text, verify_pack
from biollm_cls.benchmarks.packs.cli import main

SEED = 7
NI_SAMPLE = Path(__file__).resolve().parents[2] / ".." / "shared" / "ni-sample" / "tasks"


def fixture_rows() -> list[dict]:
    """10 tasks; task k has 6 + k distinct instructions. 'task_dup' has 12 rows but only 7 distinct."""
    rows = [{"task": f"task_{k}", "instruction": f"input {k}-{i}", "output": [f"out {i}", "alt"]}
            for k in range(10) for i in range(6 + k)]
    rows += [{"task": "task_dup", "instruction": f"dup {i % 7}", "output": "x"} for i in range(12)]
    rows.append({"task": "task_9", "instruction": " \t ", "output": "dropped: empty"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build(src: Path, out: Path, *extra: str) -> int:
    return main(["--source", "jsonl", "--path", str(src), "--output-dir", str(out), "--num-tasks", "3",
                 "--task-selection-seed", str(SEED), "--min-usable-per-task", "10", "--train-per-task", "6",
                 "--eval-per-task", "4", "--no-progress", *extra])


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_selection_and_split_match_the_procedure(tmp_path: Path):
    src = write_rows(tmp_path / "src.jsonl", fixture_rows())
    assert build(src, tmp_path / "pack") == 0
    # independently: tasks with >= 10 distinct instructions are task_4..task_9 (task_dup has 7)
    expected = [f"task_{k}" for k in range(4, 10)]
    random.Random(SEED).shuffle(expected)
    expected = expected[:3]
    metadata = json.loads((tmp_path / "pack" / "metadata.json").read_text())
    assert metadata["selected_tasks"] == expected
    train, evals = read(tmp_path / "pack" / "train.jsonl"), read(tmp_path / "pack" / "eval.jsonl")
    assert [r["task"] for r in train] == [t for t in expected for _ in range(6)]  # training order
    for task in expected:
        k = int(task.split("_")[1])
        rows = [f"input {k}-{i}" for i in range(6 + k)]
        random.Random(SEED ^ int(hashlib.sha256(task.encode()).hexdigest()[:16], 16)).shuffle(rows)
        assert [r["instruction"] for r in evals if r["task"] == task] == rows[:4]
        assert [r["instruction"] for r in train if r["task"] == task] == rows[4:10]
    assert all(r["output"].startswith("out ") for r in train + evals)  # first non-empty output
    assert metadata["totals"]["rows_dropped_empty"] == 1
    assert metadata["task_counts"][expected[0]]["train"] == 6


def test_dedupe_before_slicing_keeps_eval_and_train_disjoint(tmp_path: Path):
    rows = [{"task": t, "instruction": f"{t} q{i % 12}", "output": "a"} for t in ("a", "b") for i in range(30)]
    src = write_rows(tmp_path / "src.jsonl", rows)
    assert main(["--source", "jsonl", "--path", str(src), "--output-dir", str(tmp_path / "p"), "--num-tasks", "2",
                 "--min-usable-per-task", "12", "--train-per-task", "8", "--eval-per-task", "4"]) == 0
    train, evals = read(tmp_path / "p" / "train.jsonl"), read(tmp_path / "p" / "eval.jsonl")
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in evals}
    assert len(train) == 16 and len(evals) == 8
    metadata = json.loads((tmp_path / "p" / "metadata.json").read_text())
    assert metadata["task_counts"]["a"]["duplicates_removed"] == 18


def test_two_builds_are_identical_and_verify(tmp_path: Path):
    src = write_rows(tmp_path / "src.jsonl", fixture_rows())
    assert build(src, tmp_path / "one") == 0 and build(src, tmp_path / "two") == 0
    for name in ("train.jsonl", "eval.jsonl", "metadata.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    metadata = verify_pack(tmp_path / "one" / "train.jsonl")
    assert set(metadata["checksums"]) == {"train_jsonl_sha256", "eval_jsonl_sha256", "task_list_sha256"}
    (tmp_path / "one" / "eval.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="eval.jsonl: sha256"):
        verify_pack(tmp_path / "one")


def test_rebuild_replaces_a_pack_but_never_a_foreign_folder(tmp_path: Path):
    src = write_rows(tmp_path / "src.jsonl", fixture_rows())
    assert build(src, tmp_path / "pack") == 0 and build(src, tmp_path / "pack") == 0
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert build(src, foreign) == 2
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("case", ["missing_source", "too_few_tasks", "malformed_line", "missing_field"])
def test_errors_leave_no_partial_output(tmp_path: Path, capsys: pytest.CaptureFixture, case: str):
    src = tmp_path / "src.jsonl"
    rows = fixture_rows()
    text = "".join(json.dumps(r) + "\n" for r in rows)
    expected = {"missing_source": "no such file", "too_few_tasks": "only 6 of 11 tasks",
                "malformed_line": "src.jsonl:5: malformed JSON", "missing_field": "src.jsonl:3 (field 'output')"}
    if case == "malformed_line":
        lines = text.splitlines(keepends=True)
        text = "".join(lines[:4] + ['{"task": "x", \n'] + lines[4:])
    if case == "missing_field":
        del rows[2]["output"]
        text = "".join(json.dumps(r) + "\n" for r in rows)
    if case != "missing_source":
        src.write_text(text)
    before = set(tmp_path.iterdir())
    extra = ["--num-tasks", "7"] if case == "too_few_tasks" else []
    assert build(src, tmp_path / "out" / "pack", *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected[case] in err
    assert set(tmp_path.iterdir()) == before  # no pack, no temp folder, not even the parent


def test_usage_errors_exit_2(tmp_path: Path):
    assert main(["--source", "jsonl"]) == 2  # --output-dir missing
    assert main(["--source", "nope", "--output-dir", str(tmp_path)]) == 2
    assert main(["--source", "jsonl", "--output-dir", str(tmp_path / "p")]) == 2  # --path missing
    assert main(["--source", "synthetic", "--output-dir", str(tmp_path / "p"), "--min-usable-per-task", "5"]) == 2


def write_ni_task(folder: Path, name: str, n: int, definition: list[str]) -> None:
    task = {"Definition": definition, "Positive Examples": [], "Instances": [
        {"id": f"{name}-{i}", "input": f"{name}\tinput\n{i}", "output": ["", f"answer {i}"]} for i in range(n)]}
    (folder / f"{name}.json").write_text(json.dumps(task))


def test_ni_task_dir_source_with_and_without_definition(tmp_path: Path):
    tasks = tmp_path / "ni" / "tasks"
    tasks.mkdir(parents=True)
    for k in range(3):
        write_ni_task(tasks, f"task{k:03d}_demo", 12, [f"Do thing {k}.", "Carefully."])
    args = ["--source", "ni-tasks", "--path", str(tmp_path / "ni"), "--num-tasks", "2",
            "--min-usable-per-task", "10", "--train-per-task", "6", "--eval-per-task", "4"]
    assert main([*args, "--output-dir", str(tmp_path / "with")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "without"), "--no-include-definition"]) == 0
    with_def = read(tmp_path / "with" / "train.jsonl")[0]
    k = with_def["task"][6]
    assert with_def["instruction"].startswith(f"Do thing {k}. Carefully.\n\n{with_def['task']} input ")
    assert with_def["output"].startswith("answer ")  # first non-empty output
    without = read(tmp_path / "without" / "train.jsonl")[0]
    assert without["instruction"].startswith(f"{without['task']} input ")
    metadata = json.loads((tmp_path / "with" / "metadata.json").read_text())
    assert metadata["include_definition"] is True and metadata["source"]["kind"] == "ni-tasks"


def test_ni_task_file_missing_instances_is_named(tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "task1.json").write_text(json.dumps({"Definition": ["x"]}))
    assert main(["--source", "ni-tasks", "--path", str(tmp_path), "--output-dir", str(tmp_path / "p")]) == 2
    assert "task1.json:1 (field 'Instances')" in capsys.readouterr().err


def test_normalize_text():
    assert normalize_text(" a\tb\x00c\n\n d ") == "a b c d"
    assert normalize_text(None) == ""


def test_real_ni_sample_pack_and_stream(tmp_path: Path, make_cfg):
    if not NI_SAMPLE.is_dir():
        pytest.skip(f"{NI_SAMPLE} not present")
    out = tmp_path / "ni8"
    assert main(["--source", "ni-tasks", "--path", str(NI_SAMPLE), "--output-dir", str(out),
                 "--min-usable-per-task", "100", "--train-per-task", "50", "--eval-per-task", "20"]) == 0
    metadata = json.loads((out / "metadata.json").read_text())
    assert len(metadata["selected_tasks"]) == 8 and metadata["totals"]["train_rows"] == 400
    cfg = make_cfg(f"benchmark.local_path={out / 'train.jsonl'}", f"benchmark.eval_local_path={out / 'eval.jsonl'}",
                   "benchmark.num_tasks=8", "model.seq_len=256", "benchmark.heldout_per_task=20")
    stream = build_instruction_stream(cfg)
    assert stream.task_names == metadata["selected_tasks"]
    batch = stream.train_batch(1, 4)
    assert batch.input_ids.shape == (4, 256) and batch.supervised.any(1).all()
    assert stream.describe()["counts"]["duplicates_removed"] == 0


def test_verify_refuses_a_pack_without_checksums(tmp_path: Path):
    src = write_rows(tmp_path / "src.jsonl", fixture_rows())
    assert build(src, tmp_path / "p") == 0
    meta_file = tmp_path / "p" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    for checksums, missing in (({}, "records no checksums"), (None, "records no checksums"),
                               ({k: v for k, v in metadata["checksums"].items() if k != "train_jsonl_sha256"},
                                "records no checksum train_jsonl_sha256")):
        meta_file.write_text(json.dumps({**metadata, "checksums": checksums}))
        with pytest.raises(DataError, match=missing):
            verify_pack(tmp_path / "p")


def test_duplicate_task_names_in_metadata_are_refused(tmp_path: Path):
    src = write_rows(tmp_path / "src.jsonl", fixture_rows())
    assert build(src, tmp_path / "p") == 0
    meta_file = tmp_path / "p" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    metadata["selected_tasks"].append(metadata["selected_tasks"][0])
    meta_file.write_text(json.dumps(metadata))
    with pytest.raises(DataError, match="is listed twice"):
        verify_pack(tmp_path / "p")


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_source_is_a_one_line_data_error(tmp_path: Path, capsys: pytest.CaptureFixture, suffix: str):
    from biollm_cls.benchmarks.packs.sources import read_json_records

    src = tmp_path / f"src{suffix}"
    if suffix == ".jsonl":
        src.write_bytes(b'{"task": "a", "instruction": "ok", "output": "x"}\n{"task": "a", "instruction": "\xff"}\n')
    else:
        src.write_bytes(b'[{"task": "a",\n "instruction": "\xff"}]\n')
    with pytest.raises(DataError, match=rf"src{suffix}:2: not valid UTF-8 \(byte 0xff"):
        list(read_json_records(src))
    if suffix == ".jsonl":
        assert build(src, tmp_path / "out") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "src.jsonl:2: not valid UTF-8" in err and not (tmp_path / "out").exists()


def test_utf8_bom_on_the_first_line_is_accepted(tmp_path: Path):
    from biollm_cls.benchmarks.packs.sources import read_json_records

    src = tmp_path / "bom.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"task": "a", "instruction": "i", "output": "o"}\n')
    assert [r["task"] for _, r in read_json_records(src)] == ["a"]
