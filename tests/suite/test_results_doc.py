"""docs/results.md tables: each run paired per seed with the right reference."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from biollm_cls.suite.results_doc import markdown, view_table
from biollm_cls.suite.tables import BUDGET


def _runs(name: str, accs: list[float]) -> list[dict]:
    return [{"baseline": name, "seed": seed, "view": "system", "suite": "s", "final_seen_acc_avg": acc,
             "final_forgetting": 0.1, "plasticity": 0.5, **{key: 1.0 for key in BUDGET}}
            for seed, acc in zip([1, 2, 3], accs, strict=True)]


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(_runs("er_matched", [0.70, 0.72, 0.74]) + _runs("full_cls", [0.71, 0.71, 0.71])
                        + _runs("full_cls__x", [0.60, 0.60, 0.60]) + _runs("er_matched__x", [0.50, 0.50, 0.50])
                        + _runs("er_matched_total", [0.80, 0.80, 0.80]) + _runs("no_ewc__y", [0.72, 0.72, 0.72]))


def test_each_row_is_paired_with_its_own_reference(frame):
    table = view_table(frame, "system", "er_matched").set_index("ablation")
    assert table.loc["full_cls", "vs"] == "er_matched"
    assert table.loc["full_cls", "Δ final seen acc"] == pytest.approx(-0.01)
    assert table.loc["full_cls", "wins final seen acc"] == "1/3"
    # a variant against the baseline matched to its own budget, not against the plain reference
    assert table.loc["full_cls__x", "vs"] == "er_matched__x"
    assert table.loc["full_cls__x", "Δ final seen acc"] == pytest.approx(0.10)
    # a variant without a matched baseline of its own, and er_matched_total, against the reference
    assert table.loc["no_ewc__y", "vs"] == "er_matched"
    assert table.loc["er_matched_total", "Δ final seen acc"] == pytest.approx(0.08)
    for reference in ("er_matched", "er_matched__x"):  # references carry no deltas
        assert math.isnan(table.loc[reference, "Δ final seen acc"])


def test_the_markdown_names_the_reference_of_every_row(frame):
    text = markdown(view_table(frame, "system", "er_matched"), "er_matched")
    row = next(line for line in text.splitlines() if line.startswith("| full_cls__x |"))
    assert "| er_matched__x |" in row
    assert "0.100" in row
