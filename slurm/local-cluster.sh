#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying launches locally and for CI.
#
# Needs the Debian/Ubuntu packages `slurm-wlm` and `munge` (this script installs nothing):
#     apt-get update && apt-get install -y slurm-wlm munge
# Run it as root (slurmd launches the job steps):
#     bash slurm/local-cluster.sh start  [STATE_DIR]   # default STATE_DIR: /tmp/avflow-slurm
#     bash slurm/local-cluster.sh status [STATE_DIR]
#     bash slurm/local-cluster.sh stop   [STATE_DIR]   # cancels every job, then stops the daemons
# then point the SLURM commands (and submitit) at it:
#     export SLURM_CONF=STATE_DIR/slurm.conf
#
# Everything the cluster writes (config, munge key and socket, controller state, spool, logs, pid files)
# lives in STATE_DIR, and munged runs on its own socket there, so a system munge is left alone; a system
# SLURM must not be running, as the daemons use SLURM's default ports 6817 and 6818.
# No cgroups and no systemd: processes are tracked through /proc and the daemons are started by hand.
# `start` is idempotent: daemons that already run are kept, and it returns once the node is idle.
# Environment: AVFLOW_SLURM_START_TIMEOUT (seconds to wait for the idle node, default 60).
set -euo pipefail

# Debian puts the daemons in /usr/sbin, which a non-login root shell may not have on its PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

command_name="${1:-}"
state_dir="$(realpath -m "${2:-/tmp/avflow-slurm}")"
start_timeout="${AVFLOW_SLURM_START_TIMEOUT:-60}"
node="$(hostname -s)"
conf="$state_dir/slurm.conf"
munge_dir="$state_dir/munge"
log_dir="$state_dir/log"
export SLURM_CONF="$conf"

die() {
    echo "local-cluster: error: $*" >&2
    exit 1
}

