"""Config composition: presets, ablation semantics, one-line errors, and the config-facing CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from biollm_cls import cli
from biollm_cls.config import ConfigError, config_dir, flatten, load_config, presets, to_dict
from biollm_cls.config.schema import RunConfig

GROUP_PRESETS = {
    "train": ["continual_pilot_4070", "default", "mac_dev", "qwen_0_5b_12gb", "qwen_0_5b_fast", "rtx4070"],
    "benchmark": ["instruction", "ni8_pilot", "synthetic8", "toy"],
    "model": ["hf_causal_lm", "tiny_transformer"],
    "ablation": ["er", "er_matched", "er_matched_total", "ewc_only", "full_cls", "joint", "no_ewc", "no_hippocampus",
                 "no_refresh", "no_sleep", "seq_ft"],
}
ALL = [(g, p) for g, names in GROUP_PRESETS.items() for p in names]

# What each ablation's comment promises, as the exact set of keys it changes: a no_* ablation relative to
# full_cls (the default compose; it removes exactly one mechanism), a baseline relative to the schema defaults.
BASELINE = {"train.ablation_disable_hippocampus": True, "train.ablation_no_sleep": True,
            "consolidation.wake_base_lr_scale": 1.0}
ABLATION_DIFF = {
    "full_cls": None,  # the learner's settings: exactly what full_cls.yaml sets (checked against its file)
    "no_sleep": {"ablation_name": "no_sleep", "train.ablation_no_sleep": True},
    "no_ewc": {"ablation_name": "no_ewc", "ewc.lambda_": 0.0},
    "no_refresh": {"ablation_name": "no_refresh", "consolidation.refresh.reset_factor": 1.0},
    "no_hippocampus": {"ablation_name": "no_hippocampus", "train.ablation_disable_hippocampus": True,
                       "consolidation.wake_base_lr_scale": 1.0},
    "seq_ft": {"ablation_name": "seq_ft", **BASELINE, "ewc.lambda_": 0.0},
    "er": {"ablation_name": "er", **BASELINE, "replay.wake_mix": 16, "ewc.lambda_": 0.0},
    "ewc_only": {"ablation_name": "ewc_only", **BASELINE, "ewc.fisher_update": "boundary", "ewc.lambda_": 100.0},
    "joint": {"ablation_name": "joint", **BASELINE, "benchmark.order": "joint", "ewc.lambda_": 0.0},
    "er_matched": {"ablation_name": "er_matched", "train.ablation_disable_hippocampus": True,
                   "consolidation.wake_base_lr_scale": 1.0, "replay.wake_mix": 16, "ewc.lambda_": 0.0,
                   "consolidation.distill_weight": 0.0, "consolidation.target_ce_weight": 1.0,
                   "consolidation.pseudo_rehearsal": False},
}
ABLATION_DIFF["er_matched_total"] = {**ABLATION_DIFF["er_matched"], "ablation_name": "er_matched_total",
                                     "consolidation.sleep_plan_match": "total_rows"}

_COMPOSED: dict[tuple[str, ...], dict] = {}


def composed(*overrides: str) -> dict:
    """Flattened composed config, cached per override tuple (a compose costs ~0.15 s)."""
    if overrides not in _COMPOSED:
        _COMPOSED[overrides] = flatten(to_dict(load_config(list(overrides))))
    return _COMPOSED[overrides]


def test_default_compose_is_the_schema_defaults_plus_the_full_cls_preset():
    import yaml

    from biollm_cls.config import config_dir

    cfg = load_config([])
    assert isinstance(cfg, RunConfig)
    preset = flatten(yaml.safe_load((config_dir() / "ablation" / "full_cls.yaml").read_text()))
    got, schema = flatten(to_dict(cfg)), flatten(to_dict(RunConfig()))
    assert {k for k in got if got[k] != schema[k]} == {k for k in preset if preset[k] != schema[k]}
    assert all(got[k] == v for k, v in preset.items())
    assert cfg.model.provider == "tiny" and cfg.benchmark.name == "toy" and cfg.ablation_name == "full_cls"


def test_preset_listing_matches_the_packaged_tree():
    for group, names in GROUP_PRESETS.items():
        assert presets(group) == names


@pytest.mark.parametrize(("group", "preset"), ALL)
def test_each_preset_composes_and_applies_its_yaml(group, preset):
    flat = composed(f"{group}={preset}")
    text = (config_dir() / group / f"{preset}.yaml").read_text()
    values = yaml.safe_load(text) or {}
    values.pop("defaults", None)  # a preset built on another (e.g. no_ewc on full_cls)
    # A `# @package _global_` preset sets top-level keys; the others live under their group key.
    expected = flatten(values) if "@package _global_" in text else flatten(values, f"{group}.")
    assert expected, f"{group}/{preset}.yaml sets nothing"
    for key, value in expected.items():
        assert flat[key] == value, key


@pytest.mark.parametrize("ablation", GROUP_PRESETS["ablation"])
def test_each_ablation_changes_exactly_what_its_comment_says(ablation):
    flat = composed(f"ablation={ablation}")
    base = composed() if ablation.startswith("no_") else flatten(to_dict(RunConfig()))
    assert set(base) == set(flat)
    diff = {k: v for k, v in flat.items() if base[k] != v}
    expected = ABLATION_DIFF[ablation]
    if expected is None:
        values = yaml.safe_load((config_dir() / "ablation" / f"{ablation}.yaml").read_text())
        expected = {k: v for k, v in flatten(values).items() if base[k] != v}
    assert diff == expected


def test_ablation_semantics():
    """Cross-check what the baselines mean, beyond the raw diff."""
    for name in ("seq_ft", "er", "ewc_only", "joint"):
        cfg = composed(f"ablation={name}")
        assert cfg["train.ablation_disable_hippocampus"] and cfg["train.ablation_no_sleep"]
    assert composed("ablation=seq_ft")["replay.wake_mix"] == 0  # no replay
    assert composed("ablation=ewc_only")["ewc.lambda_"] > 0  # EWC stays on
    assert composed("ablation=ewc_only")["replay.wake_mix"] == 0


def test_presets_of_different_groups_compose_together():
    cfg = load_config(["model=hf_causal_lm", "benchmark=ni8_pilot", "train=qwen_0_5b_12gb", "ablation=no_sleep",
                       "experts.top_k=3"])
    assert (cfg.model.provider, cfg.model.seq_len, cfg.benchmark.num_tasks, cfg.train.batch_size) == ("hf", 256, 8, 4)
    assert cfg.train.ablation_no_sleep and cfg.experts.top_k == 3


@pytest.mark.parametrize(("override", "must_name"), [
    ("experts.num_expert=3", ["experts.num_expert", "num_experts", "top_k"]),
    ("model=nope", ["model=nope", "hf_causal_lm", "tiny_transformer"]),
    ("train.batch_size=abc", ["train.batch_size", "abc", "int"]),
    ("train.max_steps=7", ["train.max_steps=7", "400", "train.max_steps=0"]),
    ("experts.top_k=99", ["experts.top_k=99", "experts.num_experts=8"]),
    ("ablation=nope", ["ablation=nope", "full_cls", "seq_ft"]),
    ("experts.routing=foo", ["experts.routing", "sequence", "token"]),
    ("replay.recent_capacity=2000", ["replay.recent_capacity=2000", "replay.capacity=2000"]),
    # CUDA graphs of the regional compile fail on the GPU (a layer's output overwritten by the next replay)
    ("train.compile_mode=reduce-overhead", ["train.compile_mode", "default", "max-autotune-no-cudagraphs"]),
])
def test_bad_override_raises_one_line_config_error(override, must_name):
    with pytest.raises(ConfigError) as info:
        load_config([override])
    message = str(info.value)
    assert "\n" not in message
    for fragment in must_name:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(("overrides", "must_name"), [
    (["train.cuda_graphs=true", "train.amp_dtype=fp16"], ["train.cuda_graphs=true", "train.amp_dtype=bf16"]),
    (["train.cuda_graphs=true", "model=hf_causal_lm", "model.hf_pass_attention_mask=true"],
     ["train.cuda_graphs=true", "model.hf_pass_attention_mask=false"]),
])
def test_cuda_graphs_refuse_what_a_captured_step_cannot_do(overrides, must_name):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in must_name)
    assert load_config(["train.cuda_graphs=true"]).train.cuda_graphs  # bf16, tiny model: accepted


def test_max_steps_equal_to_the_plan_is_accepted():
    assert load_config(["train.max_steps=400"]).train.max_steps == 400


# ---- CLI ------------------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    return subprocess.run([sys.executable, "-m", "biollm_cls.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_cli_train_with_a_bad_key_exits_2_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "x"
    proc = _cli("train", "experts.num_expert=3", f"logging.output_dir={out}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "experts.num_expert" in lines[0] and "num_experts" in lines[0]
    assert proc.stdout == ""
    assert not out.exists()


def test_cli_show_config_yaml_round_trips_outside_a_checkout(tmp_path):
    """cwd is an empty directory: the preset tree must resolve through the installed package."""
    overrides = ["ablation=er", "experts.top_k=3", "train=mac_dev"]
    proc = _cli("show-config", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout) == to_dict(load_config(overrides))
    assert list(tmp_path.iterdir()) == []


def test_cli_show_config_flat_prints_dotted_keys(tmp_path):
    proc = _cli("show-config", "--flat", "consolidation.refresh.reset_factor=0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = {}
    for line in proc.stdout.splitlines():
        key, value = line.split(": ", 1)
        printed[key] = json.loads(value)
    assert printed == flatten(to_dict(load_config(["consolidation.refresh.reset_factor=0.5"])))
    assert printed["consolidation.refresh.reset_factor"] == 0.5
    assert "model.hidden_size" in printed and "experts.top_k" in printed


def test_cli_show_config_bad_override_exits_2(capsys):
    assert cli.main(["show-config", "model=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tiny_transformer" in err


def test_cli_check_device_prints_json(capsys):
    assert cli.main(["check-device"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["cuda_available"] is torch.cuda.is_available()
    assert "torch_version" in facts


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_check_device_require_cuda_exits_1_without_cuda(capsys):
    assert cli.main(["check-device", "--require-cuda"]) == 1
    assert json.loads(capsys.readouterr().out)["cuda_available"] is False


def test_cli_unknown_command_exits_2(capsys):
    assert cli.main(["nope"]) == 2
    assert "show-config" in capsys.readouterr().err
