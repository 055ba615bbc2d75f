#!/usr/bin/env bash
# Stop the local Slurm cluster started by start.sh: exactly what it started, nothing else.
# Order: jobs (cancelled through the controller), slurmds (while the controller is still up),
# slurmctld, munged; then any process left inside the cluster's namespaces; then the namespaces.
# Processes are found by PID file and checked against /proc/PID/comm, never by name.
#
# usage: slurm_templates/local_cluster/stop.sh [--quiet] [--purge] [--force] [--release PID]
#   --purge: also delete $SLURM_LOCAL_DIR
#   --force: stop even while test sessions hold leases (their jobs are cancelled)
#   --release PID: give back PID's lease (start.sh --lease); stop only if the cluster was started with a
#                  lease and no other live lease remains
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

quiet=0 purge=0 force=0 release=
while [ $# -gt 0 ]; do
  case $1 in
    --quiet) quiet=1 ;;
    --purge) purge=1 ;;
    --force) force=1 ;;
    --release) release=${2:?--release needs a PID}; shift ;;
    *) lc_die "unknown argument: $1 (usage: stop.sh [--quiet] [--purge] [--force] [--release PID])" ;;
  esac
  shift
done
say() { [ "$quiet" = 1 ] || lc_log "$@"; }

[ "$(id -u)" -eq 0 ] || lc_die "needs root"
[ -d "$LC_DIR" ] || { say "nothing to stop ($LC_DIR does not exist)"; exit 0; }
lc_lock
if [ -n "$release" ]; then
  rm -f "$LC_DIR/leases/$release"
  [ -f "$LC_DIR/leased" ] || { say "started by hand, left running"; exit 0; }
  others=$(lc_live_leases | tr '\n' ' ')
  [ -z "$others" ] || { say "still used by PID(s) $others, left running"; exit 0; }
elif [ "$force" = 0 ] && [ -n "$(lc_live_leases)" ]; then
  lc_die "in use by test session(s) PID $(lc_live_leases | tr '\n' ' ')(leases in $LC_DIR/leases); stop.sh --force stops anyway"
fi

if lc_pid_alive "$LC_DIR/run/slurmctld.pid" && [ -e "/run/netns/$LC_HUB" ]; then
  jobs=$(LC_CLIENT_TIMEOUT=5 lc_client squeue -h -o %A 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
    # shellcheck disable=SC2086  # one job id per word
    LC_CLIENT_TIMEOUT=5 lc_client scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(LC_CLIENT_TIMEOUT=5 lc_client squeue -h -o %A 2>/dev/null || true)" ] && break
      sleep 0.1
    done
  fi
fi

slurmds=()
for pidfile in "$LC_DIR"/run/slurmd-*.pid; do
  case $pidfile in *.self.pid) continue ;; esac
  [ -e "$pidfile" ] && slurmds+=("$pidfile")
done
[ ${#slurmds[@]} -eq 0 ] || lc_stop_pids "${slurmds[@]}"
lc_stop_pids "$LC_DIR/run/slurmctld.pid"
lc_stop_pids "$LC_DIR/run/munged.pid"

# Job processes (slurmstepd and its children) outlive slurmd; they live in our namespaces only.
if [ -f "$LC_DIR/netns" ]; then
  while read -r ns; do
    [ -e "/run/netns/$ns" ] || continue
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    if [ -n "$pids" ]; then
      say "ending processes left in $ns: $(echo "$pids" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      kill -TERM $pids 2>/dev/null || true
      for _ in $(seq 30); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -z "$pids" ] && break
        sleep 0.1
      done
      # shellcheck disable=SC2086
      [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    fi
    ip netns del "$ns"
  done <"$LC_DIR/netns"
  rm -f "$LC_DIR/netns"
fi
[ "$purge" = 1 ] && rm -rf "$LC_DIR"
say "stopped"
