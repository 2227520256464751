#!/usr/bin/env bash
# A one-node SLURM cluster on this Debian machine, for .ci/slurm.sh. Needs root and apt-get; no systemd:
# the daemons are started directly and tracked by their pid files.
#
#   cluster.sh start    install (if needed) munge + slurmctld + slurmd (+ slurmdbd + mariadb), configure,
#                       start, wait until the node is idle. Appends "NAME PIDFILE" of every daemon it
#                       started to $SLURM_CI_STARTED (default /run/slurm-ci.started).
#   cluster.sh stop     cancel this cluster's jobs, then stop exactly the daemons listed in
#                       $SLURM_CI_STARTED, each by the pid in its pid file (a daemon that was already
#                       running before `start` is left alone).
#   cluster.sh status   which daemons run, and sinfo.
#
# Environment: SLURM_CI_DBD=1 (default) also runs mariadb + slurmdbd so that `sacct` works; 0 runs without
# accounting (then Snakemake's slurm executor must poll with `squeue`, see profiles/slurm/config.yaml).
# SLURM_CI_PARTITION (default cpu, the partition profiles/slurm names).
#
# Every wait is bounded; a step that does not come up prints the daemon logs and exits 1.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
WITH_DBD="${SLURM_CI_DBD:-1}"
PARTITION="${SLURM_CI_PARTITION:-cpu}"
STARTED="${SLURM_CI_STARTED:-/run/slurm-ci.started}"
NODE=localhost
RUN=/run/slurm

log() { printf '[slurm-cluster] %s\n' "$*" >&2; }

# pid_alive PIDFILE: the pid in PIDFILE is a live process of the daemon that the file is named after
# (a stale pid file whose pid now belongs to another process does not count, and is never signalled)
pid_alive() {
    local pid name
    [ -s "$1" ] || return 1
    pid=$(cat "$1"); name=$(basename "$1" .pid)
    [ "$name" = mysqld ] && name=mariadbd
    kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pf=$2 pid
    if pid_alive "$pf"; then
        pid=$(cat "$pf")
        log "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then log "$name did not stop; SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pf"
}

show_logs() {
    tail -n 25 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log /var/log/slurm/slurmdbd.log \
        /var/log/mysql/error.log 2>/dev/null >&2 || true
}

started() { echo "$1 $2" >> "$STARTED"; }

# spawn CMD...: start a daemon holding none of our file descriptors but 0-2 (a CI runner's log pipe, a
# caller's lock), so that nothing stays open because of it once its caller is gone
spawn() {
    (
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            case "$fd" in 0|1|2|255) ;; *) eval "exec $fd>&-" 2>/dev/null || true ;; esac
        done
        exec "$@"
    )
}

do_stop() {
    [ -s "$STARTED" ] || { log "nothing to stop ($STARTED is empty or missing)"; return 0; }
    if grep -q '^slurmctld ' "$STARTED" && pid_alive "$RUN/slurmctld.pid"; then
        # jobs still running (a timed-out CI run) would leave slurmstepd processes behind: cancel them first
        if [ -n "$(timeout 10 squeue -h -o %i 2>/dev/null)" ]; then
            log "cancelling the cluster's remaining jobs"
            timeout 10 scancel --full --user=root 2>/dev/null || true
            for _ in $(seq 60); do [ -z "$(timeout 10 squeue -h -t PD,R,CG -o %i 2>/dev/null)" ] && break; sleep 0.5; done
        fi
    fi
    # reverse start order
    local name pf
    tac "$STARTED" | while read -r name pf; do stop_pidfile "$name" "$pf"; done
    rm -f "$STARTED"
}

case "${1:-}" in
    stop) do_stop; exit 0 ;;
    status)
        for p in "$RUN/slurmd.pid" "$RUN/slurmctld.pid" "$RUN/slurmdbd.pid" /run/mysqld/mysqld.pid /run/munge/munged.pid; do
            if pid_alive "$p"; then echo "running $(cat "$p") $p"; else echo "stopped - $p"; fi
        done
        timeout 10 sinfo 2>/dev/null || true
        exit 0 ;;
    start) ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

# ------------------------------------------------------------------------------------------ install
pkgs=(slurmctld slurmd slurm-client munge)
[ "$WITH_DBD" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    # no systemd (and policy-rc.d): the packages' postinst scripts start nothing
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ------------------------------------------------------------------------------------------- config
mkdir -p /etc/slurm "$RUN" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
CPUS=$(nproc)
REAL_MEM=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 85 / 100 / 100 * 100 ))  # 85 % of RAM
if [ "$WITH_DBD" = 1 ]; then
    ACCOUNTING='AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nJobAcctGatherType=jobacct_gather/linux'
else
    ACCOUNTING='AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
fi

if pid_alive "$RUN/slurmctld.pid"; then
    # someone else's cluster (or a previous start): use it as it is, rewrite nothing, stop nothing later
    log "slurmctld already running (pid $(cat "$RUN/slurmctld.pid")); using it as it is"
