#!/usr/bin/env bash
# The SLURM scale-out test, called by .ci/run after pytest (or by hand). On a Debian machine, as root:
#   1. copies the working tree (tracked and untracked, not ignored files) into a temporary directory
#      and builds a private virtual environment for that copy with the slurm executor plugin
#      (`uv sync --locked --extra slurm`, hard links from uv's cache: seconds). Every job of the test
#      runs from that copy and that environment, so nothing done to the checkout while the test runs
#      (edits of src/, config/ or workflow/, `uv sync` removing the plugin from .venv) can reach it;
#   2. starts a one-node SLURM cluster (.ci/slurm/cluster.sh: munge, mariadb + slurmdbd, slurmctld,
#      slurmd; every readiness wait is on a real condition: munge round trip, mysqladmin ping,
#      `scontrol ping` UP, the node idle in `sinfo`, sacct answering);
#   3. runs the CI suite (config/ci.yaml) through `--profile profiles/slurm` and checks that every
#      pretrain/train job went through sbatch and COMPLETED in SLURM (sacct);
#   4. runs the same suite locally (`--cores 1 --resources gpu=1`) and checks that the merged suite
#      tables are equal (timing columns aside);
#   5. runs one train job with a broken override through SLURM and checks that Snakemake reports the
#      failed SLURM job and exits non-zero (it must fail, not hang);
#   6. prints the SLURM job ids and the wall times; a trap stops the daemons it started, by pid (and a
#      running snakemake first), and removes the temporary directory.
# On any failure it prints Snakemake's log, SLURM's record of the run's jobs (sacct), every SLURM job
# log, every rule log and the daemons' logs, and keeps the temporary directory. Elsewhere (no apt-get,
# or not root) it prints why and exits 0 (skipped). Every step runs under `timeout`. Nothing is
# written inside the repository. One test at a time per machine (a lock in /run/lock): a second one
# waits for the first instead of sharing, and then stopping, its cluster.
#
# Environment: SLURM_CI_DBD=0 runs the cluster without slurmdbd (squeue status polling only);
# SLURM_CI_KEEP=1 keeps the temporary directory on success too; SLURM_CI_FAIL_PROBE=0 skips step 5;
# SLURM_CI_RUN_TIMEOUT (default 600) limits each suite run, in seconds; SLURM_CI_LOCK_WAIT (default
# 900) how long to wait for another test's lock; SLURM_CI_STARTED: the file where cluster.sh lists the
# daemons it started (default: in the temporary directory; .ci/run passes its own, for its trap).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
say() { printf '[slurm-ci] %s\n' "$*"; }

if ! command -v apt-get >/dev/null 2>&1; then say "skipped: no apt-get (the test installs Debian's SLURM packages)"; exit 0; fi
if [ "$(id -u)" != 0 ]; then say "skipped: not root (the test installs and starts SLURM daemons)"; exit 0; fi

T_START=$(date +%s)
RUN_TIMEOUT="${SLURM_CI_RUN_TIMEOUT:-600}"
LOCK_WAIT="${SLURM_CI_LOCK_WAIT:-900}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/biollm-slurm-ci.XXXXXX")"
TREE="$WORK/tree"     # the snapshot of the working tree that every job runs from
VENV="$WORK/venv"     # its own environment (the plugin included)
CONFIG="$TREE/config/ci.yaml"
export SLURM_CI_STARTED="${SLURM_CI_STARTED:-$WORK/daemons.started}"
export WANDB_MODE=offline

