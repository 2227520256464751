# Paths, the run list (ablations x seeds) and each run's override list. Rules stay thin: they take
# their paths and parameters from the functions here and call the library's CLI.

import os
import sys
from pathlib import Path

import jsonschema
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate


def validate_suite_config():
    """The suite config against its schema; a failure is one line naming the key and the fix, exit code 2
    (Snakemake's own report is a multi-line traceback with exit code 1)."""
    schema_path = workflow.source_path("../schemas/config.schema.yaml")
    schema = yaml.safe_load(open(schema_path))
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        key = ".".join(str(p) for p in error.absolute_path) or "(top level)"
        print(f"error: suite config {key}: {error.message}; fix it in the --configfile (the keys and their types: "
              f"workflow/schemas/config.schema.yaml)", file=sys.stderr)
        sys.exit(2)
    validate(config, "../schemas/config.schema.yaml")  # also fills in the schema's defaults


validate_suite_config()
RESULTS = f"results/{config['suite_name']}"
PACK_DIR = f"{RESULTS}/data/pack"
BASE_CHECKPOINT = f"{RESULTS}/data/base.pt"
RUN_DIR = f"{RESULTS}/runs/{{ablation}}/seed{{seed}}"  # one run = one directory (docs/run_outputs.md)
TABLES_DIR = f"{RESULTS}/tables"
PLOTS_DIR = f"{RESULTS}/plots"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"

ABLATIONS = list(config["ablations"])
# Matched baselines -> the ablation whose budget they match, run for run (same seed): `er_matched` sleeps
# (replay-only base steps) exactly where that seed's full_cls slept (consolidation.sleep_plan).
MATCHED = {"er_matched": "full_cls", "er_matched_total": "full_cls"}
SEEDS = list(config["seeds"])
VIEWS = ["system", "base"]
PLOT_NAMES = ["seen_acc_trajectory", "final_metrics", "paired_deltas", "task_matrix"]
RUN_TABLES = ["summary", "boundary_metrics", "task_matrix"]
SUITE_TABLES = {"summary": "suite_summary.csv", "boundary_metrics": "boundary_metrics.csv",
                "task_matrix": "task_matrix.csv"}
PRESETS = Path(workflow.basedir, "src", "biollm_cls", "config", "conf")  # the library's preset tree


wildcard_constraints:
    ablation="[A-Za-z0-9_]+",
    seed=r"\d+",
    view="|".join(VIEWS),


# ---------------------------------------------------------------------------------- config checks


def matched_to(ablation):
    """The learner run a matched baseline replays against: er_matched -> full_cls, and a variant keeps its
    suffix (er_matched__x -> full_cls__x), so each variant of the learner gets a baseline of its own budget."""
    preset, _, variant = ablation.partition("__")
    return MATCHED[preset] + (f"__{variant}" if variant else "")


def preset_of(ablation):
    """An ablation entry is a preset name, or `<preset>__<variant>`: that preset plus the entry's overrides,
    recorded under the entry's own name (a study of variants of one preset, e.g. full_cls__no_wake_replay)."""
    return ablation.split("__", 1)[0]



def _key(override):
    return override.split("=", 1)[0].lstrip("+~")


def _keys(overrides):
    return {_key(item) for item in overrides}


def _check_config():
    """What the JSON schema cannot say: names that must exist and keys the pipeline sets itself."""
    known = sorted(p.stem for p in (PRESETS / "ablation").glob("*.yaml"))
    unknown = [a for a in ABLATIONS if known and preset_of(a) not in known]
    if unknown:
        raise WorkflowError(
            f"config ablations: unknown ablation preset(s) {', '.join(unknown)}; choose from: {', '.join(known)}"
        )
    benchmarks = sorted(p.stem for p in (PRESETS / "benchmark").glob("*.yaml"))
    if config.get("benchmark") and benchmarks and config["benchmark"] not in benchmarks:
        raise WorkflowError(
            f"config benchmark: unknown preset {config['benchmark']}; choose from: {', '.join(benchmarks)}"
        )
    missing = sorted(f"{a} (needs {matched_to(a)})" for a in ABLATIONS
                     if preset_of(a) in MATCHED and matched_to(a) not in ABLATIONS)
    if missing:
        raise WorkflowError(f"config ablations: {', '.join(missing)}: add the ablation it is matched to")
    reserved = {"seed", "ablation", "ablation_name", "suite_name", "logging.output_dir", "consolidation.sleep_plan"}
    if config.get("benchmark"):
        reserved.add("benchmark")
    if config.get("pack"):
        reserved |= {"benchmark.local_path", "benchmark.eval_local_path"}
    if config.get("pretrain"):
        reserved.add("model.init_checkpoint")
    lists = {"overrides": config["overrides"]}
    lists.update({f"ablations.{a}": config["ablations"][a] or [] for a in ABLATIONS})
    for where, overrides in lists.items():
        clash = sorted(_keys(overrides) & reserved)
        if clash:
            raise WorkflowError(
                f"config {where}: {', '.join(clash)} is set by the pipeline for every run; "
                "remove it (use suite_name, seeds, ablations, benchmark, pack and pretrain instead)"
            )
    if config.get("pretrain"):
        if not config.get("pack"):
            raise WorkflowError("config pretrain needs a pack (pretraining reads the pack's pretrain.jsonl)")
        if "model" in _keys(config["overrides"]) or "model.provider" in _keys(config["overrides"]):
            raise WorkflowError(
                "config pretrain is for the built-in tiny model; set `pretrain: null` when overrides choose "
                "another model (a Hugging Face model is already pretrained)"
            )
        for a in ABLATIONS:
            model_keys = sorted(k for k in _keys(config["ablations"][a] or []) if k.split(".")[0] == "model")
            if model_keys:
                raise WorkflowError(
                    f"config ablations.{a}: {', '.join(model_keys)} would not match the pretrained base "
                    "checkpoint; put model.* overrides in the suite-level `overrides` (pretraining uses them too)"
                )


