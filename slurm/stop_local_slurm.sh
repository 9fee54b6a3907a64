#!/usr/bin/env bash
# Stops the single-node Slurm that start_local_slurm.sh started: slurmd, slurmctld, then munged
# (each by the pid in its pid file). Leaves packages, config and key in place; idempotent.
set -uo pipefail

stop() {
    local name=$1 pidfile=$2 pid
    [[ -s "$pidfile" ]] || return 0
    pid=$(<"$pidfile")
    kill -0 "$pid" 2>/dev/null || return 0
    kill "$pid"
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || { echo "stop_local_slurm: stopped $name" >&2; return 0; }
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "stop_local_slurm: killed $name" >&2
}

stop slurmd /run/slurmd.pid
stop slurmctld /run/slurmctld.pid
stop munged /run/munge/munged.pid