# The test's own stdout/stderr, for the trap: it may fire while a step's output goes to a log file.
# (Closed, with the lock's fd 9, for the daemons that cluster.sh starts.)
exec 7>&1 8>&2
CHILD=""   # the pid of the step running now (a `timeout`), stopped first by the trap
FAILED_STEP=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 1>&7 2>&8
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        # timeout passes the INT on to snakemake, which cancels its SLURM jobs (scancel) and exits
        # (on TERM it would wait for them); 30 s later timeout KILLs it
        say "stopping the running step (pid $CHILD)"
        kill -INT "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    bash "$ROOT/.ci/slurm/cluster.sh" stop 7>&- 8>&- 9>&- || rc=1
    if [ "$rc" != 0 ] || [ "${SLURM_CI_KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
    [ "$rc" = 0 ] && say "PASSED" || say "FAILED (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exec 1>&7 2>&8; say "interrupted"; exit 130' INT TERM

elapsed() { echo $(( $(date +%s) - $1 )); }

# bg CMD...: run a step in the background and wait for it, so that a TERM (the timeout of .ci/run)
# reaches the trap at once instead of after the step.
bg() {
    local rc=0
    "$@" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}

# Snakemake from the snapshot and its environment, a working directory of its own and no implicit
# workflow profile (profiles/default is the local one).
smk() {
    local dir=$1; shift
    bg timeout --signal=INT --kill-after=30 "$RUN_TIMEOUT" "$VENV/bin/snakemake" \
        --snakefile "$TREE/Snakefile" --directory "$dir" --workflow-profile none "$@"
}

# show_failure LOG DIR: everything needed to see why a run failed
show_failure() {
    local log=$1 dir=$2 uuid f
    say "==================== diagnostics"
    say "last 80 lines of $log:"; tail -n 80 "$log" || true
    uuid=$(sed -n 's/.*SLURM run ID: \([^ ]*\).*/\1/p' "$log" | head -n 1)
    if [ -n "$uuid" ]; then
        say "SLURM's record of the run's jobs (job name $uuid):"
        timeout 20 sacct -X -S now-1days --name "$uuid" \
            -o JobID,State,ExitCode,Elapsed,Start,End,NodeList%12,Reason%20 2>&1 \
            || timeout 20 squeue --states=all --name "$uuid" -o '%.8i %.12T %.10M %R' 2>&1 || true
    fi
    find "$dir/.snakemake/slurm_logs" -name '*.log' 2>/dev/null | sort | while read -r f; do
        say "SLURM job log $f (last 40 lines):"; tail -n 40 "$f"; done
    find "$dir/results" -path '*/logs/*' -name '*.log' 2>/dev/null | sort | while read -r f; do
        say "rule log $f (last 40 lines):"; tail -n 40 "$f"; done
    say "node:"; timeout 10 sinfo -N -o '%N %T %C %E' 2>&1 || true
    for f in /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/slurm/slurmdbd.log; do
        [ -f "$f" ] && { say "$f (last 15 lines):"; tail -n 15 "$f"; }
    done
    say "==================== end of diagnostics"
}

# ------------------------------------------------------------------------- 0. one test per machine
mkdir -p /run/lock
LOCK=/run/lock/biollm-slurm-ci.lock
exec 9>>"$LOCK"
if ! flock -n 9; then
    say "another SLURM test holds $LOCK (pid $(cat "$LOCK" 2>/dev/null || echo '?')); waiting up to ${LOCK_WAIT} s"
    bg flock -w "$LOCK_WAIT" 9 || { say "the other SLURM test still holds $LOCK after ${LOCK_WAIT} s"; exit 1; }
fi
echo "$$" > "$LOCK"

# ------------------------------------------------------------------- 1. snapshot, private environment
t=$(date +%s)
mkdir -p "$TREE"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard --deduplicate \
        | (cd "$ROOT" && while IFS= read -r -d '' f; do
               if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi   # tracked but deleted: left out
           done) \
        | tar -C "$ROOT" --null --no-recursion -T - -cf - | tar -C "$TREE" -xf -
    head=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)
    dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
    say "snapshot of $ROOT (commit $head, $dirty changed/untracked paths) in $TREE"
else
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./results --exclude=./.snakemake -cf - . \
        | tar -C "$TREE" -xf -
    say "snapshot of $ROOT (not a git checkout) in $TREE"
fi
bg env UV_PROJECT_ENVIRONMENT="$VENV" timeout 600 uv --directory "$TREE" sync --locked --extra slurm --no-dev --quiet
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"   # the rules' `python` is this environment's
"$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit([m for m in ("snakemake_executor_plugin_slurm",
    "snakemake_executor_plugin_slurm_jobstep", "biollm_cls") if u.find_spec(m) is None] or 0)'
T_SYNC=$(elapsed "$t")

# ------------------------------------------------------------------------------------------ 2. cluster
t=$(date +%s)
bg timeout 900 bash "$ROOT/.ci/slurm/cluster.sh" start 7>&- 8>&- 9>&-
T_CLUSTER=$(elapsed "$t")
say "snapshot + environment in ${T_SYNC} s, cluster up in ${T_CLUSTER} s"

