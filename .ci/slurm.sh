#!/usr/bin/env bash
# The SLURM scale-out test (called by .ci/run after pytest). On a Debian machine, as root:
#   1. installs the slurm executor plugin (the `slurm` extra of uv.lock),
#   2. starts a one-node SLURM cluster (.ci/slurm/cluster.sh: munge, mariadb + slurmdbd, slurmctld, slurmd),
#   3. runs the CI suite (config/ci.yaml) through `--profile profiles/slurm`, in a temporary working
#      directory, and checks that every pretrain/train job went through sbatch and COMPLETED in SLURM,
#   4. runs the same suite locally (`--cores 1 --resources gpu=1`) in a second one and checks that the
#      merged suite tables are equal (timing columns aside),
#   5. runs one train job with a broken override through SLURM and checks that Snakemake reports the
#      failed SLURM job and exits non-zero (it must fail, not hang),
#   6. prints the SLURM job ids and the wall times, and (trap) stops the daemons it started, by pid,
#      removes its temporary directories, and uninstalls the plugin again if it was not there before.
# Elsewhere (no apt-get, or not root) it prints why and exits 0 (skipped). Every step runs under
# `timeout`. Nothing is written inside the repository (.venv aside).
#
# Environment: SLURM_CI_DBD=0 runs the cluster without slurmdbd (squeue status polling only);
# SLURM_CI_KEEP=1 keeps the temporary directories; SLURM_CI_FAIL_PROBE=0 skips step 5;
# SLURM_CI_RUN_TIMEOUT (default 900) limits each suite run, in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
say() { printf '[slurm-ci] %s\n' "$*"; }

if ! command -v apt-get >/dev/null 2>&1; then say "skipped: no apt-get (the test installs Debian's SLURM packages)"; exit 0; fi
if [ "$(id -u)" != 0 ]; then say "skipped: not root (the test installs and starts SLURM daemons)"; exit 0; fi

T_START=$(date +%s)
RUN_TIMEOUT="${SLURM_CI_RUN_TIMEOUT:-900}"
CONFIG="$ROOT/config/ci.yaml"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/biollm-slurm-ci.XXXXXX")"
export SLURM_CI_STARTED="$WORK/daemons.started"   # cluster.sh lists the daemons it started here
export WANDB_MODE=offline

