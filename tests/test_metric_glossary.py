"""The metric glossary: complete, well-formed rows; the files it writes; its W&B table."""

from __future__ import annotations

import json

import pytest

from biollm_cls import metric_glossary as g


def test_rows_are_well_formed_and_unique():
    seen = set()
    for m in g.GLOSSARY:
        assert m.scope in g.SCOPES, m
        assert m.direction in ("higher", "lower", "neutral"), m
        assert m.unit and m.definition.endswith("."), m
        assert (m.scope, m.metric) not in seen, f"duplicate {m.scope}/{m.metric}"
        seen.add((m.scope, m.metric))


@pytest.mark.parametrize(("key", "template"), [
    ("task_loss", "task_loss"),
    ("system/seen_acc_avg", "<view>/seen_acc_avg"),
    ("base/task_acc/sort_words", "<view>/task_acc/<task>"),
    ("system/task_tokens/a/b", "<view>/task_tokens/<task>"),  # a task name may hold a slash
    ("views/base/final_bwt", "views/<view>/final_bwt"),
    ("counters/sleep_count", "counters/sleep_count"),
])
def test_template_of(key, template):
    assert g.template_of(key) == template


def test_lookup_respects_scope():
    assert g.lookup("base/task_loss/t0").direction == "lower"
    assert g.lookup("system/forgetting").direction == "lower"
    assert g.lookup("system/bwt").direction == "higher"
    assert g.lookup("tasks_completed", ("boundary",)).scope == "boundary"
    assert g.lookup("distill_kl", ("boundary",)) is None
    assert g.lookup("no_such_metric") is None


def test_kl_directions_and_normalisation_are_stated():
    """The reference's glossary had the KL direction backwards and summed over T (REFERENCE §7.1 items 11, 18)."""
    distill = g.lookup("distill_kl")
    assert "KL(teacher || base)" in distill.definition and "per token" in distill.definition
    assert distill.unit == "nats/token" and distill.direction == "lower"
    refresh = g.lookup("refresh_avg_kl")
    assert "KL(base + expert || base)" in refresh.definition and refresh.unit == "nats/token"


def test_write_glossary(tmp_path):
    json_path, md_path = g.write_glossary(tmp_path / "out")
    rows = json.loads(json_path.read_text())
    assert rows == g.glossary_rows()
    assert list(rows[0]) == list(g.COLUMNS)
    md = md_path.read_text()
    assert md.startswith("# Metric glossary")
    for m in g.GLOSSARY:
        assert f"`{m.metric}`" in md


def test_wandb_table_and_artifact(tmp_path):
    import wandb

    table = g.wandb_table(wandb)
    assert table.columns == list(g.COLUMNS)
    assert len(table.data) == len(g.GLOSSARY)
    artifact = g.wandb_artifact(wandb, *g.write_glossary(tmp_path))
    assert artifact.type == "metadata"
    assert {g.JSON_NAME, g.MD_NAME, "metric_glossary.table.json"} <= set(artifact.manifest.entries)
