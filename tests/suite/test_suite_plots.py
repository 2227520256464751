"""Suite figures are written (valid PNGs, one set per view), including degenerate suites."""

from __future__ import annotations

import pytest

from biollm_cls.suite import cli
from biollm_cls.suite.plots import PLOT_NAMES, plot_files, plot_suite
from biollm_cls.suite.tables import SUITE_FILES, merge_runs, write_tables

PNG = b"\x89PNG\r\n\x1a\n"


def _suite_tables(run_dirs, out):
    write_tables(merge_runs(run_dirs).tables, out, SUITE_FILES)
    return out


def _assert_pngs(paths):
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 5000, path


def test_every_figure_is_written_for_both_views(suite_runs, tmp_path):
    dirs, failed = suite_runs
    tables = _suite_tables([*dirs, failed], tmp_path / "tables")
    written = plot_suite(tables, tmp_path / "plots")
    assert written == plot_files(tmp_path / "plots")
    assert len(written) == 2 * len(PLOT_NAMES)
    _assert_pngs(written)
    assert not [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(".")]  # no temp files left


def test_one_seed_and_no_reference(make_run, tmp_path):
    runs = [make_run("no_sleep", 7), make_run("seq_ft", 7, uncovered="copy")]
    tables = _suite_tables(runs, tmp_path / "tables")
    _assert_pngs(plot_suite(tables, tmp_path / "plots", views=["system"], reference="full_cls"))


def test_a_view_without_data_still_gets_its_figures(make_run, tmp_path):
    tables = _suite_tables([make_run("full_cls", 7, views=("system",))], tmp_path / "tables")
    written = plot_suite(tables, tmp_path / "plots", views=["base"])
    assert [p.name for p in written] == [f"{name}_base.png" for name in PLOT_NAMES]
    _assert_pngs(written)


def test_plots_cli(suite_runs, tmp_path, capsys):
    dirs, _ = suite_runs
    tables = _suite_tables(dirs, tmp_path / "tables")
    assert cli.plots_main(["--tables-dir", str(tables), "--output-dir", str(tmp_path / "p"),
                           "--views", "base"]) == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(f"{n}_base.png" for n in PLOT_NAMES)
    capsys.readouterr()


@pytest.mark.parametrize("argv", [["--output-dir", "x"], ["--tables-dir", "/no/such", "--output-dir", "x"],
                                  ["--tables-dir", ".", "--output-dir", "x", "--views", "neither"]])
def test_plots_cli_usage_errors(argv, capsys):
    assert cli.plots_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
