"""Checks of .ci/slurm.sh (stdlib + PyYAML only).

  check.py jobs SNAKEMAKE_LOG CONFIG      every pretrain/train job of the suite went through sbatch: its
                                          SLURM job id is in Snakemake's log, its SLURM log file exists,
                                          and SLURM itself (sacct, else squeue) records it as COMPLETED
                                          under the run's job name. Prints one line per job.
  check.py tables DIR_A DIR_B             the merged suite tables of two runs are equal (every column but
                                          wall-time/timing ones; numbers to 1e-9 relative).
  check.py probe CONFIG                   prints "ABLATION SEED" of the suite's first run (the failure probe).
  check.py failed SNAKEMAKE_LOG           the failure probe's log shows its SLURM job reported as failed.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import yaml

SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\S+) \(log: (.+)\)\.\s*$")
RUN_ID = re.compile(r"SLURM run ID: (\S+)")
# remote (sbatch) rules of the pipeline; everything else is a localrule
REMOTE_RULES = ("pretrain_base", "train")
TIMING = re.compile(r"(^|_)(wall|time|seconds|duration|elapsed|runtime)(_|$)|per_s$|_s$")
SUITE_TABLES = ("suite_summary.csv", "boundary_metrics.csv", "task_matrix.csv")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}


def fail(msg: str) -> None:
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def slurm_states(run_uuid: str) -> tuple[str, dict[str, str]]:
    """{job id: state} of the run's jobs (job name = the plugin's run id), from sacct when it works."""
    if shutil.which("sacct"):
        since = f"{datetime.now() - timedelta(days=1):%Y-%m-%dT%H:%M}"  # sacct's default is today 00:00
        proc = subprocess.run(["sacct", "-X", "-n", "--parsable2", "-S", since, "--name", run_uuid,
                               "-o", "JobIDRaw,State"],
                              capture_output=True, text=True, timeout=30)
        if proc.returncode == 0:
            return "sacct", dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)
    proc = subprocess.run(["squeue", "--states=all", "-h", "--name", run_uuid, "-o", "%i|%T"],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        fail(f"neither sacct nor squeue answered: {proc.stderr.strip()}")
    return "squeue", dict(line.split("|", 1) for line in proc.stdout.split() if "|" in line)


def check_jobs(log_path: str, config_path: str) -> None:
    config = yaml.safe_load(Path(config_path).read_text())
    expected = {"train": len(config["ablations"]) * len(config["seeds"]),
                "pretrain_base": 1 if config.get("pretrain") else 0}
    text = Path(log_path).read_text()
    uuids = RUN_ID.findall(text)
    if len(uuids) != 1:
        fail(f"expected one 'SLURM run ID' line in {log_path}, found {len(uuids)}")
    for rule in REMOTE_RULES:
        if re.search(rf"^localrule {rule}:", text, re.M):
            fail(f"rule {rule} ran on the submitting host (localrule), not through sbatch")
    jobs = []  # (rule, wildcards, slurm id, log)
    for line in text.splitlines():
        m = SUBMITTED.search(line)
        if m:
            log = Path(m.group(3))
            parts = log.parts
            i = next(k for k, p in enumerate(parts) if p.startswith("rule_"))
            jobs.append((parts[i][len("rule_"):], "/".join(parts[i + 1:-1]) or "-", m.group(2), log))
    for rule, n in expected.items():
        got = sum(1 for j in jobs if j[0] == rule)
        if got != n:
            fail(f"{got} {rule} job(s) went through sbatch, expected {n}")
    # slurmctld sends job records to slurmdbd asynchronously: sacct may lag behind the squeue that the
    # plugin polled. Wait (bounded) until SLURM records every job in a final state.
    deadline = time.monotonic() + 60
    while True:
        tool, states = slurm_states(uuids[0])
        if all(states.get(j[2], "MISSING").split()[0] in FINAL for j in jobs) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"SLURM run ID {uuids[0]}; job states from {tool}")
    print(f"{'rule':<14} {'wildcards':<22} {'slurm id':>8}  state")
    bad = []
    for rule, wildcards, jobid, log in jobs:
        state = states.get(jobid, "MISSING")
        print(f"{rule:<14} {wildcards:<22} {jobid:>8}  {state}")
        if state != "COMPLETED":
            bad.append(f"SLURM job {jobid} ({rule} {wildcards}) is {state}")
        if not log.is_file():
            bad.append(f"SLURM log {log} of job {jobid} is missing")
    if bad:
        fail("; ".join(bad))
    print("SLURM_JOB_IDS=" + ",".join(j[2] for j in jobs))


def _same(a: str, b: str) -> tuple[bool, float]:
    if a == b:
        return True, 0.0
    try:
        x, y = float(a), float(b)
    except ValueError:
        return False, math.inf
    if math.isnan(x) and math.isnan(y):
        return True, 0.0
    return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12), abs(x - y)


def read_table(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        fail(f"{path} is empty")
    return rows[0], rows[1:]


def check_tables(dir_a: str, dir_b: str) -> None:
    a, b = Path(dir_a), Path(dir_b)
    names = sorted({p.name for p in a.glob("*.csv")} | {p.name for p in b.glob("*.csv")})
    missing = [n for n in SUITE_TABLES if n not in names]
    if missing:
        fail(f"suite tables missing: {', '.join(missing)}")
    problems = []
    for name in names:
        if not (a / name).is_file() or not (b / name).is_file():
            problems.append(f"{name} exists in only one of the runs")
            continue
        head_a, rows_a = read_table(a / name)
        head_b, rows_b = read_table(b / name)
        if head_a != head_b:
            problems.append(f"{name}: different columns")
            continue
        if len(rows_a) != len(rows_b):
            problems.append(f"{name}: {len(rows_a)} vs {len(rows_b)} rows")
            continue
        skipped = [c for c in head_a if TIMING.search(c)]
        cols = [i for i, c in enumerate(head_a) if c not in skipped]
        cells = differ = 0
        worst = 0.0
        for ra, rb in zip(rows_a, rows_b, strict=True):
            for i in cols:
                cells += 1
                ok, diff = _same(ra[i], rb[i])
                worst = max(worst, diff)
                if not ok:
                    differ += 1
                    if differ <= 5:
                        problems.append(f"{name} column {head_a[i]}: {ra[i]!r} vs {rb[i]!r}")
        print(f"{name}: {len(rows_a)} rows, {len(cols)} columns compared ({cells} cells, "
              f"max abs diff {worst:g}), {differ} differ; ignored: {', '.join(skipped) or 'none'}")
        if differ:
            problems.append(f"{name}: {differ} cell(s) differ")
    if problems:
        fail("tables differ: " + "; ".join(problems))


def probe(config_path: str) -> None:
    config = yaml.safe_load(Path(config_path).read_text())
    print(next(iter(config["ablations"])), config["seeds"][0])


def check_failed(log_path: str) -> None:
    text = Path(log_path).read_text()
    if not any(SUBMITTED.search(line) for line in text.splitlines()):
        fail("the failure probe submitted no SLURM job")
    m = re.search(r"SLURM-job '(\S+)' failed, SLURM status is: '(\w+)'", text)
    if not m:
        fail("the failure probe's job was not reported as a failed SLURM job")
    print(f"failure probe: SLURM job {m.group(1)} reported as {m.group(2)}")


if __name__ == "__main__":
    commands = {"jobs": check_jobs, "tables": check_tables, "probe": probe, "failed": check_failed}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        fail(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
