"""Workflow tests: lint, dry runs of every suite config, the CI suite end to end in a temporary working
directory (`snakemake --directory`), no-op rerun, targeted rerun on a parameter change, the rerun of a
killed train job (it resumes from its checkpoint), the report, and config validation errors.

The end-to-end suite is config/ci.yaml (2 ablations x 1 seed, a few steps): its numbers are meaningless,
the test checks that every stage runs and that each writes what the next one reads.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEFILE = ROOT / "Snakefile"
CONFIGS = {name: ROOT / "config" / f"{name}.yaml" for name in ("config", "ci", "toy", "ni8", "ni8_gpu_e2e")}


def _env() -> dict[str, str]:
    # The rules call `python -m biollm_cls.cli`: put this interpreter's environment first on PATH.
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("SNAKEMAKE_PROFILE", None)
    return env


def _command(workdir: Path, *args: str, configfile: Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(SNAKEFILE), "--directory", str(workdir),
           "--workflow-profile", "none"]
    # --configfile (like --resources) takes a list: keep it after the targets or it swallows them
    return cmd + ([] if configfile is None else ["--configfile", str(configfile)])


def snakemake(workdir: Path, *args: str, configfile: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_command(workdir, *args, configfile=configfile), capture_output=True, text=True,
                          env={**_env(), **(env or {})}, timeout=300)


def snakemake_many(calls: list[tuple[Path, tuple[str, ...], Path | None]]) -> list[tuple[int, str]]:
    """Run independent snakemake invocations concurrently (dry runs are mostly start-up time)."""
    procs = [subprocess.Popen(_command(w, *a, configfile=c), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env()) for w, a, c in calls]
    outputs = [p.communicate(timeout=300)[0] for p in procs]  # communicate: never block on a full pipe
    return [(p.returncode, out) for p, out in zip(procs, outputs, strict=True)]


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Job stats:"))
    counts = {}
    for line in lines[start + 3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


# ------------------------------------------------------------------------------- lint and dry runs


def test_lint_is_clean(tmp_path):
    # the default config defines every rule (toy/ni8 leave out pretraining or the pack)
    out = snakemake(tmp_path, "--lint", configfile=CONFIGS["config"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_dry_runs_of_every_config(tmp_path):
    names = ["ci", "toy", "ni8", "ni8_gpu_e2e"]
    calls = [(tmp_path / n, ("-n", "-p"), CONFIGS[n]) for n in names]
    # the embedded default through the profile, as in `uv run snakemake --profile profiles/default`
    calls.append((tmp_path / "config", ("-n", "--profile", str(ROOT / "profiles" / "default")), CONFIGS["config"]))
    # the optional W&B dashboard joins `all` when the config asks for it
    with_wandb = tmp_path / "ci_wandb.yaml"
    with_wandb.write_text(yaml.safe_dump({**yaml.safe_load(CONFIGS["ci"].read_text()),
                                          "wandb": {"publish": True, "mode": "disabled"}}))
    calls.append((tmp_path / "wandb", ("-n",), with_wandb))
    for workdir, _, _ in calls:
        workdir.mkdir()
    expected = {
        "ci": {"build_pack": 1, "pretrain_base": 1, "train": 2, "run_metrics": 2, "merge": 1, "plots": 2},
        "toy": {"train": 12, "run_metrics": 12, "merge": 1, "plots": 2},
        "ni8": {"build_pack": 1, "train": 27, "run_metrics": 27, "merge": 1, "plots": 2},
        "ni8_gpu_e2e": {"build_pack": 1, "train": 2, "run_metrics": 2, "merge": 1, "plots": 2},
        "config": {"build_pack": 1, "pretrain_base": 1, "train": 30, "run_metrics": 30, "merge": 1, "plots": 2},
        "wandb": {"build_pack": 1, "pretrain_base": 1, "train": 2, "run_metrics": 2, "merge": 1, "plots": 2,
                  "publish_dashboard": 1},
    }
    results = dict(zip([*names, "config", "wandb"], snakemake_many(calls), strict=True))
    for name, (rc, out) in results.items():
        assert rc == 0, f"{name}: {out}"
        counts = job_counts(out)
        counts.pop("all"), counts.pop("total")
        assert counts == expected[name], name
    # the train command of one NI8 run: the pipeline's overrides, then the suite's
    shell = [line for line in results["ni8"][1].splitlines() if "biollm_cls.cli train " in line]
    assert len(shell) == 27
    line = next(s for s in shell if "ablation=no_sleep seed=42 " in s)
    for token in ("benchmark=ni8_pilot", "benchmark.local_path=results/ni8/data/pack/train.jsonl",
                  "logging.output_dir=results/ni8/runs/no_sleep/seed42", "suite_name=ni8", "model=hf_causal_lm",
                  "train=continual_pilot_4070"):
        assert token in line
    assert "model.init_checkpoint" not in line  # HF: no pretraining
    # the GPU end-to-end suite (bench/ni8_gpu_e2e.sh): er_matched replays where full_cls slept, and every
    # run's override list resolves to a valid config (a typo would otherwise show only on the GPU machine)
    from biollm_cls.config import load_config

    shell = [line for line in results["ni8_gpu_e2e"][1].splitlines() if "biollm_cls.cli train " in line]
    assert len(shell) == 2
    matched = next(s for s in shell if "ablation=er_matched " in s)
    assert "consolidation.sleep_plan=results/ni8_gpu_e2e/runs/full_cls/seed7/summary.json" in matched
    for line in shell:
        cfg = load_config(shlex.split(line.split("train --restart-stale ", 1)[1].split(" > ")[0]))
        assert cfg.device == "auto" and cfg.model.vocab_size == 16384 and cfg.benchmark.num_tasks == 8
        assert cfg.benchmark.switch_every == 25 and cfg.train.batch_size == 4 and not cfg.logging.use_wandb


# ---------------------------------------------------------------------------------- config errors


SCHEMA_ERRORS = {  # checked by the JSON schema alone (in-process: fast)
    "wrong type": ({"seeds": "seven"}, "'seven' is not of type 'array'"),
    "unknown key in a section": ({"pack": {"source": "synthetic", "pth": "x"}},
                                 "Additional properties are not allowed ('pth' was unexpected)"),
    "bad override": ({"overrides": ["model.seq_len 96"]}, "does not match"),
    "ni-tasks without a path": ({"pack": {"source": "ni-tasks"}}, "'path' is a required property"),
}
WORKFLOW_ERRORS = {  # through the Snakefile: schema validation on load, then common.smk's checks
    "unknown key": ({"bogus": 1}, "Additional properties are not allowed ('bogus' was unexpected)"),
    "unknown ablation": ({"ablations": {"full_cls": [], "no_such": []}}, "unknown ablation preset(s) no_such"),
    "reserved override": ({"overrides": ["seed=3"]}, "seed is set by the pipeline"),
    "unknown benchmark": ({"benchmark": "nope"}, "config benchmark: unknown preset nope"),
}


def test_schema_rejects_bad_values():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    base = yaml.safe_load(CONFIGS["ci"].read_text())
    schema = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
    validate(dict(base), schema)  # the real config passes
    for name, (change, message) in SCHEMA_ERRORS.items():
        with pytest.raises(WorkflowError) as err:
            validate({**base, **change}, schema)
        assert message in str(err.value), name


def test_bad_configs_fail_with_a_clear_message(tmp_path):
    base = yaml.safe_load(CONFIGS["ci"].read_text())
    calls = []
    for i, (change, _) in enumerate(WORKFLOW_ERRORS.values()):
        path = tmp_path / f"bad{i}.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        calls.append((tmp_path, ("-n",), path))
    for (name, (_, message)), (rc, out) in zip(WORKFLOW_ERRORS.items(), snakemake_many(calls), strict=True):
        assert rc != 0, name
        assert message in out, f"{name}: {out}"


# ------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def ci_suite(tmp_path_factory):
    """The CI suite, run once into a temporary working directory."""
    workdir = tmp_path_factory.mktemp("ci_suite")
    out = snakemake(workdir, "all", "--cores", "2", "--resources", "gpu=2", configfile=CONFIGS["ci"])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return workdir


def _header(path: Path) -> list[str]:
    with path.open() as fh:
        return next(csv.reader(fh))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_end_to_end_writes_every_stage(ci_suite):
    results = ci_suite / "results" / "ci"
    for path in ("data/pack/train.jsonl", "data/pack/metadata.json", "data/base.pt"):
        assert (results / path).is_file(), path
    for ablation in ("full_cls", "no_sleep"):
        run = results / "runs" / ablation / "seed7"
        assert (run / "summary.json").is_file()
        for table in ("summary", "boundary_metrics", "task_matrix"):
            assert (run / "tables" / f"{table}.csv").is_file()
        assert (results / "logs" / "train" / ablation / "seed7.log").is_file()
        assert (results / "benchmarks" / "train" / ablation / "seed7.tsv").is_file()
    for view in ("system", "base"):
        for name in ("seen_acc_trajectory", "final_metrics", "paired_deltas", "task_matrix"):
            png = results / "plots" / f"{name}_{view}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_merged_tables_have_the_publisher_columns(ci_suite):
    tables = ci_suite / "results" / "ci" / "tables"
    ids = ["run_id", "run_name", "baseline", "seed", "view"]
    expected = {
        "suite_summary.csv": ids + ["final_seen_acc_avg", "final_forgetting", "final_bwt", "seen_acc_auc"],
        "boundary_metrics.csv": ids + ["step", "boundary_index", "boundary_step", "seen_acc_avg", "seen_loss_avg",
                                       "forgetting", "bwt", "tasks_completed"],
        "task_matrix.csv": ids + ["boundary_index", "task_id", "task_name", "token_acc", "loss", "n_tokens",
                                  "exact_match"],
    }
    for name, columns in expected.items():
        assert _header(tables / name)[: len(columns)] == columns, name
    summary = _rows(tables / "suite_summary.csv")
    assert {(r["run_name"], r["view"]) for r in summary} == {
        (f"{a}-seed7", v) for a in ("full_cls", "no_sleep") for v in ("system", "base")}
    assert all(r["final_seen_acc_avg"] != "" for r in summary)
    assert {r["sleep_count"] for r in summary if r["baseline"] == "no_sleep"} == {"0"}
    boundary = _rows(tables / "boundary_metrics.csv")
    assert len(boundary) == 2 * 2 * 3  # runs x views x boundaries (3 tasks)


def test_second_invocation_is_a_no_op(ci_suite):
    out = snakemake(ci_suite, "all", "--cores", "2", "--resources", "gpu=2", configfile=CONFIGS["ci"])
    assert out.returncode == 0, out.stderr
    assert "Nothing to be done" in out.stdout + out.stderr


def test_changing_one_ablation_reruns_only_its_runs(ci_suite, tmp_path):
    config = yaml.safe_load(CONFIGS["ci"].read_text())
    config["ablations"]["no_sleep"] = ["consolidation.slow_lr=0.002"]
    changed = tmp_path / "ci_changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    out = snakemake(ci_suite, "--dry-run", "--summary", configfile=changed)
    assert out.returncode == 0, out.stderr
    status = {}
    for line in out.stdout.splitlines():
        parts = line.split("\t")
        # output_file, date, rule, log-file(s), status, plan
        if len(parts) == 6 and parts[2] in ("train", "build_pack", "pretrain_base"):
            status[parts[0]] = (parts[4], parts[5])
    pending = {path for path, (_, plan) in status.items() if plan != "no update"}
    assert pending == {f"results/ci/runs/no_sleep/seed7/{f}" for f in ("summary.json", "task_matrix.csv")}
    assert all(reason == "params changed" for path, (reason, _) in status.items() if path in pending)
    # (not `--list-changes params`: in Snakemake 9.27 it lists one output of every job, changed or not,
    # because ParamsChange.__or__ keeps the file set of an empty change)


HOOKS = Path(__file__).resolve().parent / "hooks"  # sitecustomize.py: kill -9 a train process in one step


def test_a_rerun_after_a_killed_train_job_resumes_it(ci_suite, tmp_path):
    """A train job killed (SIGKILL) in step 5 of 6 fails its Snakemake job and leaves no summary.json; the next
    `snakemake` reruns that job only, the run resumes from its step-4 checkpoint (the log says so) and ends
    with the uninterrupted run's summary.json, task_matrix.csv and metrics rows."""
    from biollm_cls.checkpoint import list_checkpoints

    workdir = tmp_path / "suite"
    shutil.copytree(ci_suite / "results" / "ci" / "data", workdir / "results" / "ci" / "data")  # keeps mtimes
    rel = "results/ci/runs/full_cls/seed7"
    target = f"{rel}/summary.json"
    killed = snakemake(workdir, target, "--cores", "1", configfile=CONFIGS["ci"],
                       env={"PYTHONPATH": os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")])),
                            "BIOLLM_TEST_KILL_TRAIN": "runs/full_cls/seed7:5"})
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert "Error in rule train" in killed.stdout + killed.stderr
    run = workdir / rel
    assert not (run / "summary.json").exists()
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002.pt", "step_0000004.pt"]
    out = snakemake(workdir, target, "--cores", "1", "--printshellcmds", configfile=CONFIGS["ci"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (workdir / "results" / "ci" / "logs" / "train" / "full_cls" / "seed7.log").read_text()
    assert f"note: resuming {rel} from step_0000004.pt (step 4 of 6); the steps after it are recomputed" in log
    assert job_counts(out.stdout + out.stderr) == {"train": 1, "total": 1}  # only the failed train job reran
    reference = ci_suite / rel
    for name in ("summary.json", "task_matrix.csv"):
        assert (run / name).read_text() == (reference / name).read_text(), name

    def rows(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    assert rows(run) == rows(reference)


def test_report_builds(ci_suite):
    report = ci_suite / "report.html"
    out = snakemake(ci_suite, "--report", str(report), configfile=CONFIGS["ci"])
    assert out.returncode == 0, out.stderr
    html = report.read_text(errors="replace")
    assert "seen_acc_trajectory_system.png" in html
    assert "suite_summary.csv" in html
    assert "Paired per-seed differences against the reference ablation" in html
