#!/usr/bin/env bash
# Start a local Slurm cluster on this machine: one controller and N compute nodes (n1..nN), each node
# a slurmd in its own network + UTS namespace with its own hostname and address, 8 fake GPUs per node.
# Production sbatch templates run on it unmodified. Needs root on Linux (Debian/Ubuntu: installs
# slurmctld, slurmd and slurm-client with apt-get if they are missing).
#
# usage: slurm_templates/local_cluster/start.sh [--lease PID]   (idempotent: a running cluster is left alone)
#        --lease PID: PID uses the cluster; `stop.sh --release PID` gives it back (see common.sh)
# env:   SLURM_LOCAL_NODES=2 SLURM_LOCAL_GPUS=8 SLURM_LOCAL_CPUS=$(nproc) SLURM_LOCAL_SHARE=8
#        SLURM_LOCAL_DIR=/var/tmp/slurm-local SLURM_LOCAL_NET=10.77.0 SLURM_LOCAL_PREFIX=slurmlc
# then:  slurm_templates/local_cluster/run.sh sbatch ...   (runs any Slurm command inside the cluster)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

lease=
case ${1:-} in
  --lease) lease=${2:?--lease needs a PID} ;;
  "") ;;
  *) lc_die "usage: start.sh [--lease PID]" ;;
esac
[ "$(uname -s)" = Linux ] || lc_die "needs Linux (network namespaces)"
[ "$(id -u)" -eq 0 ] || lc_die "needs root (network namespaces, mknod, daemons); try: sudo $0"
# Packages to install (apt-get) when something is missing: Slurm itself, and iproute2 for `ip`.
need=()
for tool in slurmctld slurmd sbatch munged; do
  command -v "$tool" >/dev/null || { need=(slurmctld slurmd slurm-client munge); break; }
done
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || lc_die "missing ${need[*]} and apt-get is not available to install them"
  lc_log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
fi
for tool in ip nsenter unshare setpriv mknod timeout flock slurmctld slurmd sbatch munged; do
  command -v "$tool" >/dev/null || lc_die "missing '$tool' (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client iproute2 util-linux coreutils)"
done

usage() {
  local d
  d=$(realpath --relative-to="$PWD" "$here" 2>/dev/null || echo "$here")
  cat <<USAGE
local_cluster: $LC_NODES nodes up (n1..n$LC_NODES, $LC_GPUS fake GPUs each), state and logs in $LC_DIR
  $d/run.sh sinfo -N                  # any Slurm command, run inside the cluster's namespace
  $d/run.sh sbatch $d/selftest.sbatch
  $d/run.sh squeue
  $d/run.sh bash                      # a shell with the cluster's commands (SLURM_CONF set)
  $d/stop.sh                          # stop everything start.sh started
USAGE
}