require_tools() {
    local missing=()
    for tool in munged slurmctld slurmd sinfo scontrol scancel squeue; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [[ ${#missing[@]} -eq 0 ]] || die "missing ${missing[*]}; install them with: apt-get install -y slurm-wlm munge"
    [[ $(id -u) -eq 0 ]] || die "run as root: slurmd must be able to start job steps"
}

# Prints the pid recorded in a pid file when that process is alive.
live_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(<"$1")"
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_config() {
    local cpus memory_mb
    cpus="$(nproc)"
    # slurmd drains a node whose RealMemory exceeds what it finds; stay below what is free now.
    memory_mb="$(awk '/^MemAvailable:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    mkdir -p "$state_dir/state" "$state_dir/spool" "$log_dir"
    cat >"$conf" <<EOF
# Written by slurm/local-cluster.sh: a one-node cluster on $node, state under $state_dir.
ClusterName=avflow
# Addresses are loopback so the cluster works whatever the host name resolves to.
SlurmctldHost=$node(127.0.0.1)
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$munge_dir/munge.socket,cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the CPU count above instead of draining a node whose detected topology differs (containers).
SlurmdParameters=config_overrides
JobRequeue=1
# Look for startable jobs every few seconds, not every minute, so requeued jobs restart quickly.
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# No mail on a local cluster; an unset MailProg is logged as an error.
MailProg=/bin/true
# Short waits between SIGTERM and SIGKILL keep cancelled and requeued test jobs quick.
KillWait=5
StateSaveLocation=$state_dir/state
SlurmdSpoolDir=$state_dir/spool
SlurmctldPidFile=$state_dir/slurmctld.pid
SlurmdPidFile=$state_dir/slurmd.pid
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
}

start_munged() {
    if live_pid "$munge_dir/munged.pid" >/dev/null; then
        return
    fi
    rm -f "$munge_dir/munged.pid"
    # munged refuses key and socket folders that others can write to.
    mkdir -p "$munge_dir"
    chmod 755 "$munge_dir"
    if [[ ! -s "$munge_dir/munge.key" ]]; then
        (umask 077 && head -c 1024 /dev/urandom >"$munge_dir/munge.key")
    fi
    # --force: munged warns about running as root and about a leftover socket from a killed run.
    munged --force --socket="$munge_dir/munge.socket" --key-file="$munge_dir/munge.key" \
        --pid-file="$munge_dir/munged.pid" --log-file="$log_dir/munged.log" --seed-file="$munge_dir/munged.seed"
}

start_daemon() {
    local daemon="$1" pid_file="$2"
    if live_pid "$pid_file" >/dev/null; then
        return
    fi
    rm -f "$pid_file"  # a stale pid would read as a daemon that died
    "$daemon" -f "$conf" || fail_start "$daemon did not start"
}

print_logs() {
    for log in "$log_dir"/munged.log "$log_dir"/slurmctld.log "$log_dir"/slurmd.log; do
        echo "---- last lines of $log" >&2
        tail -n 20 "$log" >&2 2>/dev/null || echo "(missing)" >&2
    done
}

fail_start() {
    echo "local-cluster: error: $*" >&2
    print_logs
    exit 1
}

wait_for_idle_node() {
    local deadline=$((SECONDS + start_timeout)) node_state="" resumed=""
    while ((SECONDS < deadline)); do
        for pid_file in "$munge_dir/munged.pid" "$state_dir/slurmctld.pid" "$state_dir/slurmd.pid"; do
            if [[ -s "$pid_file" ]] && ! live_pid "$pid_file" >/dev/null; then
                fail_start "$(basename "$pid_file" .pid) exited; its log below says why"
            fi
        done
        node_state="$(sinfo -h -n "$node" -o %T 2>/dev/null || true)"
        case "$node_state" in
            idle | mixed | allocated) return ;;
            drained | draining | invalid*)
                # A drain from an earlier session (a job that would not die) is kept in the saved state;
                # clear it once, and give up if the node drains again.
                [[ -z "$resumed" ]] ||
                    fail_start "node $node is $node_state: $(sinfo -h -R -n "$node" -o %E 2>/dev/null)"
                scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
                resumed=yes ;;
        esac
        sleep 1
    done
    fail_start "node $node not idle after ${start_timeout}s (state: ${node_state:-no answer from slurmctld});" \
        "raise AVFLOW_SLURM_START_TIMEOUT or read the logs below"
}

cluster_running() {
    live_pid "$munge_dir/munged.pid" >/dev/null || live_pid "$state_dir/slurmctld.pid" >/dev/null \
        || live_pid "$state_dir/slurmd.pid" >/dev/null
}

start() {
    require_tools
    # Rewriting the config under running daemons would make them disagree; keep it while they run.
    cluster_running && [[ -s "$conf" ]] || write_config
    mkdir -p "$log_dir"
    start_munged || fail_start "munged did not start"
    start_daemon slurmctld "$state_dir/slurmctld.pid"
    start_daemon slurmd "$state_dir/slurmd.pid"
    wait_for_idle_node
    echo "local SLURM cluster 'avflow' is up: node $node, partition debug, state in $state_dir"
    echo "export SLURM_CONF=$conf"
}

stop_pid_file() {
    local name="$1" pid_file="$2" pid
    pid="$(live_pid "$pid_file")" || return 0
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { echo "stopped $name ($pid)"; return; }
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
    echo "killed $name ($pid) after 10 s"
}

stop() {
    if live_pid "$state_dir/slurmctld.pid" >/dev/null; then
        # Jobs left behind would keep their processes running without a controller.
        scancel --quiet $(squeue -h -o %i) 2>/dev/null || true
        for _ in $(seq 30); do
            [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
            sleep 1
        done
    fi
    stop_pid_file slurmd "$state_dir/slurmd.pid"
    stop_pid_file slurmctld "$state_dir/slurmctld.pid"
    stop_pid_file munged "$munge_dir/munged.pid"
}

status() {
    local pid
    for entry in "munged:$munge_dir/munged.pid" "slurmctld:$state_dir/slurmctld.pid" "slurmd:$state_dir/slurmd.pid"; do
        if pid="$(live_pid "${entry#*:}")"; then
            echo "${entry%%:*}: running ($pid)"
        else
            echo "${entry%%:*}: not running"
        fi
    done
    if live_pid "$state_dir/slurmctld.pid" >/dev/null; then
        sinfo
        echo "export SLURM_CONF=$conf"
    fi
}

case "$command_name" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start|stop|status [STATE_DIR]  (default STATE_DIR /tmp/avflow-slurm)" ;;
esac
