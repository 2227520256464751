"""The suite dashboard: aggregation on the merged CSVs, and one offline W&B analysis run read back."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from PIL import Image

from biollm_cls.suite import dashboard
from biollm_cls.suite.tables import SUITE_FILES, merge_runs, read_suite_tables, write_tables
from biollm_cls.wandb_offline import read_finished_run, run_files


@pytest.fixture
def suite(tmp_path, make_run):
    """Merged tables of full_cls and no_sleep x 3 seeds (one null final BWT), a failed run, two figures."""
    dirs = [make_run(a, s, null_final_bwt=(a == "no_sleep" and s == 7))
            for a in ("full_cls", "no_sleep") for s in (7, 42, 123)]
    dirs.append(make_run("no_ewc", 7, complete=False))
    tables = tmp_path / "tables"
    write_tables(merge_runs(dirs).tables, tables, SUITE_FILES)
    plots = tmp_path / "plots"
    plots.mkdir()
    for name in ("final_metrics_system", "seen_acc_trajectory_system"):
        Image.new("RGB", (8, 6), "white").save(plots / f"{name}.png")
    return tables, plots


def test_aggregates_skip_missing_values(suite):
    t = read_suite_tables(suite[0])
    stats = dashboard.ablation_stats(t.summary, "system").set_index(["baseline", "metric"])
    bwt = t.summary[(t.summary.view == "system") & (t.summary.baseline == "no_sleep")]["final_bwt"]
    assert stats.loc[("no_sleep", "final_bwt"), "n"] == 2  # the null one is left out, not counted as 0
    assert stats.loc[("no_sleep", "final_bwt"), "mean"] == pytest.approx(bwt.dropna().mean())
    assert stats.loc[("full_cls", "final_seen_acc_avg"), "n"] == 3
    assert "no_ewc" not in dashboard.ablation_order(t.summary)  # the failed run has no rows

    pairs = dashboard.paired_deltas(t.summary, "system", "full_cls", "no_sleep")
    assert sorted(pairs.seed.unique()) == [7, 42, 123]
    row = pairs[(pairs.seed == 42) & (pairs.metric == "final_forgetting")].iloc[0]
    assert row.delta == pytest.approx(row.a - row.b)
    assert math.isnan(pairs[(pairs.seed == 7) & (pairs.metric == "final_bwt")].delta.iloc[0])
    assert dashboard.paired_deltas(t.summary, "system", "full_cls", "absent").empty
    deltas = dashboard.delta_stats(pairs).set_index("metric")
    assert deltas.loc["final_bwt", "n"] == 2 and deltas.loc["seen_acc_auc", "n"] == 3

    traj = dashboard.trajectories(t.boundary_metrics, "base", ["full_cls", "no_sleep"])
    cell = traj[(traj.baseline == "full_cls") & (traj.boundary_index == 2) & (traj.metric == "seen_acc_avg")]
    expected = t.boundary_metrics.query("view == 'base' and baseline == 'full_cls' and boundary_index == 2")
    assert cell["mean"].iloc[0] == pytest.approx(expected.seen_acc_avg.mean()) and cell["n"].iloc[0] == 3


def test_missing_values_are_left_out_never_zero():
    import wandb

    s = dashboard.stats(pd.Series([1, pd.NA, 3], dtype="Int64"))
    assert (s["mean"], s["n"]) == (2.0, 2)
    assert dashboard.stats([None, float("nan")])["n"] == 0 and math.isnan(dashboard.stats([])["mean"])
    assert math.isnan(dashboard.stats([5.0])["std"])
    frame = pd.DataFrame({"a": [1.0, float("nan")], "b": ["x", None], "c": pd.Series([4, pd.NA], dtype="Int64")})
    assert dashboard.to_wandb_table(wandb, frame).data == [[1.0, "x", 4], [None, None, None]]


def test_publish_offline(tmp_path, suite, wandb_env):
    tables, plots = suite
    out = tmp_path / "dash" / "dashboard.json"
    rc = dashboard.main(["--tables-dir", str(tables), "--plots-dir", str(plots), "--suite", "unit",
                         "--output", str(out)])
    assert rc == 0
    facts = json.loads(out.read_text())
    assert facts["status"] == "published" and facts["mode"] == "offline" and facts["runs"] == 6
    assert facts["ablations"] == ["full_cls", "no_sleep"] and facts["missing_baselines"] == []
    assert facts["paired"]["system"]["final_bwt"]["n"] == 2

    (path,) = run_files(tmp_path / "dash")
    rec = read_finished_run(path)
    assert (rec.job_type, rec.group, rec.name, rec.exit_code) == ("analysis", "analysis-unit", "analysis-unit", 0)
    assert rec.run_id == facts["run_id"]
    tops = {k.rsplit("/", 1)[0] for k in rec.keys()}
    for view in ("system", "base"):
        assert {f"by_ablation/{view}/table", f"paired/{view}/table", f"paired/{view}/stats",
                f"trajectory/{view}/table", f"tasks/{view}/table"} <= tops
    assert {"suite/summary_table", "glossary/metrics", "plots/final_metrics_system"} <= tops
    assert rec.summary["paired/system/final_bwt/n"] == 2
    results = next(a for a in rec.artifacts if a["name"] == "unit-suite-results")
    assert {"tables/suite_summary.csv", "tables/task_matrix.csv", "plots/final_metrics_system.png",
            "metric_glossary.json"} <= set(results["files"])


def test_disabled_writes_marker_only(tmp_path, suite, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    out = tmp_path / "d" / "dashboard.json"
    assert dashboard.main(["--tables-dir", str(suite[0]), "--suite", "unit", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["status"] == "disabled"
    assert not (tmp_path / "d" / "wandb").exists()


def test_errors(tmp_path, capsys):
    assert dashboard.main(["--suite", "unit"]) == dashboard.USAGE_ERROR
    empty = tmp_path / "empty"
    empty.mkdir()
    assert dashboard.main(["--tables-dir", str(empty), "--suite", "u", "--output", str(tmp_path / "x.json")]) == 1
    assert "cannot read" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
