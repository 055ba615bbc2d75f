#!/usr/bin/env bash
# Shared settings and helpers for start.sh, stop.sh and run.sh (sourced, never run on its own).
# Everything the local cluster creates lives under $SLURM_LOCAL_DIR and in network namespaces named
# $SLURM_LOCAL_PREFIX-*; stop.sh removes exactly those.

# shellcheck disable=SC2034  # variables are used by the scripts that source this file
LC_DIR=${SLURM_LOCAL_DIR:-/var/tmp/slurm-local}
LC_PREFIX=${SLURM_LOCAL_PREFIX:-slurmlc}
LC_NODES=${SLURM_LOCAL_NODES:-2}
LC_GPUS=${SLURM_LOCAL_GPUS:-8}
# CPUs per node: the cores this machine really has (every node shares them), so that task/affinity binds
# each task to cores that exist and a job's ranks see exactly the cores they asked for. Not plain `nproc`: it
# honours OMP_NUM_THREADS, which test runs set to 1, and a 1-CPU node cannot take a 2-core job.
LC_CPUS=${SLURM_LOCAL_CPUS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
LC_SHARE=${SLURM_LOCAL_SHARE:-8}           # jobs that may share one core (OverSubscribe=FORCE:N)
LC_MEM_MB=${SLURM_LOCAL_MEM_MB:-512000}
# A /24 that exists only inside the namespaces start.sh creates (hub = .1, node nK = .(10+K)).
LC_NET=${SLURM_LOCAL_NET:-10.77.0}
LC_HUB=$LC_PREFIX-hub
LC_CONF=$LC_DIR/etc/slurm.conf
LC_HOSTS=$LC_DIR/etc/hosts
LC_CLIENT_TIMEOUT=${SLURM_LOCAL_CLIENT_TIMEOUT:-20}
LC_LOCK=$LC_DIR.lock                       # outside LC_DIR: start.sh wipes LC_DIR

# One start/stop at a time (several test sessions may share the cluster). start.sh calls stop.sh while
# holding the lock and sets LC_LOCKED so that stop.sh does not wait for itself.
lc_lock() {
  [ "${LC_LOCKED:-0}" = 1 ] && return 0
  exec 9>"$LC_LOCK"
  flock -w 300 9 || lc_die "another start.sh/stop.sh held $LC_LOCK for 300 s"
  export LC_LOCKED=1
}

# Leases: a process using the cluster (a test session) registers its PID with `start.sh --lease PID` and
# gives it back with `stop.sh --release PID`; a cluster started with a lease stops when the last one is
# given back. A cluster started without one (by hand) is never stopped by a release.
lc_live_leases() {
  local f pid
  for f in "$LC_DIR"/leases/*; do
    [ -e "$f" ] || continue
    pid=${f##*/}
    if [ -d "/proc/$pid" ]; then echo "$pid"; else rm -f "$f"; fi
  done
}

lc_die() { echo "local_cluster: $*" >&2; exit 1; }
lc_log() { echo "local_cluster: $*" >&2; }

# Run a command inside namespace $1 with the cluster's /etc/hosts (and /etc/slurm) bound in a private
# mount namespace. nsenter+unshare, not `ip netns exec`: that remounts /sys, which breaks slurmd.
# usage: lc_in_ns NETNS HOSTNAME|- CMD...
lc_in_ns() {
  local ns=$1 host=$2
  shift 2
  local uts=()
  [ "$host" != - ] && uts=(--uts)
  # shellcheck disable=SC2016  # the inner script expands its own positional arguments
  exec nsenter --net="/run/netns/$ns" unshare "${uts[@]}" --mount -- bash -c '
    set -euo pipefail
    host=$1 hosts=$2 etc=$3; shift 3
    [ "$host" != - ] && hostname "$host"
    mount --bind "$hosts" /etc/hosts
    [ -d /etc/slurm ] && mount --bind "$etc" /etc/slurm
    exec "$@"' lc_in_ns "$host" "$LC_HOSTS" "$LC_DIR/etc" "$@"
}

# lc_daemon NAME COMM NETNS HOSTNAME CMD...: start in the background, record "PID COMM" for stop.sh.
lc_daemon() {
  local name=$1 comm=$2 ns=$3 host=$4
  shift 4
  # 9>&-: the daemons must not inherit the start/stop lock (see lc_lock)
  lc_in_ns "$ns" "$host" "$@" </dev/null >>"$LC_DIR/log/$name.out" 2>&1 9>&- &
  echo "$! $comm" >"$LC_DIR/run/$name.pid"
}

# lc_start_slurmd nK: node nK's slurmd, in the node's own namespace (start.sh, and node.sh boot).
lc_start_slurmd() {
  lc_daemon "slurmd-$1" slurmd "$LC_PREFIX-$1" "$1" slurmd -D -N "$1" -f "$LC_CONF"
}

# A client command (sinfo, sbatch, ...) in the hub namespace, never blocking longer than the timeout.
lc_client() {
  SLURM_CONF=$LC_CONF timeout "$LC_CLIENT_TIMEOUT" nsenter --net="/run/netns/$LC_HUB" -- "$@"
}

# PID files: $LC_DIR/run/NAME.pid holds "PID COMM"; a process counts as ours only if /proc/PID/comm matches.
lc_pid_alive() {
  local file=$1 pid comm
  [ -f "$file" ] || return 1
  read -r pid comm <"$file" || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

# lc_stop_pids PIDFILE...: SIGTERM every live one at once, wait up to 10 s, SIGKILL what is left.
lc_stop_pids() {
  local file pid comm left
  for file in "$@"; do
    if lc_pid_alive "$file"; then
      read -r pid comm <"$file"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for _ in $(seq 100); do
    left=0
    for file in "$@"; do lc_pid_alive "$file" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for file in "$@"; do
    if lc_pid_alive "$file"; then
      read -r pid comm <"$file"
      lc_log "$comm ($pid) ignored SIGTERM for 10 s, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
  done
}
