"""Run tables and the merge, on synthetic run directories written per docs/run_outputs.md (conftest.py)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from biollm_cls.suite import cli
from biollm_cls.suite.tables import (
    BOUNDARY_COLUMNS,
    SUITE_FILES,
    SUMMARY_COLUMNS,
    TASK_MATRIX_COLUMNS,
    TablesError,
    find_run_dirs,
    merge_runs,
    read_suite_tables,
    run_tables,
    write_tables,
)


def test_run_tables_follow_the_run_directory(make_run):
    run_dir = make_run("full_cls", 42)
    tables = run_tables(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())

    assert list(tables.summary.columns) == SUMMARY_COLUMNS
    assert list(tables.summary["view"]) == ["system", "base"]
    system = tables.summary.set_index("view").loc["system"]
    assert system["run_name"] == "full_cls-seed42" and system["baseline"] == "full_cls" and system["seed"] == 42
    assert system["run_id"] == str(run_dir)
    for key in ("final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc", "plasticity"):
        assert system[key] == pytest.approx(summary["views"]["system"][key])
    assert system["sleep_count"] == 2 and system["num_tasks"] == len(summary["run"]["task_names"]) == 3

    assert list(tables.boundary_metrics.columns) == BOUNDARY_COLUMNS
    assert len(tables.boundary_metrics) == 3 * 2  # boundaries x views
    last = tables.boundary_metrics.query("view == 'base' and boundary_index == 2").iloc[0]
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["seen_acc_avg"] == pytest.approx(row["base/seen_acc_avg"])
    assert last["bwt"] == pytest.approx(row["base/bwt"])
    assert last["task_name"] == "sort" and last["tasks_completed"] == 3

    assert list(tables.task_matrix.columns) == TASK_MATRIX_COLUMNS
    assert len(tables.task_matrix) == (1 + 2 + 3) * 2  # lower-triangular matrix, two views


def test_timing_from_run_metadata(make_run):
    summary = run_tables(make_run("full_cls", 7, timing_in_metadata=True)).summary
    assert (summary["wall_time_s"] == 1.5).all() and (summary["steps_per_s"] == 20.0).all()
    assert summary["replay_size"].isna().all()  # a counter the run did not write stays empty, never 0


def test_run_id_can_be_given(make_run):
    tables = run_tables(make_run("no_sleep", 7), run_id="suite/no_sleep-seed7")
    assert set(tables.summary["run_id"]) == {"suite/no_sleep-seed7"}


def test_a_failed_run_has_no_tables(make_run):
    assert run_tables(make_run("no_ewc", 7, complete=False)) is None


def test_a_failed_run_is_absent_from_the_merge_not_zeros(suite_runs, tmp_path):
    dirs, failed = suite_runs
    result = merge_runs([*dirs, failed])
    assert result.absent == [str(failed)]
    assert len(result.merged) == len(dirs)
    for _, frame in result.tables.items():
        assert "no_ewc" not in set(frame["baseline"])
    write_tables(result.tables, tmp_path / "tables", SUITE_FILES)
    merged = read_suite_tables(tmp_path / "tables")
    assert len(merged.summary) == len(dirs) * 2
    # the suite mean is the mean of the completed runs only
    means = merged.summary.query("view == 'system'").groupby("baseline")["final_seen_acc_avg"].mean()
    assert set(means.index) == {"full_cls", "no_sleep", "seq_ft"}
    assert (means > 0.2).all()


def test_missing_values_stay_empty_not_zero(make_run, tmp_path):
    run_dir = make_run("seq_ft", 7, uncovered="reverse", null_final_bwt=True)
    tables = run_tables(run_dir)
    write_tables(tables, tmp_path)
    summary_csv = (tmp_path / "summary.csv").read_text().splitlines()
    header = summary_csv[0].split(",")
    cells = summary_csv[1].split(",")
    assert cells[header.index("final_bwt")] == ""  # null in summary.json -> empty cell
    assert cells[header.index("uncovered_tasks")] == "reverse"
    matrix = pd.read_csv(tmp_path / "task_matrix.csv")
    uncovered = matrix[matrix["task_name"] == "reverse"]
    assert len(uncovered) > 0
    assert uncovered["token_acc"].isna().all() and uncovered["loss"].isna().all()
    assert (uncovered["n_tokens"] == 0).all()  # a real count of 0 stays 0
    covered = matrix[matrix["task_name"] != "reverse"]
    assert covered["token_acc"].notna().all()


def test_integers_are_written_without_decimals(make_run, tmp_path):
    write_tables(run_tables(make_run("full_cls", 7)), tmp_path)
    lines = (tmp_path / "boundary_metrics.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    assert first[header.index("seed")] == "7" and first[header.index("boundary_index")] == "0"


def test_writes_leave_no_temporary_files(make_run, tmp_path):
    write_tables(run_tables(make_run("full_cls", 7)), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "boundary_metrics.csv", "summary.csv", "task_matrix.csv"]


def test_merge_uses_run_metrics_tables_when_present(suite_runs):
    dirs, _ = suite_runs
    write_tables(run_tables(dirs[0], run_id="from-tables"), dirs[0] / "tables")
    result = merge_runs(dirs)
    assert "from-tables" in set(result.tables.summary["run_id"])
    assert result.tables.summary["seed"].dtype == "Int64"


def test_find_run_dirs_and_order(suite_runs, tmp_path):
    dirs, failed = suite_runs
    found = find_run_dirs(tmp_path / "runs")
    assert set(found) == {*dirs, failed}
    assert found == sorted(found)


def test_malformed_metrics_line_names_file_and_line(make_run):
    run_dir = make_run("full_cls", 7)
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "boundary", \n')
    with pytest.raises(TablesError, match=r"metrics.jsonl:\d+"):
        run_tables(run_dir)


def test_missing_contract_file_is_an_error(make_run):
    run_dir = make_run("full_cls", 7)
    (run_dir / "task_matrix.csv").unlink()
    with pytest.raises(TablesError, match="task_matrix.csv: missing"):
        run_tables(run_dir)


# ------------------------------------------------------------------------------------------------ CLI


def test_run_metrics_cli(make_run, capsys):
    run_dir = make_run("full_cls", 7)
    assert cli.run_metrics_main([str(run_dir)]) == 0
    assert (run_dir / "tables" / "summary.csv").is_file()
    failed = make_run("no_ewc", 7, complete=False)
    assert cli.run_metrics_main([str(failed)]) == 1
    assert not (failed / "tables").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no summary.json" in err[0]


def test_merge_cli(suite_runs, tmp_path, capsys):
    dirs, failed = suite_runs
    out = tmp_path / "suite"
    assert cli.merge_main(["--runs-root", str(tmp_path / "runs"), "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(SUITE_FILES.values())
    assert f"left out {failed}" in capsys.readouterr().err
    summary = pd.read_csv(out / "suite_summary.csv")
    assert len(summary) == len(dirs) * 2
    assert not math.isnan(summary["final_seen_acc_avg"].mean())


@pytest.mark.parametrize("argv", [[], ["--output-dir", "x"], ["a", "--runs-root", "b", "--output-dir", "x"],
                                  ["--runs-root", "/no/such/dir", "--output-dir", "x"]])
def test_merge_cli_usage_errors_are_one_line(argv, capsys):
    assert cli.merge_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_merge_cli_without_completed_runs(make_run, tmp_path):
    failed = make_run("no_ewc", 7, complete=False)
    assert cli.merge_main([str(failed), "--output-dir", str(tmp_path / "suite")]) == 1
    assert not (tmp_path / "suite").exists()