PLUGIN_ADDED=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    bash "$ROOT/.ci/slurm/cluster.sh" stop || rc=1
    if [ "$PLUGIN_ADDED" = 1 ]; then
        # With the plugin installed, every snakemake start runs `scontrol show config`; with SLURM's client
        # installed but no controller up (as after this test) that takes ~10 s. Leave .venv as it was.
        timeout 120 uv pip uninstall --quiet snakemake-executor-plugin-slurm snakemake-executor-plugin-slurm-jobstep || rc=1
        say "removed the slurm executor plugin from .venv again (uv sync --locked --extra slurm brings it back)"
    fi
    if [ "${SLURM_CI_KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    [ "$rc" = 0 ] && say "PASSED" || say "FAILED (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

elapsed() { echo $(( $(date +%s) - $1 )); }

# Snakemake with this project's environment (the plugin included), a working directory of its own
# and no implicit workflow profile (profiles/default is the local one).
smk() {
    local dir=$1; shift
    timeout --kill-after=30 "$RUN_TIMEOUT" uv run --locked --extra slurm snakemake \
        --snakefile "$ROOT/Snakefile" --directory "$dir" --workflow-profile none "$@"
}

show_failure() {  # show_failure LOG DIR: Snakemake's log, the SLURM logs and the rules' logs
    say "last lines of $1:"; tail -n 60 "$1" || true
    find "$2/.snakemake/slurm_logs" -name '*.log' 2>/dev/null | while read -r f; do say "SLURM log $f:"; tail -n 30 "$f"; done
    find "$2/results" -path '*/logs/*' -name '*.log' 2>/dev/null | while read -r f; do say "rule log $f:"; tail -n 20 "$f"; done
}

# ------------------------------------------------------------------------------- 1. plugin, cluster
t=$(date +%s)
uv pip show --quiet snakemake-executor-plugin-slurm >/dev/null 2>&1 || PLUGIN_ADDED=1
timeout 600 uv sync --locked --extra slurm --inexact --quiet
T_SYNC=$(elapsed "$t")
t=$(date +%s)
timeout 900 bash "$ROOT/.ci/slurm/cluster.sh" start
T_CLUSTER=$(elapsed "$t")
say "plugin installed in ${T_SYNC} s, cluster up in ${T_CLUSTER} s"

# ------------------------------------------------------------------------------- 2. the suite via SLURM
mkdir -p "$WORK/slurm" "$WORK/local"
say "CI suite through SLURM (--profile profiles/slurm), in $WORK/slurm"
t=$(date +%s)
# init-seconds 2: the first status check 2 s after a submission (the profile's 10 s suits a real
# cluster); keep-successful-logs: the check below reads the SLURM log of every job.
rc=0
smk "$WORK/slurm" all --profile "$ROOT/profiles/slurm" --configfile "$CONFIG" \
    --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs > "$WORK/slurm.log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "the SLURM run timed out after ${RUN_TIMEOUT} s"; fi
    say "the SLURM run failed (exit $rc)"; show_failure "$WORK/slurm.log" "$WORK/slurm"; exit 1
fi
T_SLURM=$(elapsed "$t")
say "SLURM run finished in ${T_SLURM} s"
uv run --locked --extra slurm python "$ROOT/.ci/slurm/check.py" jobs "$WORK/slurm.log" "$CONFIG" | tee "$WORK/jobs.txt" \
    || { show_failure "$WORK/slurm.log" "$WORK/slurm"; exit 1; }

# ------------------------------------------------------------------------------- 3. the same suite locally
say "the same suite locally (--cores 1 --resources gpu=1), in $WORK/local"
t=$(date +%s)
rc=0
smk "$WORK/local" all --cores 1 --resources gpu=1 --configfile "$CONFIG" > "$WORK/local.log" 2>&1 || rc=$?
if [ "$rc" != 0 ]; then say "the local run failed (exit $rc)"; show_failure "$WORK/local.log" "$WORK/local"; exit 1; fi
T_LOCAL=$(elapsed "$t")
say "local run finished in ${T_LOCAL} s"
suite=$(uv run --locked --extra slurm python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["suite_name"])' "$CONFIG")
uv run --locked --extra slurm python "$ROOT/.ci/slurm/check.py" tables \
    "$WORK/slurm/results/$suite/tables" "$WORK/local/results/$suite/tables"

# ------------------------------------------------------------------------------- 4. a failing SLURM job
T_PROBE=skipped
if [ "${SLURM_CI_FAIL_PROBE:-1}" = 1 ]; then
    read -r ablation seed < <(uv run --locked --extra slurm python "$ROOT/.ci/slurm/check.py" probe "$CONFIG")
    say "failure probe: results/$suite/runs/$ablation/seed$seed with an unknown override, through SLURM"
    t=$(date +%s)
    rc=0
    smk "$WORK/slurm" "results/$suite/runs/$ablation/seed$seed/summary.json" --profile "$ROOT/profiles/slurm" \
        --configfile "$CONFIG" --config "ablations={$ablation: [train.no_such_key_slurm_ci_probe=1]}" \
        --slurm-init-seconds-before-status-checks 2 > "$WORK/probe.log" 2>&1 || rc=$?
    T_PROBE=$(elapsed "$t")
    if [ "$rc" = 0 ]; then say "the failure probe's snakemake exited 0"; show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "the failure probe hung (timeout)"; show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; fi
    uv run --locked --extra slurm python "$ROOT/.ci/slurm/check.py" failed "$WORK/probe.log" \
        || { show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; }
    say "failure probe: snakemake exited $rc after ${T_PROBE} s"
    T_PROBE="${T_PROBE} s"
fi

say "SLURM job ids: $(sed -n 's/^SLURM_JOB_IDS=//p' "$WORK/jobs.txt")"
say "wall time: SLURM run ${T_SLURM} s, local run ${T_LOCAL} s (same config: $CONFIG)"
say "other steps: plugin sync ${T_SYNC} s, cluster start ${T_CLUSTER} s, failure probe ${T_PROBE}; whole test $(elapsed "$T_START") s"
