#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on this machine (munged + slurmctld + slurmd), for the
# integration test tests/test_slurm.py and for trying launch/slurm/recon3d.sbatch by hand.
#
#   bash scripts/slurm_localhost.sh start DIR   # write DIR/slurm.conf, start the daemons, wait until
#                                               # the node is idle; prints the line to source:
#                                               #   export SLURM_CONF=DIR/slurm.conf
#   bash scripts/slurm_localhost.sh stop DIR    # cancel its jobs, then stop exactly the daemons
#                                               # started in DIR (by their PID files)
#
# Everything lives in DIR (config, munge key and socket, state, spool, logs, PID files) and the
# ports are picked free, so the machine's own munge or SLURM, if any, is left alone. Needs root
# (slurmd starts job steps as the submitting user) and Debian's `slurm-wlm` and `munge`
# packages: when they are missing and this runs as root with apt-get, it installs them.
# Exit codes: 0 done; 2 bad usage; 77 cannot run here (not root, or no packages and no apt-get:
# the caller skips with the printed reason); 1 a daemon did not come up (see DIR/*.log).
set -euo pipefail

usage() { echo "usage: bash scripts/slurm_localhost.sh start|stop DIR" >&2; exit 2; }
[ "$#" -eq 2 ] || usage
action=$1
dir=$2

cannot() { echo "slurm_localhost: cannot run here: $*" >&2; exit 77; }

cancel_jobs() {
  # Jobs still running would outlive slurmd (their slurmstepd are not its children to stop):
  # cancel them through this cluster's controller and wait until it has none left.
  [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ] || return 0
  export SLURM_CONF="$dir/slurm.conf"
  scontrol ping >/dev/null 2>&1 || return 0
  scancel --quiet --user="$(id -un)" >/dev/null 2>&1 || true   # SIGTERM, then SIGKILL after KillWait
  for _ in $(seq 150); do
    [ -z "$(squeue -h -o %i 2>/dev/null)" ] && return 0
    sleep 0.2
  done
  echo "slurm_localhost: jobs still listed after 30 s: $(squeue -h -o '%i %T' | tr '\n' ' ')" >&2
}

stop_daemons() {
  # Only the PIDs this script wrote into DIR, newest daemon first; nothing matched by name.
  for name in slurmd slurmctld munged; do
    pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 5))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "slurm_localhost: $what did not come up within ${seconds} s; logs in $dir:" >&2
  tail -n 20 "$dir"/*.log >&2 || true
  stop_daemons
  exit 1
}

case "$action" in
  stop) [ -d "$dir" ] || { echo "slurm_localhost: $dir does not exist" >&2; exit 2; }
        cancel_jobs; stop_daemons; exit 0 ;;
  start) ;;
  *) usage ;;
esac

[ "$(id -u)" -eq 0 ] || cannot "needs root (slurmd runs job steps as the submitting user)"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null; then
  command -v apt-get >/dev/null || cannot "slurm-wlm and munge are not installed and there is no apt-get"
  echo "slurm_localhost: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # A fresh container may have no package lists yet; a failed install is a skip, not a failure.
  { apt-get install -y -q --no-install-recommends slurm-wlm munge >"$dir.apt.log" 2>&1 \
    || { apt-get update -q >>"$dir.apt.log" 2>&1 \
         && apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$dir.apt.log" 2>&1; }; } \
    || cannot "apt-get install slurm-wlm munge failed (see $dir.apt.log)"
fi

mkdir -p "$dir"/{state,spool,munge}
dir=$(cd "$dir" && pwd)
chmod 700 "$dir/munge"
host=$(hostname -s)
# The node declares more CPUs and memory than it may have (SlurmdParameters=config_overrides), so
# that several small 2-task test jobs run side by side on a 2-core machine; nothing is bound or
# limited (no cgroups), the jobs simply share the cores.
cpus=${SLURM_LOCALHOST_CPUS:-10}
memory_mb=${SLURM_LOCALHOST_MEMORY_MB:-16000}

# munge: its own key, socket and files in DIR (munged refuses keys readable by others).
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge/munge.key"
munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"
wait_for 10 munged munge --socket="$dir/munge/munge.socket" -n

ctld_port=$(free_port)
slurmd_port=$(free_port)
cat >"$dir/slurm.conf" <<EOF
# written by scripts/slurm_localhost.sh: one node, this machine, everything under $dir
ClusterName=infusionlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# containers have no usable cgroups: track processes by parent PID, bind nothing
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay listed for an hour (the test reads their state and restarts at the end), and
# a killed job's tasks get 10 s between SIGTERM and SIGKILL
MinJobAge=3600
KillWait=10
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
wait_for 30 slurmctld scontrol ping
slurmd -f "$SLURM_CONF"
node_idle() { sinfo -h -n "$host" -o %t | grep -qx "idle"; }
wait_for 60 "slurmd (node $host idle)" node_idle
echo "export SLURM_CONF=$dir/slurm.conf"