_check_config()


# ------------------------------------------------------------------------------------------- paths


def run_dir(wildcards):
    return RUN_DIR.format(ablation=wildcards.ablation, seed=wildcards.seed)


def pack_files():
    """build_pack's outputs; the synthetic source also writes the pretraining text for the tiny base."""
    files = {name: f"{PACK_DIR}/{name}.jsonl" for name in ("train", "eval")}
    files["metadata"] = f"{PACK_DIR}/metadata.json"
    if config["pack"]["source"] == "synthetic":
        files["pretrain"] = f"{PACK_DIR}/pretrain.jsonl"
    return files


def build_pack_args():
    pack = config["pack"]
    args = ["--source", pack["source"]]
    if pack.get("path"):
        args += ["--path", pack["path"]]
    return args + list(pack.get("args") or [])


# Suite-level keys that pretraining reads too: the model's shape and the prompt encoding.
PRETRAIN_KEYS = ("model", "benchmark.prompt_template", "benchmark.verify_checksums")


def pretrain_overrides():
    """What shapes the base and its prompt encoding: the benchmark preset (its prompt_template) and the
    suite's model.* / prompt-encoding overrides; pretraining and every run must agree on them. Only these
    are passed, so other suite-level edits do not redo the pretraining."""
    preset = [f"benchmark={config['benchmark']}"] if config.get("benchmark") else []
    return preset + [o for o in config["overrides"] if _key(o) in PRETRAIN_KEYS or _key(o).split(".")[0] == "model"]


def pretrain_args():
    pretrain = config["pretrain"]
    args = [] if pretrain.get("steps") is None else ["--steps", str(pretrain["steps"])]
    return args + list(pretrain.get("args") or [])


def train_inputs(wildcards):
    inputs = {}
    if config.get("pack"):
        inputs.update({k: v for k, v in pack_files().items() if k in ("train", "eval", "metadata")})
    if config.get("pretrain"):
        inputs["checkpoint"] = BASE_CHECKPOINT
    if preset_of(wildcards.ablation) in MATCHED:  # a matched baseline replays where the learner slept (its summary)
        inputs["sleep_plan"] = f"{RUN_DIR.format(ablation=matched_to(wildcards.ablation), seed=wildcards.seed)}/summary.json"
    return inputs


def train_overrides(wildcards):
    """The full override list of one run. It is the train rule's `params`, so editing an ablation's
    overrides (or the suite-level ones) reruns exactly the runs whose list changed."""
    overrides = [f"ablation={preset_of(wildcards.ablation)}", f"seed={wildcards.seed}"]
    if preset_of(wildcards.ablation) != wildcards.ablation:
        overrides.append(f"ablation_name={wildcards.ablation}")
    if config.get("benchmark"):
        overrides.append(f"benchmark={config['benchmark']}")
    if config.get("pack"):
        overrides += [f"benchmark.local_path={PACK_DIR}/train.jsonl",
                      f"benchmark.eval_local_path={PACK_DIR}/eval.jsonl"]
    if config.get("pretrain"):
        overrides.append(f"model.init_checkpoint={BASE_CHECKPOINT}")
    overrides += [f"logging.output_dir={run_dir(wildcards)}", f"suite_name={config['suite_name']}"]
    if preset_of(wildcards.ablation) in MATCHED:
        overrides.append(f"consolidation.sleep_plan={train_inputs(wildcards)['sleep_plan']}")
    return overrides + list(config["overrides"]) + list(config["ablations"][wildcards.ablation] or [])


def all_runs():
    return [RUN_DIR.format(ablation=a, seed=s) for a in ABLATIONS for s in SEEDS]


def run_table_files():
    return [f"{d}/tables/{t}.csv" for d in all_runs() for t in RUN_TABLES]


def suite_tables():
    return [f"{TABLES_DIR}/{name}" for name in SUITE_TABLES.values()]


def suite_plots():
    return [f"{PLOTS_DIR}/{name}_{view}.png" for view in VIEWS for name in PLOT_NAMES]


# ----------------------------------------- optional W&B dashboard (publish_dashboard in publish.smk)

DASHBOARD = f"{RESULTS}/dashboard.json"


def wandb_setting(key, default=None):
    """A key of the config's optional `wandb` section (absent section or key -> default)."""
    value = (config.get("wandb") or {}).get(key)
    return default if value is None else value


def publish_targets():
    """Extra targets of `all`: the dashboard marker when `wandb.publish` is true, else nothing."""
    return [DASHBOARD] if wandb_setting("publish", False) else []


def publish_args():
    """Arguments of publish-dashboard from the `wandb` section (they are the rule's params: a change reruns it)."""
    args = [
        "--suite", config["suite_name"],
        "--project", wandb_setting("project", "biollm-cls"),
        "--mode", wandb_setting("mode", "offline"),
        "--baseline-a", wandb_setting("baseline_a", "full_cls"),
        "--baseline-b", wandb_setting("baseline_b", "no_sleep"),
    ]
    if wandb_setting("entity"):
        args += ["--entity", wandb_setting("entity")]
    return args
