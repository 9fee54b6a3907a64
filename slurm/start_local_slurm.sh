#!/usr/bin/env bash
# A single-node Slurm on this machine, for tests and trying things out: munge, slurmctld and
# slurmd on loopback, one node (this host, all its CPUs) in partition `debug`.
#
# Idempotent: installs the Debian packages when slurmctld is missing, writes the config, starts
# what is not running, and returns once `sinfo` shows the node idle (or fails after
# LONGTRAIN_SLURM_WAIT_S seconds, default 60). Run as root; stop with stop_local_slurm.sh.
#
# Exit codes: 0 ready; 77 Slurm cannot be installed here (not root, or no apt-get);
# anything else is a failure (the daemons' logs are under /var/log/slurm).
set -euo pipefail

readonly CANNOT_INSTALL=77
readonly WAIT_S="${LONGTRAIN_SLURM_WAIT_S:-60}"
readonly CONF_DIR=/etc/slurm
readonly CONF="$CONF_DIR/slurm.conf"
readonly LOG_DIR=/var/log/slurm
readonly CTLD_PID=/run/slurmctld.pid
readonly SLURMD_PID=/run/slurmd.pid
readonly MUNGE_KEY=/etc/munge/munge.key
readonly MUNGE_LOG=/var/log/munged.log

say() { echo "start_local_slurm: $*" >&2; }

running() {
    # a daemon is running when its pid file names a live process
    local pid
    [[ -s "$1" ]] && pid=$(<"$1") && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

INSTALLED_NOW=0
install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v sinfo >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -ne 0 ]]; then
        say "Slurm is not installed and installing it needs root"
        exit "$CANNOT_INSTALL"
    fi
    if ! command -v apt-get >/dev/null; then
        say "Slurm is not installed and there is no apt-get to install it"
        exit "$CANNOT_INSTALL"
    fi
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq
    timeout 600 apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
    INSTALLED_NOW=1
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge
    install -d -o munge -g munge -m 0755 /run/munge
    # our own key when there is none, or in place of the one the package just generated;
    # a key that was here before is never replaced (other hosts may share it)
    if [[ ! -s "$MUNGE_KEY" ]] || ((INSTALLED_NOW)); then
        # written under a restrictive umask: the key is never readable by others, even briefly
        (umask 077 && dd if=/dev/urandom of="$MUNGE_KEY.new" bs=1024 count=1 status=none)
        mv -f "$MUNGE_KEY.new" "$MUNGE_KEY"
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    # as root here (no systemd to run it as user munge): --force accepts that; its log goes
    # to a directory root owns (munged refuses to trust one owned by another user)
    munged --force --log-file="$MUNGE_LOG"
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    say "munged did not answer; see $MUNGE_LOG"
    exit 1
}

CONFIG_CHANGED=0
write_config() {
    local host cpus mem_mb new
    host=$(hostname -s)
    cpus=$(nproc)
    # a bit under what is free now, so slurmd never finds less memory than configured
    mem_mb=$(awk '/^MemAvailable:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    install -d -m 0755 "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
    new=$(cat <<EOF
# Written by longtrain's slurm/start_local_slurm.sh: one node on loopback, for tests.
ClusterName=longtrain
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
# daemons listen on loopback only, not on every interface
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (default 120): short for tests
AuthInfo=cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# short enough for tests: a finished job leaves squeue soon
MinJobAge=30
InactiveLimit=0
KillWait=10
NodeName=${host} NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
)
    # only the node's memory moves between runs: keep a config that differs in nothing else
    if [[ -f "$CONF" ]] && diff -q <(grep -v '^NodeName=' "$CONF") \
            <(grep -v '^NodeName=' <<<"$new") >/dev/null \
            && grep -q "^NodeName=${host} .*CPUs=${cpus} " "$CONF"; then
        CONFIG_CHANGED=0
        return 0
    fi
    printf '%s\n' "$new" >"$CONF"
    chmod 0644 "$CONF"
    CONFIG_CHANGED=1
}

stop_daemon() {
    local pidfile=$1 pid
    running "$pidfile" || return 0
    pid=$(<"$pidfile")
    kill "$pid"
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
}

node_state() {
    sinfo --noheader --nodes="$(hostname -s)" --format=%t 2>/dev/null | head -n1 | tr -d ' *'
}

main() {
    install_packages
    start_munge
    write_config
    if ((CONFIG_CHANGED)); then
        # a new config: restart whatever runs with the old one
        stop_daemon "$SLURMD_PID"
        stop_daemon "$CTLD_PID"
    fi
    running "$CTLD_PID" || slurmctld
    running "$SLURMD_PID" || slurmd
    local state="" deadline=$((SECONDS + WAIT_S))
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case "$state" in
            idle | mix | alloc) say "node $(hostname -s) is $state"; return 0 ;;
            down | drain | drng | fail)
                # ReturnToService=2 brings a registered node back; nudge one left down
                scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    say "node not idle after ${WAIT_S}s (state '${state}'); logs: $LOG_DIR/slurmctld.log, $LOG_DIR/slurmd.log"
    exit 1
}

main "$@"