# ------------------------------------------------------------------------------- 3. the suite via SLURM
mkdir -p "$WORK/slurm" "$WORK/local"
say "CI suite through SLURM (--profile profiles/slurm), in $WORK/slurm"
t=$(date +%s)
# init-seconds 2: the first status check 2 s after a submission (the profile's 10 s suits a real
# cluster); keep-successful-logs: the check below reads the SLURM log of every job.
rc=0
smk "$WORK/slurm" all --profile "$TREE/profiles/slurm" --configfile "$CONFIG" \
    --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs > "$WORK/slurm.log" 2>&1 || rc=$?
T_SLURM=$(elapsed "$t")
if [ "$rc" != 0 ]; then
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "the SLURM run timed out after ${RUN_TIMEOUT} s"; fi
    say "the SLURM run failed (exit $rc, after ${T_SLURM} s)"; show_failure "$WORK/slurm.log" "$WORK/slurm"; exit 1
fi
say "SLURM run finished in ${T_SLURM} s"
"$VENV/bin/python" "$TREE/.ci/slurm/check.py" jobs "$WORK/slurm.log" "$CONFIG" > "$WORK/jobs.txt" 2>&1 || FAILED_STEP=1
cat "$WORK/jobs.txt"
if [ "$FAILED_STEP" = 1 ]; then show_failure "$WORK/slurm.log" "$WORK/slurm"; exit 1; fi

# ------------------------------------------------------------------------------- 4. the same suite locally
say "the same suite locally (--cores 1 --resources gpu=1), in $WORK/local"
t=$(date +%s)
rc=0
smk "$WORK/local" all --cores 1 --resources gpu=1 --configfile "$CONFIG" > "$WORK/local.log" 2>&1 || rc=$?
T_LOCAL=$(elapsed "$t")
if [ "$rc" != 0 ]; then say "the local run failed (exit $rc)"; show_failure "$WORK/local.log" "$WORK/local"; exit 1; fi
say "local run finished in ${T_LOCAL} s"
suite=$("$VENV/bin/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["suite_name"])' "$CONFIG")
"$VENV/bin/python" "$TREE/.ci/slurm/check.py" tables \
    "$WORK/slurm/results/$suite/tables" "$WORK/local/results/$suite/tables"

# ------------------------------------------------------------------------------- 5. a failing SLURM job
T_PROBE=skipped
if [ "${SLURM_CI_FAIL_PROBE:-1}" = 1 ]; then
    read -r ablation seed < <("$VENV/bin/python" "$TREE/.ci/slurm/check.py" probe "$CONFIG")
    say "failure probe: results/$suite/runs/$ablation/seed$seed with an unknown override, through SLURM"
    t=$(date +%s)
    rc=0
    smk "$WORK/slurm" "results/$suite/runs/$ablation/seed$seed/summary.json" --profile "$TREE/profiles/slurm" \
        --configfile "$CONFIG" --config "ablations={$ablation: [train.no_such_key_slurm_ci_probe=1]}" \
        --slurm-init-seconds-before-status-checks 2 > "$WORK/probe.log" 2>&1 || rc=$?
    T_PROBE=$(elapsed "$t")
    if [ "$rc" = 0 ]; then say "the failure probe's snakemake exited 0"; show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "the failure probe hung (timeout)"; show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; fi
    "$VENV/bin/python" "$TREE/.ci/slurm/check.py" failed "$WORK/probe.log" \
        || { show_failure "$WORK/probe.log" "$WORK/slurm"; exit 1; }
    say "failure probe: snakemake exited $rc after ${T_PROBE} s"
    T_PROBE="${T_PROBE} s"
fi

say "SLURM job ids: $(sed -n 's/^SLURM_JOB_IDS=//p' "$WORK/jobs.txt")"
say "wall time: SLURM run ${T_SLURM} s, local run ${T_LOCAL} s (same config: config/ci.yaml)"
say "other steps: snapshot + environment ${T_SYNC} s, cluster start ${T_CLUSTER} s, failure probe ${T_PROBE}; whole test $(elapsed "$T_START") s"
