#!/usr/bin/env bash
# A real, local SLURM cluster on this one machine, for tests and for trying the slurm/ templates.
#
#   sudo tools/slurm_cluster.sh install                 # Debian's slurmctld/slurmd/slurm-client
#   sudo tools/slurm_cluster.sh start --nodes 2         # slurmctld + 2 slurmd ("node1", "node2")
#   export SLURM_CONF=/tmp/bigllm-slurm/slurm.conf      # printed by start/status
#   sbatch --wait ...; sinfo; squeue
#   sudo tools/slurm_cluster.sh stop                    # scancel everything, stop daemons by PID
#
# Options: --nodes 1|2 (default 1), --dir DIR (default /tmp/bigllm-slurm), --cpus N per node
# (default 8; more than the machine has is fine thanks to SlurmdParameters=config_overrides).
# Every command is idempotent. Runs as root (SlurmUser=root). No munge: auth/none + cred/none.
# Two "nodes" on one host use slurmd's MULTIPLE_SLURMD mode: one slurmd per NodeName, each on
# its own port; /etc/hosts gets one line "127.0.0.1 node1 node2" so the node names resolve.
# Daemons are stopped by the PIDs in their pid files only (never by process name).
set -euo pipefail

NODES=1
DIR=/tmp/bigllm-slurm
CPUS=8
CTLD_PORT=${BIGLLM_SLURM_PORT:-6917}  # not the default 6817: a system slurmctld may hold that
WAIT_S=30

die() { echo "slurm_cluster.sh: error: $*" >&2; exit 1; }
log() { echo "slurm_cluster.sh: $*" >&2; }

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

parse_args() {
    CMD=${1:-}
    [ -n "$CMD" ] || usage 2
    shift
    while [ $# -gt 0 ]; do
        case $1 in
            --nodes) NODES=${2:?--nodes needs a value}; shift 2 ;;
            --dir) DIR=${2:?--dir needs a value}; shift 2 ;;
            --cpus) CPUS=${2:?--cpus needs a value}; shift 2 ;;
            -h|--help) usage 0 ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
    done
    case $NODES in 1|2) ;; *) die "--nodes must be 1 or 2, got '$NODES'" ;; esac
    [[ $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus must be a positive integer, got '$CPUS'"
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    CONF=$DIR/slurm.conf
}

need_root() {
    [ "$(id -u)" = 0 ] || die "'$CMD' must run as root (the daemons run as SlurmUser=root); use sudo"
}

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null; }

# --- install -----------------------------------------------------------------------------------

install_packages() {
    if have_slurm; then
        log "slurm is already installed ($(sbatch --version 2>/dev/null || echo '?'))"
        return
    fi
    need_root
    command -v apt-get >/dev/null || die "slurm is not installed and apt-get is missing; install slurmctld, slurmd and slurm-client (Slurm 22.05+) with the system's package manager"
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        # Keep the packages from starting system-wide daemons; ours run from $DIR.
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client >&2 || {
        log "install failed; running apt-get update and retrying"
        apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends slurmctld slurmd slurm-client >&2
    } || rc=$?
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    [ "$rc" = 0 ] || die "apt-get install slurmctld slurmd slurm-client failed (exit $rc)"
    have_slurm || die "packages installed but slurmctld/slurmd/sbatch are not on PATH"
}

# --- configuration -----------------------------------------------------------------------------

node_names() { seq -f 'node%g' 1 "$NODES"; }

