#!/usr/bin/env bash
# Lose a node of the local cluster, and bring it back -- what a power cut, a kernel panic or a dead GPU
# board does to a running job on a real cluster:
#   slurm_templates/local_cluster/node.sh fail n2   # SIGKILL every process of node n2: its slurmd, the job
#                                                   # steps and ranks on it. Nothing is told: the controller
#                                                   # finds out when n2 stops answering (SlurmdTimeout)
#   slurm_templates/local_cluster/node.sh boot n2   # n2's slurmd starts again; a node that was DOWN for not
#                                                   # responding returns to service (ReturnToService=2)
# Jobs on the lost node end (NODE_FAIL), or are requeued when they allow it (--requeue): see
# slurm_templates/README.md, "A node died mid-job".
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

usage="usage: node.sh fail|boot nK"
[ $# -eq 2 ] || lc_die "$usage"
action=$1 node=$2
if ! [[ $node =~ ^n[0-9]+$ ]] || [ ! -e "/run/netns/$LC_PREFIX-$node" ]; then lc_die "no node $node in the running local cluster"; fi
[ "$(id -u)" -eq 0 ] || lc_die "needs root"

case $action in
  fail)
    # Everything that lives in the node's network namespace is the node: slurmd, slurmstepd, the ranks.
    pids=$(ip netns pids "$LC_PREFIX-$node")
    # shellcheck disable=SC2086  # one PID per word
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(ip netns pids "$LC_PREFIX-$node")" ] && break
      sleep 0.1
    done
    rm -f "$LC_DIR/run/slurmd-$node.pid"
    lc_log "$node lost: killed $(echo "$pids" | wc -w) processes"
    ;;
  boot)
    lc_pid_alive "$LC_DIR/run/slurmd-$node.pid" && lc_die "$node is up already"
    lc_start_slurmd "$node"
    lc_log "$node booting (slurmd started)"
    ;;
  *) lc_die "$usage" ;;
esac
