"""Suite figures (PNG) drawn from the merged suite tables, one set per view (system, base).

- ``seen_acc_trajectory_<view>.png``: seen-task accuracy after each task boundary, one line per ablation,
  mean over seeds with a 95% t-interval band;
- ``final_metrics_<view>.png``: final seen accuracy, forgetting, BWT and seen-accuracy AUC per ablation
  (bar = mean, whisker = 95% t-interval, dots = seeds);
- ``paired_deltas_<view>.png``: per-seed differences ``ablation − reference`` (same seed, so the data
  order and initialisation are shared) for the same four metrics, with mean and 95% t-interval;
- ``task_matrix_<view>.png``: the accuracy matrix A[i][j] (accuracy on task j after learning task i),
  mean over seeds, one heatmap per ablation.

Figures are built on ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state) and written atomically.
A figure whose data are missing still gets written, with a note saying what is missing, so the pipeline's
outputs always exist and the report says why a panel is empty.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from biollm_cls.suite.io import atomic_path
from biollm_cls.suite.stats import mean_ci
from biollm_cls.suite.tables import VIEWS, read_suite_tables

PLOT_NAMES = ("seen_acc_trajectory", "final_metrics", "paired_deltas", "task_matrix")
DEFAULT_REFERENCE = "full_cls"

# metric -> (panel title with the better direction, y-axis label)
FINAL_METRICS = {
    "final_seen_acc_avg": ("final seen-task accuracy (↑)", "mean accuracy over seen tasks"),
    "final_forgetting": ("final forgetting (↓)", "forgetting"),
    "final_bwt": ("final backward transfer, BWT (↑)", "BWT"),
    "seen_acc_auc": ("seen-accuracy AUC over boundaries (↑)", "AUC"),
}
DIRECTIONS = "↑ higher is better, ↓ lower is better"
VIEW_TITLES = {"system": "system view (base + hippocampus)", "base": "base view (consolidated neocortex)"}
DPI = 110


def plot_files(output_dir: str | os.PathLike, views: Sequence[str] = VIEWS) -> list[Path]:
    """The PNG paths ``plot_suite`` writes, in a fixed order."""
    return [Path(output_dir) / f"{name}_{view}.png" for view in views for name in PLOT_NAMES]


def plot_suite(tables_dir: str | os.PathLike, output_dir: str | os.PathLike, views: Sequence[str] = VIEWS,
               reference: str = DEFAULT_REFERENCE) -> list[Path]:
    """Draw every suite figure for ``views`` from the suite tables in ``tables_dir``."""
    tables = read_suite_tables(tables_dir)
    order = list(dict.fromkeys(tables.summary["baseline"].dropna()))
    colors = _colors(order)
    written = []
    for view in views:
        summary = tables.summary[tables.summary["view"] == view]
        boundary = tables.boundary_metrics[tables.boundary_metrics["view"] == view]
        matrix = tables.task_matrix[tables.task_matrix["view"] == view]
        figures = {
            "seen_acc_trajectory": trajectory_figure(boundary, order, colors, view),
            "final_metrics": final_metrics_figure(summary, order, colors, view),
            "paired_deltas": paired_deltas_figure(summary, order, colors, view, reference),
            "task_matrix": task_matrix_figure(matrix, order, view),
        }
        for name in PLOT_NAMES:
            written.append(save(figures[name], Path(output_dir) / f"{name}_{view}.png"))
    return written


def save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    return path


# --------------------------------------------------------------------------------------------- figures


def trajectory_figure(boundary: pd.DataFrame, order: list[str], colors: dict, view: str) -> Figure:
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for ablation in order:
        rows = boundary[boundary["baseline"] == ablation]
        if rows["seen_acc_avg"].notna().sum() == 0:
            continue
        xs, means, lows, highs, n_seeds = [], [], [], [], 0
        for index, group in rows.groupby("boundary_index", sort=True):
            ci = mean_ci(group["seen_acc_avg"])
            if ci.n == 0:
                continue
            xs.append(int(index) + 1)
            means.append(ci.mean)
            lows.append(ci.low)
            highs.append(ci.high)
            n_seeds = max(n_seeds, ci.n)
        ax.plot(xs, means, marker="o", color=colors[ablation], label=f"{ablation} (n={n_seeds})")
        ax.fill_between(xs, lows, highs, color=colors[ablation], alpha=0.15, linewidth=0)
        drawn += 1
    ax.set_title(f"Seen-task accuracy after each task boundary — {VIEW_TITLES.get(view, view)}\n"
                 "mean over seeds, band = 95% t-interval")
    ax.set_xlabel("tasks learned so far (task boundary)")
    ax.set_ylabel("mean accuracy over seen tasks")
    ax.grid(alpha=0.3)
    if drawn:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(title="ablation (seeds)", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        _note(ax, "no boundary metrics for this view")
    return fig


def final_metrics_figure(summary: pd.DataFrame, order: list[str], colors: dict, view: str) -> Figure:
    fig = Figure(figsize=(max(10, 1.2 * len(order) + 5), 8.5), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for ax, (metric, (title, ylabel)) in zip(axes, FINAL_METRICS.items(), strict=True):
        _bars_with_seeds(ax, order, colors, {a: summary.loc[summary["baseline"] == a, metric] for a in order})
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    fig.suptitle(f"Final metrics per ablation — {VIEW_TITLES.get(view, view)}\n"
                 f"bar = mean over seeds, whisker = 95% t-interval, dots = individual seeds; {DIRECTIONS}")
    return fig


def paired_deltas_figure(summary: pd.DataFrame, order: list[str], colors: dict, view: str,
                         reference: str) -> Figure:
    others = [a for a in order if a != reference]
    fig = Figure(figsize=(max(10, 1.2 * len(others) + 5), 8.5), layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    ref = summary[summary["baseline"] == reference].set_index("seed")
    for ax, (metric, (title, ylabel)) in zip(axes, FINAL_METRICS.items(), strict=True):
        ax.set_title(f"Δ {title}")
        ax.set_ylabel(f"Δ {ylabel} (ablation − {reference})")
        if ref.empty or not others:
            _note(ax, f"reference ablation {reference!r} not in this suite" if ref.empty
                  else "no other ablation to compare")
            continue
        deltas = {}
        for ablation in others:
            rows = summary[summary["baseline"] == ablation].set_index("seed")
            common = rows.index.intersection(ref.index)  # pair by seed; a seed missing on either side drops out
            deltas[ablation] = (rows.loc[common, metric] - ref.loc[common, metric]).astype(float)
        _points_with_ci(ax, others, colors, deltas)
        ax.axhline(0.0, color="black", linewidth=0.8)
    fig.suptitle(f"Paired per-seed differences against {reference} — {VIEW_TITLES.get(view, view)}\n"
                 "dots = seeds (same seed = same data order and initialisation), diamond = mean, "
                 f"whisker = 95% t-interval; {DIRECTIONS}")
    return fig


def task_matrix_figure(matrix: pd.DataFrame, order: list[str], view: str) -> Figure:
    present = [a for a in order if (matrix["baseline"] == a).any()]
    ncols = min(3, max(1, len(present)))
    nrows = max(1, math.ceil(len(present) / ncols))
    fig = Figure(figsize=(4.6 * ncols + 1.2, 4.2 * nrows + 0.8), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if not present:
        _note(axes[0], "no task matrix for this view")
        axes[0].set_axis_off()
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    image = None
    for ax, ablation in zip(axes, present, strict=False):
        rows = matrix[matrix["baseline"] == ablation]
        grid = rows.pivot_table(index="boundary_index", columns="task_id", values="token_acc", aggfunc="mean",
                                dropna=False)
        names = rows.drop_duplicates("task_id").set_index("task_id")["task_name"]
        labels = _task_labels([str(names.get(t, t)) for t in grid.columns])
        image = ax.imshow(grid.to_numpy(dtype=float), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(grid.shape[0]), [str(int(i) + 1) for i in grid.index], fontsize=8)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after learning task #")
        ax.set_title(f"{ablation} (n={rows['seed'].nunique()} seeds)")
        if grid.size <= 144:
            _annotate(ax, grid.to_numpy(dtype=float))
    for ax in axes[len(present):]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=list(axes[: len(present)]), shrink=0.8, label="token accuracy (mean over seeds)")
    fig.suptitle(f"Accuracy matrix A[i][j] — {VIEW_TITLES.get(view, view)}\n"
                 "row = after learning task i, column = task j evaluated; grey = not evaluated")
    return fig


# --------------------------------------------------------------------------------------------- helpers


def _colors(order: list[str]) -> dict[str, tuple]:
    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(order)}


def _jitter(n: int, width: float = 0.25) -> np.ndarray:
    """Deterministic horizontal offsets so seed dots do not sit on top of each other."""
    return np.zeros(1) if n == 1 else np.linspace(-width / 2, width / 2, n)


def _bars_with_seeds(ax: Axes, order: list[str], colors: dict, values: dict[str, pd.Series]) -> None:
    if not any(v.notna().any() for v in values.values()):
        _note(ax, "no values")
        return
    for x, ablation in enumerate(order):
        ci = mean_ci(values[ablation])
        if ci.n == 0:
            ax.text(x, 0, "no data", ha="center", va="bottom", fontsize=8, rotation=90)
            continue
        err = None if math.isnan(ci.low) else [[ci.mean - ci.low], [ci.high - ci.mean]]
        ax.bar(x, ci.mean, color=colors[ablation], alpha=0.55, width=0.7)
        ax.errorbar(x, ci.mean, yerr=err, color="black", capsize=4, linewidth=1.2)
        seeds = values[ablation].dropna().to_numpy(dtype=float)
        ax.scatter(x + _jitter(len(seeds)), seeds, color="black", s=14, zorder=3)
    _ablation_axis(ax, order)


def _points_with_ci(ax: Axes, order: list[str], colors: dict, values: dict[str, pd.Series]) -> None:
    for x, ablation in enumerate(order):
        seeds = values[ablation].dropna().to_numpy(dtype=float)
        if len(seeds) == 0:
            ax.text(x, 0, "no paired seeds", ha="center", va="bottom", fontsize=8, rotation=90)
            continue
        ax.scatter(x + _jitter(len(seeds)), seeds, color=colors[ablation], s=18, zorder=3)
        ci = mean_ci(seeds)
        err = None if math.isnan(ci.low) else [[ci.mean - ci.low], [ci.high - ci.mean]]
        ax.errorbar(x + 0.3, ci.mean, yerr=err, fmt="D", color="black", capsize=4, markersize=5)
    _ablation_axis(ax, order)


def _ablation_axis(ax: Axes, order: list[str]) -> None:
    ax.set_xticks(range(len(order)), order, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.grid(axis="y", alpha=0.3)


def _annotate(ax: Axes, grid: np.ndarray) -> None:
    for (i, j), value in np.ndenumerate(grid):
        if math.isfinite(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.5 else "black")


def _task_labels(names: list[str], width: int = 16) -> list[str]:
    """Tick labels: a prefix all names share up to an underscore (``synth_``, ``task``) is dropped, long
    names are cut."""
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    prefix = prefix[: prefix.rfind("_") + 1]
    short = [n[len(prefix):] or n for n in names]
    return [n if len(n) <= width else n[: width - 1] + "…" for n in short]


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="dimgray")