write_conf() {
    # Written to a temp file first; `start` compares it with the running config.
    local out=$1 host
    host=$(hostname -s)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    {
        echo "# Written by tools/slurm_cluster.sh: a local test cluster ($NODES node(s)) under $DIR"
        echo "ClusterName=bigllm"
        echo "SlurmctldHost=localhost"
        echo "SlurmctldPort=$CTLD_PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/none"
        echo "CredType=cred/none"
        echo "StateSaveLocation=$DIR/state"
        echo "SlurmdSpoolDir=$DIR/spool/%n"
        echo "SlurmctldPidFile=$DIR/run/slurmctld.pid"
        echo "SlurmdPidFile=$DIR/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$DIR/log/slurmctld.log"
        echo "SlurmdLogFile=$DIR/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SwitchType=switch/none"
        echo "MpiDefault=none"
        echo "MailProg=/bin/true"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "MinJobAge=4"
        echo "KillWait=5"
        local i=0 name
        for name in $(node_names); do
            echo "NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 1 + i)) CPUs=$CPUS State=UNKNOWN"
            i=$((i + 1))
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$out"
}

ensure_hosts() {
    # The node names must resolve (tasks use the first one as MASTER_ADDR).
    local missing=0 name
    for name in node1 node2; do getent hosts "$name" >/dev/null || missing=1; done
    [ "$missing" = 0 ] && return
    grep -q '^127\.0\.0\.1 node1 node2 *# bigllm-slurm' /etc/hosts 2>/dev/null ||
        echo "127.0.0.1 node1 node2  # bigllm-slurm test cluster" >>/etc/hosts
}

# --- processes ---------------------------------------------------------------------------------

# The PID in $1 if that process is alive and is the daemon named $2 started with our config.
live_pid() {
    local file=$1 daemon=$2 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$daemon.*$CONF" || return 1
    echo "$pid"
}

ctld_pid() { live_pid "$DIR/run/slurmctld.pid" slurmctld; }
slurmd_pid() { live_pid "$DIR/run/slurmd-$1.pid" slurmd; }

clients() { SLURM_CONF=$CONF "$@"; }

wait_idle() {
    local deadline=$((SECONDS + WAIT_S)) states
    while [ $SECONDS -lt $deadline ]; do
        states=$(clients sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)
        if [ "$(grep -c -E ' (idle|mixed|allocated)$' <<<"$states")" = "$NODES" ]; then
            return 0
        fi
        sleep 0.5
    done
    die "nodes not idle after ${WAIT_S}s (sinfo: $(tr '\n' ';' <<<"$states")); see $DIR/log/"
}

start_daemons() {
    if ! ctld_pid >/dev/null; then
        rm -f "$DIR/run/slurmctld.pid"
        slurmctld -c -f "$CONF" || die "slurmctld failed to start; see $DIR/log/slurmctld.log"
    fi
    local name
    for name in $(node_names); do
        mkdir -p "$DIR/spool/$name"
        if ! slurmd_pid "$name" >/dev/null; then
            slurmd -f "$CONF" -N "$name" || die "slurmd -N $name failed; see $DIR/log/slurmd-$name.log"
        fi
    done
}

cmd_start() {
    need_root
    have_slurm || die "slurm is not installed; run: $0 install"
    ensure_hosts
    local new=$DIR/slurm.conf.new
    write_conf "$new"
    if ctld_pid >/dev/null && ! cmp -s "$new" "$CONF"; then
        log "configuration changed (e.g. --nodes); restarting"
        cmd_stop
    fi
    mv "$new" "$CONF"
    start_daemons
    wait_idle
    clients sinfo >&2
    echo "export SLURM_CONF=$CONF"
}

cancel_jobs() {
    ctld_pid >/dev/null || return 0
    local ids deadline=$((SECONDS + 20))
    ids=$(clients squeue -h -o %i 2>/dev/null || true)
    [ -n "$ids" ] || return 0
    # shellcheck disable=SC2086
    clients scancel $ids 2>/dev/null || true
    while [ $SECONDS -lt $deadline ] && [ -n "$(clients squeue -h -t R,CG -o %i 2>/dev/null)" ]; do
        sleep 0.5
    done
}

stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        [ -d "/proc/$pid" ] || return 0
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    [ -f "$CONF" ] || { log "no cluster configured under $DIR"; return 0; }
    cancel_jobs
    local file name pid
    for file in "$DIR"/run/slurmd-*.pid; do
        [ -e "$file" ] || continue
        name=${file##*/slurmd-}; name=${name%.pid}
        if pid=$(slurmd_pid "$name"); then stop_pid "$pid"; fi
        rm -f "$file"
    done
    if pid=$(ctld_pid); then stop_pid "$pid"; fi
    rm -f "$DIR/run/slurmctld.pid"
    log "stopped the cluster under $DIR"
}

cmd_status() {
    [ -f "$CONF" ] || { echo "not configured under $DIR"; return 1; }
    local rc=0 file
    if pid=$(ctld_pid); then echo "slurmctld: running (pid $pid)"; else echo "slurmctld: stopped"; rc=1; fi
    for file in "$DIR"/run/slurmd-*.pid; do
        [ -e "$file" ] || continue
        name=${file##*/slurmd-}; name=${name%.pid}
        if pid=$(slurmd_pid "$name"); then echo "slurmd $name: running (pid $pid)"; else echo "slurmd $name: stopped"; rc=1; fi
    done
    [ $rc = 0 ] && clients sinfo
    echo "export SLURM_CONF=$CONF"
    return $rc
}

main() {
    parse_args "$@"
    exec 9>"$DIR/.lock"
    flock -w 120 9 || die "another slurm_cluster.sh holds $DIR/.lock"
    case $CMD in
        install) install_packages ;;
        start) cmd_start ;;
        stop) cmd_stop ;;
        restart) cmd_stop; cmd_start ;;
        status) cmd_status ;;
        *) die "unknown command '$CMD'; use install, start, stop or status" ;;
    esac
}

main "$@"