# count_nodes REGEX: how many nodes sinfo reports in a state matching REGEX (fails if sinfo does).
count_nodes() {
  local states
  states=$(lc_client sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
  grep -cE " ($1)\$" <<<"$states" || true
}
all_idle() { [ "$(count_nodes idle)" = "$LC_NODES" ]; }
# Up = responding and usable; running jobs are fine (another session may be using the cluster).
all_up() { [ "$(count_nodes 'idle|mixed|allocated|completing')" = "$LC_NODES" ]; }

running() {
  local i
  lc_pid_alive "$LC_DIR/run/munged.pid" && lc_pid_alive "$LC_DIR/run/slurmctld.pid" || return 1
  for i in $(seq "$LC_NODES"); do lc_pid_alive "$LC_DIR/run/slurmd-n$i.pid" || return 1; done
  [ -f "$LC_DIR/nodes" ] && [ "$(cat "$LC_DIR/nodes")" = "$LC_NODES" ]
}

lc_lock
if running && all_up; then
  if [ -n "$lease" ]; then mkdir -p "$LC_DIR/leases" && : >"$LC_DIR/leases/$lease"; fi
  lc_log "already running"
  usage
  exit 0
fi

start_ns=$(date +%s%N)
# Leftovers of an earlier run (crashed daemon, other node count): stop them, then start from nothing.
# The state directory is wiped so that e.g. a DRAIN reason from an earlier run cannot survive.
"$here/stop.sh" --quiet --force
rm -rf "$LC_DIR"
mkdir -p "$LC_DIR"/{etc,run,log,state,spool,dev,munge,leases}
chmod 0755 "$LC_DIR" "$LC_DIR/munge"
echo "$LC_NODES" >"$LC_DIR/nodes"

# --- network: a bridge in the hub namespace, one veth per node namespace ------------------------------
: >"$LC_DIR/netns"
add_ns() { ip netns add "$1"; echo "$1" >>"$LC_DIR/netns"; ip -n "$1" link set lo up; }
add_ns "$LC_HUB"
ip -n "$LC_HUB" link add br0 type bridge
ip -n "$LC_HUB" addr add "$LC_NET.1/24" dev br0
ip -n "$LC_HUB" link set br0 up
{
  echo "127.0.0.1 localhost"
  echo "$LC_NET.1 hub"
} >"$LC_HOSTS"
for i in $(seq "$LC_NODES"); do
  ns=$LC_PREFIX-n$i
  add_ns "$ns"
  ip -n "$LC_HUB" link add "veth-n$i" type veth peer name eth0 netns "$ns"
  ip -n "$LC_HUB" link set "veth-n$i" master br0 up
  ip -n "$ns" addr add "$LC_NET.$((10 + i))/24" dev eth0
  ip -n "$ns" link set eth0 up
  echo "$LC_NET.$((10 + i)) n$i" >>"$LC_HOSTS"
done

# --- fake GPUs: character devices with /dev/null's numbers, declared in gres.conf ----------------------
for g in $(seq 0 $((LC_GPUS - 1))); do mknod "$LC_DIR/dev/nvidia$g" c 1 3; done

# --- configuration -------------------------------------------------------------------------------------
: >"$LC_DIR/etc/plugstack.conf"
cat >"$LC_DIR/etc/gres.conf" <<CONF
AutoDetect=off
NodeName=n[1-$LC_NODES] Name=gpu File=$LC_DIR/dev/nvidia[0-$((LC_GPUS - 1))]
CONF
cat >"$LC_DIR/etc/slurm.conf" <<CONF
# Written by slurm_templates/local_cluster/start.sh -- a single-host emulation, see README.md.
ClusterName=local
SlurmctldHost=hub($LC_NET.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$LC_DIR/munge/munge.socket
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$LC_DIR/state
SlurmdSpoolDir=$LC_DIR/spool/%n
SlurmctldPidFile=$LC_DIR/run/slurmctld.self.pid
SlurmdPidFile=$LC_DIR/run/slurmd-%n.self.pid
SlurmctldLogFile=$LC_DIR/log/slurmctld.log
SlurmdLogFile=$LC_DIR/log/slurmd-%n.log
PlugStackConfig=$LC_DIR/etc/plugstack.conf
# No cgroups here (no delegation in these namespaces): track processes through /proc. Tasks are bound to
# cores with sched_setaffinity (task/affinity), by default to the cores of their own --cpus-per-task
# (TaskPluginParam=Cores, the usual site default), as on a production cluster: a step that asks for fewer
# cores than the job has (srun without SRUN_CPUS_PER_TASK, Slurm >= 22.05) really runs on fewer cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# A permanent record of every job's final state and exit code without slurmdbd.
JobCompType=jobcomp/filetxt
JobCompLoc=$LC_DIR/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
# Nodes declare this machine's real cores (binding needs cores that exist) but more memory than it has;
# config_overrides makes slurmd take the declared values instead of refusing the node.
SlurmdParameters=config_overrides
# Reject impossible jobs at submission instead of letting them pend forever.
EnforcePartLimits=ALL
MailProg=/bin/true
MinJobAge=86400
ReturnToService=2
SchedulerType=sched/backfill
KillWait=5
MessageTimeout=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
MpiDefault=none
NodeName=DEFAULT CPUs=$LC_CPUS Sockets=1 CoresPerSocket=$LC_CPUS ThreadsPerCore=1 RealMemory=$LC_MEM_MB Gres=gpu:$LC_GPUS State=UNKNOWN
CONF
for i in $(seq "$LC_NODES"); do
  echo "NodeName=n$i NodeAddr=$LC_NET.$((10 + i)) NodeHostname=n$i" >>"$LC_DIR/etc/slurm.conf"
done
# Every node has only this machine's few cores: up to LC_SHARE jobs share each one (a job still gets, and is
# bound to, the number of cores it asked for), so concurrent test sessions do not queue behind each other.
echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$LC_SHARE" >>"$LC_DIR/etc/slurm.conf"

# --- munge: a private daemon with its own key and socket -------------------------------------------------
dd if=/dev/urandom of="$LC_DIR/munge/munge.key" bs=1024 count=1 status=none
chown -R munge:munge "$LC_DIR/munge"
chmod 0400 "$LC_DIR/munge/munge.key"

lc_daemon munged munged "$LC_HUB" - setpriv --reuid=munge --regid=munge --init-groups munged --foreground \
  --socket="$LC_DIR/munge/munge.socket" --key-file="$LC_DIR/munge/munge.key" \
  --pid-file="$LC_DIR/munge/munged.pid" --log-file="$LC_DIR/munge/munged.log" \
  --seed-file="$LC_DIR/munge/munged.seed"
for _ in $(seq 100); do [ -S "$LC_DIR/munge/munge.socket" ] && break; sleep 0.05; done
[ -S "$LC_DIR/munge/munge.socket" ] || { tail "$LC_DIR/log/munged.out" "$LC_DIR/munge/munged.log" >&2 || true; lc_die "munged did not start"; }

lc_daemon slurmctld slurmctld "$LC_HUB" hub slurmctld -D -f "$LC_CONF"
for i in $(seq "$LC_NODES"); do lc_start_slurmd "n$i"; done

for _ in $(seq 150); do
  all_idle && break
  sleep 0.2
done
if ! all_idle; then
  lc_log "nodes did not become idle within 30 s; sinfo says:"
  lc_client sinfo -N -o '%N %T %E' >&2 || true
  for f in "$LC_DIR"/log/*; do echo "--- $f" >&2; tail -n 15 "$f" >&2; done
  exit 1
fi
if [ -n "$lease" ]; then : >"$LC_DIR/leased" && : >"$LC_DIR/leases/$lease"; fi
lc_log "started in $((($(date +%s%N) - start_ns) / 1000000)) ms"
usage
