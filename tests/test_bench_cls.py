"""bench/bench_cls.py on the CPU: the strongest plain fine-tuning step is a real full fine-tuning step, the script
runs end to end with it as the unit of every ratio, and its report renders (also from the JSON of earlier runs).

No timing is asserted: on the CPU with a tiny model the numbers mean nothing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("plain_ft", "plain_ft_strong", "base_forward", "wake", "sleep", "sleep_pseudo", "refresh", "refresh_full")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_cls", ROOT / "bench" / "bench_cls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(bench, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_qwen")
    bench.save_model(path, tiny=True, device="cpu")
    return path


def test_strong_step_updates_every_base_weight(bench, model_dir):
    from biollm_cls.train import build_learner

    cfg = bench.make_config(model_dir, 2, 16, 512, "cpu", [])
    learner = build_learner(cfg, torch.device("cpu"))
    batches = bench.random_batches(2, 2, 16, learner.neocortex.vocab_size, torch.device("cpu"), seed=1)
    step, opt, facts = bench.strong_ft_step(learner, cfg, batches, compile_=False, compile_mode=None)
    params = learner.base_parameters()
    before = [p.detach().clone() for p in params]
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        step(0)
        assert torch.are_deterministic_algorithms_enabled()  # switched off for the step only, then restored
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    from biollm_cls.neocortex.hf import CAUSAL_SDPA

    assert facts["optimizer"] == {"foreach": True} and facts["attn_implementation"] == CAUSAL_SDPA
    assert len(params) == sum(1 for _ in learner.neocortex.parameters())  # the whole base trains
    assert all(p.grad is not None for p in params)
    unchanged = [i for i, (p, b) in enumerate(zip(params, before, strict=True)) if torch.equal(p.detach(), b)]
    assert not unchanged, f"base tensors not updated by the step: {unchanged}"
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in params}


def test_forward_params_leave_out_the_embedding_table(bench, model_dir):
    from biollm_cls.train import build_learner

    cfg = bench.make_config(model_dir, 2, 16, 512, "cpu", [])
    neo = build_learner(cfg, torch.device("cpu")).neocortex
    emb = neo.model.get_input_embeddings().weight  # (V_model, H), tied to the head
    total = sum(p.numel() for p in neo.parameters())
    assert bench.forward_params(neo, 512) == total - emb.numel() + 512 * emb.shape[1]


def test_cpu_smoke_run_and_report(bench, model_dir, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert bench.main(["--tiny", "--device", "cpu", "--shapes", "2x16", "--steps", "1", "--warmup", "1",
                       "--wake-fill", "2", "--fisher-samples", "2", "--model-dir", str(model_dir),
                       "--json-out", str(out)]) == 0
    run = json.loads(out.read_text())
    (s,) = run["shapes"]
    for key in PHASES:
        v = s[key]
        assert v["median_s"] > 0 and v["tokens_per_s"] > 0 and v["mfu"] > 0, key
        assert "ratio_vs_strong" in v, key
    strong = s["plain_ft_strong"]
    assert strong["ratio_vs_strong"] == 1.0 and "plain_ft" in strong["paired_median_s"]
    assert strong["compile"] is False and strong["optimizer"] == {"foreach": True}  # CPU: eager, foreach
    assert strong["params_with_grad"] == strong["params"]
    for key in PHASES[2:]:  # every later phase is interleaved with both plain FT steps
        assert set(s[key]["paired_median_s"]) == {"plain_ft", "plain_ft_strong"}, key
    # refresh: a base pass + a system pass that resumes at the injection point (the upper layers' share of a pass)
    assert s["can_resume"] and 1 < s["refresh_passes"] < 2
    assert s["refresh"]["flops_per_step"] == 2 * s["refresh_passes"] * s["n_forward_params"] * s["refresh"]["tokens"]
    assert s["sleep"]["flops_per_step"] == 6 * s["n_forward_params"] * s["sleep"]["tokens"]

    md = tmp_path / "t.md"
    assert bench.main(["--report", str(out), "--md", str(md)]) == 0
    text = md.read_text()
    assert "strongest plain FT step (the unit)" in text and "## Targets" in text
    assert "sleep with pseudo-rehearsal ≤ 1.4×" in text


def test_report_of_earlier_runs_still_renders(bench, tmp_path):
    runs = [ROOT / "bench" / "runs" / f for f in ("s0_baseline.json", "final2.json")]
    md = tmp_path / "old.md"
    assert bench.main(["--report", *map(str, runs), "--final", "final2", "--md", str(md)]) == 0
    text = md.read_text()
    assert "predates the strongest plain FT step" in text and "`s0_baseline`" in text


def test_runs_of_one_label_are_merged(bench):
    a = {"label": "x", "shapes": [{"B": 4, "T": 256}]}
    b = {"label": "x", "shapes": [{"B": 16, "T": 1024}]}
    (merged,) = bench.merge_runs([a, b])
    assert [(s["B"], s["T"]) for s in merged["shapes"]] == [(4, 256), (16, 1024)]
    assert len(a["shapes"]) == 1  # inputs untouched