else
    sed -e "s/@CPUS@/$CPUS/" -e "s/@REAL_MEM@/$REAL_MEM/" -e "s/@PARTITION@/$PARTITION/" \
        -e "s|@ACCOUNTING@|$ACCOUNTING|" "$HERE/slurm.conf.in" > /etc/slurm/slurm.conf
    chmod 644 /etc/slurm/slurm.conf
    if [ "$WITH_DBD" = 1 ]; then
        install -m 600 "$HERE/slurmdbd.conf.in" /etc/slurm/slurmdbd.conf  # slurmdbd insists on 600
    fi
    log "wrote /etc/slurm/slurm.conf (CPUs=$CPUS RealMemory=$REAL_MEM accounting=$([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none))"
fi

# -------------------------------------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pid_alive /run/munge/munged.pid; then
    log "starting munged"
    spawn runuser -u munge -- /usr/sbin/munged   # forks into the background, writes its pid file
    started munged /run/munge/munged.pid
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { log "munge does not work"; exit 1; }

# ---------------------------------------------------------------------------------- mariadb, slurmdbd
if [ "$WITH_DBD" = 1 ]; then
    mkdir -p /run/mysqld /var/log/mysql; chown mysql:mysql /run/mysqld /var/log/mysql
    if ! pid_alive /run/mysqld/mysqld.pid; then
        log "starting mariadbd"
        spawn setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
            --socket=/run/mysqld/mysqld.sock --skip-networking \
            --log-error=/var/log/mysql/error.log </dev/null >/dev/null 2>&1 &
        for _ in $(seq 100); do [ -s /run/mysqld/mysqld.pid ] && break; sleep 0.2; done
        started mariadbd /run/mysqld/mysqld.pid
    fi
    for _ in $(seq 100); do mysqladmin --socket=/run/mysqld/mysqld.sock ping >/dev/null 2>&1 && break; sleep 0.2; done
    mysqladmin --socket=/run/mysqld/mysqld.sock ping >/dev/null || { log "mariadb did not start"; show_logs; exit 1; }
    timeout 30 mysql --socket=/run/mysqld/mysqld.sock -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmci';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        FLUSH PRIVILEGES;"
    if ! pid_alive "$RUN/slurmdbd.pid"; then
        log "starting slurmdbd"
        spawn timeout 60 /usr/sbin/slurmdbd   # daemonizes, writes its pid file
        started slurmdbd "$RUN/slurmdbd.pid"
    fi
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.2; done
    (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null || { log "slurmdbd does not listen on 6819"; show_logs; exit 1; }
fi

# ---------------------------------------------------------------------------------- slurmctld, slurmd
OWN_CTLD=0
if ! pid_alive "$RUN/slurmctld.pid"; then
    log "starting slurmctld"
    spawn timeout 60 /usr/sbin/slurmctld   # daemonizes, writes its pid file
    started slurmctld "$RUN/slurmctld.pid"
    OWN_CTLD=1
fi
for _ in $(seq 100); do timeout 10 scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
timeout 10 scontrol ping 2>/dev/null | grep -q UP || { log "slurmctld does not answer (scontrol ping)"; show_logs; exit 1; }
if [ "$OWN_CTLD" = 1 ]; then
    # slurmctld restores its jobs from StateSaveLocation: jobs of an earlier test that was killed would
    # hold the node (or be started again); ours starts empty
    leftover=$(timeout 10 squeue -h -t PD,R,CG,S -o %i 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "${leftover// }" ]; then
        log "cancelling jobs left from an earlier run: $leftover"
        timeout 10 scancel --full $leftover 2>/dev/null || true
    fi
fi
if ! pid_alive "$RUN/slurmd.pid"; then
    log "starting slurmd"
    spawn timeout 60 /usr/sbin/slurmd -N "$NODE"
    started slurmd "$RUN/slurmd.pid"
fi

# The node is ready when slurmd has registered and sinfo shows it idle (with a cluster of our own, also
# no job left on it; someone else's may be busy: mix/alloc will do). down/drain (a restart before
# SlurmdTimeout, or a registration before the conf matched) is resumed.
if [ "$OWN_CTLD" = 1 ]; then ready='idle'; else ready='idle|mix|alloc'; fi
state=""
for _ in $(seq 120); do
    state=$(timeout 10 sinfo -h -n "$NODE" -o '%t' 2>/dev/null | head -1 || true)
    if [[ "$state" =~ ^($ready)$ ]]; then break; fi
    case "$state" in
        drain*|down*|drng) timeout 10 scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
if ! [[ "$state" =~ ^($ready)$ ]]; then log "node did not become ready (state '$state', want $ready)"; show_logs; exit 1; fi
if [ "$WITH_DBD" = 1 ]; then
    # the cluster registers itself with slurmdbd; sacct must answer before Snakemake relies on it
    for _ in $(seq 60); do timeout 10 sacct -n -X -o JobID >/dev/null 2>&1 && break; sleep 0.5; done
    timeout 10 sacct -n -X -o JobID >/dev/null || { log "sacct does not work"; show_logs; exit 1; }
fi
log "cluster up: node $NODE is $state, partition $PARTITION, accounting $([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none)"
timeout 10 sinfo >&2
