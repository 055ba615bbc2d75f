#!/usr/bin/env bash
# Run a command inside the local cluster's hub namespace, where the controller is reachable:
#   slurm_templates/local_cluster/run.sh sbatch --parsable job.sbatch
#   slurm_templates/local_cluster/run.sh bash        (an interactive shell; `exit` to leave)
# SLURM_CONF points at the cluster's slurm.conf and the hostnames n1..nN resolve.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=SCRIPTDIR/common.sh
. "$here/common.sh"

[ $# -gt 0 ] || lc_die "usage: run.sh COMMAND [ARGS...]"
if [ ! -e "/run/netns/$LC_HUB" ] || [ ! -f "$LC_CONF" ]; then
  lc_die "the local cluster is not running: start it with $here/start.sh"
fi
export SLURM_CONF=$LC_CONF
lc_in_ns "$LC_HUB" - "$@"
