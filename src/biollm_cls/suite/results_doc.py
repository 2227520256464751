"""docs/results.md from suite tables: every ablation and variant, paired per seed against a reference.

``python -m biollm_cls.cli write-results --suite results/study/tables --suite results/variants/tables
--reference er_matched --output docs/results.md`` reads each suite's ``suite_summary.csv`` (the pipeline's
merged table), pairs every run with the reference ablation's run of the same seed (the reference is looked
up in all given suites: variants run on the same pack and base as the study), and writes one Markdown
table per view with the mean over seeds, the paired mean delta and its 95% t-interval, wins / seeds,
and the budget ledger (means). Nothing is typed by hand: rerun the command after rerunning the suites.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pandas as pd

from biollm_cls.suite.io import atomic_path
from biollm_cls.suite.tables import SUITE_FILES

METRICS = [("final_seen_acc_avg", "final seen acc", +1), ("final_forgetting", "forgetting", -1),
           ("plasticity", "plasticity", +1)]
LEDGER = [("fast_optimizer_steps", "fast steps"), ("base_optimizer_steps", "base steps"),
          ("base_gradient_rows", "base rows"), ("fast_gradient_rows", "fast rows"), ("replayed_rows", "replayed"),
          ("forward_only_passes", "fwd-only"), ("fisher_backwards", "Fisher bwd"), ("buffer_bytes", "buffer MB")]
# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def load(suite_tables: list[str | os.PathLike]) -> pd.DataFrame:
    frames = []
    for tables in suite_tables:
        path = Path(tables) / SUITE_FILES["summary"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no merged suite table; run the suite first (snakemake ... all)")
        frame = pd.read_csv(path)
        frame["suite"] = Path(tables).parent.name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _interval(deltas: pd.Series) -> tuple[float, float]:
    n = len(deltas)
    if n < 2:
        return float(deltas.mean()), math.nan
    return float(deltas.mean()), _T95.get(n - 1, 1.96) * float(deltas.std(ddof=1)) / math.sqrt(n)


def reference_of(name: str, reference: str, rows: pd.DataFrame) -> str:
    """A variant `<preset>__<v>` is paired with `<reference>__<v>` where that ran (the baseline matched to the
    variant's own budget, run on the same machine); everything else with `reference`."""
    if name == reference or name.startswith(f"{reference}__"):
        return name  # a reference itself: no deltas
    _, _, variant = name.partition("__")
    own = f"{reference}__{variant}"
    return own if variant and (rows["baseline"] == own).any() else reference


def view_table(frame: pd.DataFrame, view: str, reference: str) -> pd.DataFrame:
    """One row per ablation: mean metrics, paired deltas vs `reference` (same seed), wins, ledger means."""
    rows = frame[frame["view"] == view]
    out = []
    for (suite, name), runs in rows.groupby(["suite", "baseline"], sort=False):
        runs = runs.set_index("seed")
        against = reference_of(name, reference, rows)
        ref = rows[rows["baseline"] == against].drop_duplicates("seed").set_index("seed")
        row = {"ablation": name, "vs": against, "suite": suite, "seeds": len(runs)}
        for key, label, sign in METRICS:
            row[label] = float(runs[key].mean())
            paired = runs[key].index.intersection(ref.index)
            if name == against or paired.empty:
                row[f"Δ {label}"], row[f"±95% {label}"], row[f"wins {label}"] = math.nan, math.nan, ""
                continue
            delta = runs.loc[paired, key] - ref.loc[paired, key]
            row[f"Δ {label}"], row[f"±95% {label}"] = _interval(delta)
            row[f"wins {label}"] = f"{int((sign * delta > 0).sum())}/{len(paired)}"
        for key, label in LEDGER:
            value = float(runs[key].mean()) if key in runs else math.nan
            row[label] = value / 1e6 if key == "buffer_bytes" else value
        out.append(row)
    return pd.DataFrame(out)


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 10:
        return f"{int(value):,}"
    return f"{value:+.{digits}f}" if digits and isinstance(value, float) and value < 0 else f"{value:.{digits}f}"


def markdown(table: pd.DataFrame, reference: str) -> str:
    metric_cols = []
    for _, label, _ in METRICS:
        metric_cols += [label, f"Δ {label}", f"±95% {label}", f"wins {label}"]
    header = ["ablation", "vs", "seeds", *metric_cols, *[label for _, label in LEDGER]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        name = f"**{row['ablation']}**" if row["ablation"] in ("full_cls", reference) else row["ablation"]
        vs = "—" if row["vs"] == row["ablation"] else row["vs"]
        cells = [name, vs, str(int(row["seeds"]))]
        for col in header[3:]:
            digits = 1 if col == "buffer MB" else (0 if col in [label for _, label in LEDGER] else 3)
            cells.append(_fmt(row[col], digits) if digits else _fmt_int(row[col]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_int(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{round(value):,}"


def per_seed(frame: pd.DataFrame, names: list[str]) -> str:
    """full_cls system vs base and vs the reference, seed by seed (the issue's per-seed conditions)."""
    rows = frame[frame["baseline"].isin(names)]
    pivot = rows.pivot_table(index="seed", columns=["baseline", "view"], values="final_seen_acc_avg")
    header = ["seed"] + [f"{n} {v}" for n in names for v in ("system", "base")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seed, values in pivot.iterrows():
        cells = [str(seed)] + [_fmt(values.get((n, v), math.nan)) for n in names for v in ("system", "base")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(suites: list[str], reference: str, output: str | os.PathLike, preamble: str = "") -> Path:
    frame = load(suites)
    parts = [preamble.strip(), ""] if preamble else []
    for view in ("system", "base"):
        parts += [f"## {view} view", "",
                  f"Mean over seeds; Δ = paired mean (same seed) minus the `vs` ablation (`{reference}`, or for a "
                  f"variant `<preset>__<v>` its own `{reference}__<v>`), ±95% = t-interval half-width; "
                  "wins = seeds where the ablation is better (higher accuracy/plasticity, lower forgetting). Ledger: "
                  "means per run (steps, rows in gradients, forward-only passes, Fisher backwards, buffer MB).", "",
                  markdown(view_table(frame, view, reference), reference), ""]
    parts += ["## full_cls per seed (final seen accuracy)", "",
              per_seed(frame, ["full_cls", reference]), ""]
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(parts))
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="biollm-cls write-results", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", required=True, help="a suite's tables/ directory (repeatable)")
    parser.add_argument("--reference", default="er_matched", help="ablation the paired deltas are taken against")
    parser.add_argument("--preamble", default=None, help="a Markdown file whose text goes first")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    preamble = Path(args.preamble).read_text() if args.preamble else ""
    try:
        path = write(args.suite, args.reference, args.output, preamble)
    except FileNotFoundError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    print(f"write-results: {path}")
    return 0
