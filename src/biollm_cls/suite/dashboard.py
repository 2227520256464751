"""Publish a suite's tables and figures as one W&B analysis run: ``python -m biollm_cls.cli publish-dashboard``.

Built only from the merged local CSVs (``merge``) and the PNG figures (``plots``), never from the W&B API,
so it works offline and shows exactly what the report shows. One run (job type ``analysis``, group
``analysis-<suite>``) holds, per view (``system``, ``base``):

- ``suite/summary_table``: the suite summary, one row per run and view;
- ``by_ablation/<view>/table`` and one bar chart per summary metric: mean, std, n over seeds;
- ``paired/<view>/table`` (per-seed values and ``delta = a - b`` of ``--baseline-a`` and ``--baseline-b``,
  same seed), ``paired/<view>/stats`` and a bar chart of the deltas by seed per metric;
- ``trajectory/<view>/table`` and a line chart per boundary metric: mean over seeds per ablation and boundary;
- ``tasks/<view>/table``: the accuracy matrix A[i][j], mean over seeds, per ablation;
- ``plots/<figure>``: the figures; ``glossary/metrics``: the metric glossary;
- an artifact ``<suite>-suite-results`` with the CSVs, the figures and the glossary files.

A missing or NaN value is left out of every mean and counted in no ``n``; it never becomes 0. The command
writes ``--output`` (``dashboard.json``: where the run went and the paired-delta statistics) last, so
Snakemake sees it only after a complete publication. Mode as for training runs: ``--mode`` (default
offline), ``WANDB_MODE`` overrides, online without an API key falls back to offline, ``disabled``
publishes nothing (the marker is still written, with ``status: disabled``).

Exit codes: 0 published (or disabled), 1 the tables cannot be read or W&B failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biollm_cls import metric_glossary
from biollm_cls.run_io import write_json
from biollm_cls.suite.stats import mean_ci
from biollm_cls.suite.tables import (
    BOUNDARY_METRICS,
    SUITE_FILES,
    SUMMARY_METRICS,
    VIEWS,
    TablesError,
    read_suite_tables,
)
from biollm_cls.wandb_logging import resolve_mode, slug

USAGE_ERROR, DATA_ERROR = 2, 1
DEFAULT_A, DEFAULT_B = "full_cls", "no_sleep"
STAT_COLUMNS = ["mean", "std", "n", "ci_low", "ci_high"]
# Counters shown next to the summary metrics in the per-ablation table (not charted): they show, e.g.,
# that a sleep ablation slept and a no-sleep one did not.
COUNTER_METRICS = ["sleep_count", "base_updates_in_sleep", "refresh_count_total", "non_finite_step_count"]


class DashboardError(RuntimeError):
    """The dashboard cannot be built or published (reported as one line, exit code 1)."""


# ---------------------------------------------------------------------------------------------------
# Aggregation (pure pandas; no W&B)


def stats(values: Sequence[float] | pd.Series) -> dict[str, float | int]:
    """Mean, sample std (ddof=1), n and 95% t-interval of the finite values; NaN where undefined."""
    numeric = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    xs = [v for v in numeric if math.isfinite(v)]  # None, NaN, pd.NA and text are left out
    ci = mean_ci(xs)
    std = float(pd.Series(xs).std(ddof=1)) if len(xs) >= 2 else math.nan
    return {"mean": ci.mean, "std": std, "n": ci.n, "ci_low": ci.low, "ci_high": ci.high}


def ablation_order(summary: pd.DataFrame) -> list[str]:
    """Ablations in the order of their first row (the suite's order)."""
    return list(dict.fromkeys(summary["baseline"].dropna().astype(str)))


def ablation_stats(summary: pd.DataFrame, view: str, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """One row per (ablation, metric) of one view: mean/std/n over seeds."""
    rows = []
    part = summary[summary["view"] == view]
    for ablation in ablation_order(summary):
        runs = part[part["baseline"] == ablation]
        for metric in metrics:
            rows.append({"baseline": ablation, "metric": metric, **stats(pd.to_numeric(runs[metric]))})
    return pd.DataFrame(rows, columns=["baseline", "metric", *STAT_COLUMNS])


def paired_deltas(summary: pd.DataFrame, view: str, a: str, b: str,
                  metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Per seed present in both ablations: a, b and ``delta = a - b`` of each metric (NaN stays NaN)."""
    part = summary[summary["view"] == view]
    side = {name: part[part["baseline"] == name].drop_duplicates("seed").set_index("seed") for name in (a, b)}
    seeds = sorted(set(side[a].index) & set(side[b].index))
    rows = []
    for seed in seeds:
        for metric in metrics:
            va, vb = _number(side[a].at[seed, metric]), _number(side[b].at[seed, metric])
            rows.append({"seed": int(seed), "metric": metric, "a": va, "b": vb, "delta": va - vb})
    return pd.DataFrame(rows, columns=["seed", "metric", "a", "b", "delta"])


def delta_stats(pairs: pd.DataFrame, metrics: Sequence[str] = SUMMARY_METRICS) -> pd.DataFrame:
    """Mean/std/n of the paired deltas per metric (n = seeds with both values finite)."""
    rows = [{"metric": m, **stats(pairs.loc[pairs["metric"] == m, "delta"])} for m in metrics]
    return pd.DataFrame(rows, columns=["metric", *STAT_COLUMNS])


def trajectories(boundary: pd.DataFrame, view: str, order: Sequence[str],
                 metrics: Sequence[str] = BOUNDARY_METRICS) -> pd.DataFrame:
    """Mean over seeds per (ablation, boundary index, metric) of one view."""
    part = boundary[boundary["view"] == view]
    rows = []
    for ablation in order:
        runs = part[part["baseline"] == ablation]
        for index in sorted(runs["boundary_index"].dropna().astype(int).unique()):
            at = runs[runs["boundary_index"] == index]
            for metric in metrics:
                rows.append({"baseline": ablation, "boundary_index": int(index), "metric": metric,
                             **stats(pd.to_numeric(at[metric]))})
    return pd.DataFrame(rows, columns=["baseline", "boundary_index", "metric", *STAT_COLUMNS])


def task_means(matrix: pd.DataFrame, view: str, order: Sequence[str]) -> pd.DataFrame:
    """The accuracy matrix A[i][j] per ablation, mean over seeds (uncovered cells are left out)."""
    part = matrix[matrix["view"] == view]
    rows = []
    for ablation in order:
        runs = part[part["baseline"] == ablation]
        for (index, task_id, name), cell in runs.groupby(["boundary_index", "task_id", "task_name"], sort=True):
            rows.append({"baseline": ablation, "boundary_index": int(index), "task_id": int(task_id),
                         "task_name": name, **stats(pd.to_numeric(cell["token_acc"]))})
    return pd.DataFrame(rows, columns=["baseline", "boundary_index", "task_id", "task_name", *STAT_COLUMNS])


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------------------------------------------
# W&B objects


def _cell(value: Any) -> Any:
    """A table cell: NaN/None/pd.NA -> None (an empty cell in W&B), numpy scalars -> Python."""
    if not isinstance(value, (list, tuple, dict)) and pd.isna(value):
        return None
    return value.item() if hasattr(value, "item") else value


def to_wandb_table(wandb: Any, frame: pd.DataFrame) -> Any:
    """A ``wandb.Table`` of a DataFrame with missing values as empty cells (never 0)."""
    data = [[_cell(v) for v in row] for row in frame.astype(object).itertuples(index=False)]
    return wandb.Table(columns=[str(c) for c in frame.columns], data=data)


def _bar(wandb: Any, frame: pd.DataFrame, label: str, value: str, title: str) -> Any:
    finite = frame[pd.to_numeric(frame[value], errors="coerce").notna()][[label, value]]
    finite = finite.assign(**{label: finite[label].astype(str)})
    return wandb.plot.bar(to_wandb_table(wandb, finite), label, value, title=title)


def _lines(wandb: Any, traj: pd.DataFrame, metric: str, order: Sequence[str], title: str) -> Any:
    xs, ys, keys = [], [], []
    for ablation in order:
        part = traj[(traj["baseline"] == ablation) & (traj["metric"] == metric) & traj["mean"].notna()]
        if len(part):
            xs.append(part["boundary_index"].astype(int).tolist())
            ys.append(part["mean"].astype(float).tolist())
            keys.append(ablation)
    return wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="boundary_index")


@dataclass
class SuiteData:
    """The three merged suite tables and the ablations in suite order."""

    summary: pd.DataFrame
    boundary: pd.DataFrame
    matrix: pd.DataFrame
    order: list[str]


def view_payload(wandb: Any, data: SuiteData, view: str, a: str, b: str) -> tuple[dict[str, Any], pd.DataFrame]:
    """Everything logged for one view, and its paired-delta statistics."""
    counters = [c for c in COUNTER_METRICS if c in data.summary.columns]
    by_ablation = ablation_stats(data.summary, view, [*SUMMARY_METRICS, *counters])
    pairs = paired_deltas(data.summary, view, a, b)
    deltas = delta_stats(pairs)
    traj = trajectories(data.boundary, view, data.order)
    payload: dict[str, Any] = {
        f"by_ablation/{view}/table": to_wandb_table(wandb, by_ablation),
        f"paired/{view}/table": to_wandb_table(wandb, pairs),
        f"paired/{view}/stats": to_wandb_table(wandb, deltas),
        f"trajectory/{view}/table": to_wandb_table(wandb, traj),
        f"tasks/{view}/table": to_wandb_table(wandb, task_means(data.matrix, view, data.order)),
    }
    for metric in SUMMARY_METRICS:
        payload[f"by_ablation/{view}/{metric}"] = _bar(
            wandb, by_ablation[by_ablation["metric"] == metric], "baseline", "mean",
            f"{metric} by ablation ({view}; mean over seeds)")
        payload[f"paired/{view}/{metric}"] = _bar(
            wandb, pairs[pairs["metric"] == metric], "seed", "delta", f"{metric}: {a} - {b} by seed ({view})")
    for metric in BOUNDARY_METRICS:
        payload[f"trajectory/{view}/{metric}"] = _lines(
            wandb, traj, metric, data.order, f"{metric} after each boundary ({view}; mean over seeds)")
    return payload, deltas


# ---------------------------------------------------------------------------------------------------
# Publication


@dataclass
class Options:
    """The command's arguments (see ``_parser``)."""

    tables_dir: Path
    plots_dir: Path | None
    suite: str
    output: Path
    project: str = "biollm-cls"
    entity: str | None = None
    mode: str = "offline"
    baseline_a: str = DEFAULT_A
    baseline_b: str = DEFAULT_B
    views: tuple[str, ...] = VIEWS
    wandb_dir: Path | None = None
    run_name: str | None = None
    api_key_env_var: str = "WANDB_API_KEY"


def load(tables_dir: Path) -> SuiteData:
    """The merged suite tables; DashboardError when they are unreadable or hold no run."""
    try:
        tables = read_suite_tables(tables_dir)
    except TablesError as exc:
        raise DashboardError(str(exc)) from None
    if tables.summary.empty:
        raise DashboardError(f"{tables_dir / SUITE_FILES['summary']} holds no run: nothing to publish")
    return SuiteData(tables.summary, tables.boundary_metrics, tables.task_matrix, ablation_order(tables.summary))


def analysis_run_id(opts: Options) -> str:
    """Stable per (project, suite, output): re-publishing updates the same W&B run."""
    key = f"{opts.project}|{opts.suite}|{opts.output.resolve()}"
    return f"analysis-{slug(opts.suite)[:40]}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def plot_paths(plots_dir: Path | None) -> list[Path]:
    """The PNG figures of the plots folder, sorted (none when it is absent)."""
    return sorted(plots_dir.glob("*.png")) if plots_dir and plots_dir.is_dir() else []


def publish(opts: Options, data: SuiteData, mode: str) -> dict[str, Any]:
    """Log the dashboard to one W&B run; returns the facts for ``dashboard.json``."""
    import wandb

    wandb_dir = opts.wandb_dir or opts.output.parent
    wandb_dir.mkdir(parents=True, exist_ok=True)
    key = os.environ.get(opts.api_key_env_var, "").strip()
    run = wandb.init(
        settings=wandb.Settings(api_key=key) if mode == "online" and key else None,
        project=opts.project, entity=opts.entity, mode=mode, dir=str(wandb_dir), id=analysis_run_id(opts),
        resume="allow", name=opts.run_name or f"analysis-{opts.suite}", group=f"analysis-{opts.suite}",
        job_type="analysis", reinit="finish_previous",
        config={"suite": opts.suite, "baseline_a": opts.baseline_a, "baseline_b": opts.baseline_b,
                "views": list(opts.views), "ablations": data.order, "suite_rows": len(data.summary),
                "tables_dir": str(opts.tables_dir), "plots_dir": str(opts.plots_dir)})
    try:
        paired = _log_dashboard(wandb, run, opts, data)
        facts = {"run_id": run.id, "run_name": run.name, "group": run.group, "url": run.url if mode == "online"
                 else None, "offline_dir": str(Path(run.dir).parent) if mode == "offline" else None,
                 "paired": paired}
    except Exception:
        run.finish(exit_code=1)
        raise
    run.finish()
    return facts


def _log_dashboard(wandb: Any, run: Any, opts: Options, data: SuiteData) -> dict[str, Any]:
    payload: dict[str, Any] = {"suite/summary_table": to_wandb_table(wandb, data.summary),
                               "glossary/metrics": metric_glossary.wandb_table(wandb)}
    paired: dict[str, Any] = {}
    for view in opts.views:
        view_logs, deltas = view_payload(wandb, data, view, opts.baseline_a, opts.baseline_b)
        payload.update(view_logs)
        paired[view] = {row["metric"]: {k: _cell(row[k]) for k in ("mean", "std", "n")}
                        for row in deltas.to_dict("records")}
    plots = plot_paths(opts.plots_dir)
    payload.update({f"plots/{p.stem}": wandb.Image(str(p), caption=p.name) for p in plots})
    run.log(payload)
    run.summary.update({f"paired/{view}/{metric}/{k}": v for view, per in paired.items()
                        for metric, s in per.items() for k, v in s.items()})
    run.log_artifact(_results_artifact(wandb, opts, plots))
    return paired


def _results_artifact(wandb: Any, opts: Options, plots: list[Path]) -> Any:
    artifact = wandb.Artifact(f"{slug(opts.suite)}-suite-results", type="suite-results",
                              description=f"Suite tables and figures of {opts.suite}.")
    for name in SUITE_FILES.values():
        artifact.add_file(str(opts.tables_dir / name), name=f"tables/{name}")
    for path in plots:
        artifact.add_file(str(path), name=f"plots/{path.name}")
    json_path, md_path = metric_glossary.write_glossary((opts.wandb_dir or opts.output.parent) / "wandb" / "glossary")
    artifact.add_file(str(json_path), name=json_path.name)
    artifact.add_file(str(md_path), name=md_path.name)
    return artifact


def run_dashboard(opts: Options) -> dict[str, Any]:
    """Load, publish (unless disabled) and write the marker; returns the marker's content."""
    data = load(opts.tables_dir)
    missing = [b for b in (opts.baseline_a, opts.baseline_b) if b not in data.order]
    mode = resolve_mode(opts.mode, opts.api_key_env_var)
    facts: dict[str, Any] = {
        "status": "disabled" if mode == "disabled" else "published", "suite": opts.suite, "mode": mode,
        "project": opts.project, "entity": opts.entity, "baseline_a": opts.baseline_a,
        "baseline_b": opts.baseline_b, "missing_baselines": missing, "views": list(opts.views),
        "ablations": data.order, "runs": int(data.summary["run_id"].nunique()),
        "plots": [str(p) for p in plot_paths(opts.plots_dir)],
    }
    if mode != "disabled":
        try:
            facts.update(publish(opts, data, mode))
        except Exception as exc:  # W&B raises many types; report one line
            raise DashboardError(f"W&B publication failed ({type(exc).__name__}: {exc})") from exc
    write_json(opts.output, facts)  # atomic; NaN -> null
    return facts


# ---------------------------------------------------------------------------------------------------
# Command line


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="biollm-cls publish-dashboard",
                description="Publish a suite's merged tables and figures as one W&B analysis run.")
    p.add_argument("--tables-dir", type=Path, required=True, help="directory with the merge command's CSVs")
    p.add_argument("--plots-dir", type=Path, default=None, help="directory with the plots command's PNGs")
    p.add_argument("--suite", required=True, help="suite name (W&B group analysis-<suite>)")
    p.add_argument("--output", type=Path, required=True, help="marker file to write (dashboard.json)")
    p.add_argument("--project", default="biollm-cls")
    p.add_argument("--entity", default=None)
    p.add_argument("--mode", choices=("offline", "online", "disabled"), default="offline",
                   help="W&B mode (WANDB_MODE overrides; online without an API key falls back to offline)")
    p.add_argument("--baseline-a", default=DEFAULT_A, help="first ablation of the paired deltas (a - b)")
    p.add_argument("--baseline-b", default=DEFAULT_B, help="second ablation of the paired deltas")
    p.add_argument("--views", nargs="+", choices=VIEWS, default=list(VIEWS))
    p.add_argument("--wandb-dir", type=Path, default=None, help="W&B files go to DIR/wandb (default: the output's dir)")
    p.add_argument("--run-name", default=None, help="W&B run name (default analysis-<suite>)")
    p.add_argument("--api-key-env-var", default="WANDB_API_KEY")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    opts = Options(**{k: v for k, v in vars(args).items() if k != "views"}, views=tuple(args.views))
    try:
        facts = run_dashboard(opts)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return DATA_ERROR
    where = facts.get("url") or facts.get("offline_dir") or "nowhere (mode disabled)"
    print(f"publish-dashboard: {facts['runs']} runs, {len(facts['ablations'])} ablations -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
