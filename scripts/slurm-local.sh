#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the Slurm tests (`llmlab run --backend slurm`)
# and for trying job arrays on a laptop or a CI box.
#
#   scripts/slurm-local.sh start    # install (Debian: slurm-wlm, munge) when missing, configure,
#                                   # start munged, slurmctld, slurmd; wait until the node is idle
#   scripts/slurm-local.sh status   # sinfo and squeue; exit 0 when the node is up
#   scripts/slurm-local.sh stop     # stop the three daemons (the configuration stays)
#
# Needs root (as CI runs): it writes /etc/slurm/{slurm,cgroup}.conf and starts the daemons
# directly, without systemd. `start` is idempotent: with the node already up it does nothing.
# What works on these machines (cgroup v1 beside a v2 root, no systemd) is in the configuration
# below; Slurm 22.05 (Debian 12). One partition, `debug`, holds the node.
set -euo pipefail

CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd

say() { echo "slurm-local: $*" >&2; }
die() { say "error: $*"; exit 1; }

node_up() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1) || return 1
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm and munge are missing and installing them needs root"
    command -v apt-get >/dev/null || die "slurm-wlm and munge are missing and there is no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    mkdir -p "$CONF_DIR" "$LOG_DIR" "$STATE_DIR" "$SPOOL_DIR"
    local host node
    host=$(hostname -s)
    # The node line as slurmd sees this machine (CPUs, sockets, cores, memory); drop the
    # UpTime line it prints after it.
    node=$(slurmd -C | grep '^NodeName=' | head -n1)
    [[ -n "$node" ]] || die "slurmd -C printed no NodeName line"
    cat >"$CONF_DIR/slurm.conf" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster (controller and compute node: $host).
ClusterName=llmlab-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# No systemd, cgroup v1 beside a v2 root: process groups track jobs, no task binding.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# A cancelled task gets SIGTERM, then this many seconds to save its state before SIGKILL.
KillWait=30
MinJobAge=300
SchedulerType=sched/backfill
$node
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$CONF_DIR/cgroup.conf" <<EOF
# Written by scripts/slurm-local.sh (cgroup/v2 stops slurmd here: "Hybrid mode is not supported").
CgroupPlugin=cgroup/v1
IgnoreSystemd=yes
CgroupAutomount=no
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    [[ -f /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
    mkdir -p /run/munge
    chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "munged did not start (munge -n | unmunge fails)"
}

start() {
    if node_up; then
        say "already running"
        return 0
    fi
    install_packages
    write_config
    start_munge
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 1 60); do
        if node_up; then
            # A node left down or drained by an earlier run comes back (ReturnToService=2 does
            # this too, once slurmd registers).
            say "up: $(sinfo -h -N -o '%N %T %c CPUs')"
            return 0
        fi
        local state
        state=$(timeout 10 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        if [[ "$state" == down* || "$state" == drain* ]]; then
            scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    die "the node is not idle after 60 s; see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log"
}

stop() {
    # By the pid files the daemons write (slurm.conf above), not by name.
    local f pid
    for f in /run/slurmd.pid /run/slurmctld.pid; do
        if [[ -f "$f" ]] && pid=$(cat "$f") && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
        fi
    done
    say "stopped slurmd and slurmctld (munged left running)"
}

status() {
    if node_up; then
        sinfo
        squeue
        return 0
    fi
    say "not running"
    return 1
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
