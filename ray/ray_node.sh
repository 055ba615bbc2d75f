#!/bin/bash
# One Ray node of a Slurm job, run by srun on each node (see multinode.sbatch):
#   srun ... ray_node.sh --head --port=GCS_PORT [ray start options]     # the first node
#   srun ... ray_node.sh --address=HEAD_IP:GCS_PORT [ray start options] # every other node
# Starts `ray start --block` in a process group of its own and, when told to stop (SIGUSR2 from the job
# script's teardown, which srun forwards), ends exactly that group: every Ray process of this node for this job
# (GCS, raylet, workers, agents), and nothing of another job or user -- unlike `ray stop`, which kills every Ray
# process of the user on the machine. A SIGTERM (Slurm's, to every process of the step: preemption with
# GraceTime, scancel --signal=TERM) stops nothing: the driver saves first (see below).
# Environment: PYTHON (the interpreter whose environment has ray), RAY_PORT_BASE (first port of this job's
# block of 256, from multinode.sbatch), RAY_NODE_IP_CMD (how a node finds the address the others reach it at),
# RAY_NOTIFY_PID (the head only: the batch shell, told of a SIGTERM), RAY_LOGS_DIR (where Ray's logs of this
# node are kept when the job failed: the batch shell leaves a file FAILED there).
set -euo pipefail

PYTHON=${PYTHON:-python3}
base=${RAY_PORT_BASE:?RAY_PORT_BASE not set: run this from multinode.sbatch}
node=${SLURMD_NODENAME:-$(hostname)}
cpus=${SLURM_CPUS_PER_TASK:-1}
# The address the other nodes reach this one at, taken on the node itself (Ray's own guess can pick a
# loopback or container address that the other nodes cannot reach: "IP mismatch" errors). Default: what the
# node's name resolves to (multinode.sbatch sets it; EDIT it there for another interface).
ip=$(eval "${RAY_NODE_IP_CMD:-getent ahostsv4 \"\$node\" | awk 'NR == 1 {print \$1}'}") || true
if [ -z "$ip" ]; then
  echo "error: ray node $node: no address (RAY_NODE_IP_CMD: ${RAY_NODE_IP_CMD:-getent ahostsv4 $node}); set" \
    "RAY_NODE_IP_CMD in multinode.sbatch (EDIT)" >&2
  exit 1
fi
case $ip in 127.*) echo "warning: ray node $node: its address is $ip, a loopback; other nodes cannot reach it" \
  "(set RAY_NODE_IP_CMD in multinode.sbatch, EDIT)" >&2 ;; esac
# Worker ports: +16..+255 of the block. A raylet starts one worker process per CPU when the first driver
# connects, each with a port of its own, and hangs with fewer ports (ray#28071); 16 more for the actors.
if [ $((cpus + 16)) -gt 240 ]; then
  echo "error: ray node $node: $cpus CPUs, but Ray starts a worker per CPU and the job's port block has 240" \
    "worker ports: at most 224 CPUs per node (--cpus-per-task), or a larger block (multinode.sbatch)" >&2
  exit 1
fi
# Ray keeps Unix sockets in its temp dir (paths must stay under ~107 characters) and its session directory
# name comes from the head: one short directory per job *and node*, so nodes sharing a /tmp never mix.
temp_dir=/tmp/ray-${SLURM_JOB_ID:-0}-$node

# Every port from this job's block (+0 and +7 are the head's GCS and dashboard API, from multinode.sbatch; +8 its
# client server, below): two jobs on one node never collide, nothing is in Ray's default ranges or the ephemeral
# range, and the dashboard process (started even with --include-dashboard=false) stays on loopback.
# The head's Ray client server: Ray starts one when Ray Client (grpcio) is installed, on 10001 unless told.
client=()
if [[ " $* " == *" --head "* ]] && "$PYTHON" -c "import grpc" 2>/dev/null; then
  client=(--ray-client-server-port=$((base + 8)))
fi
# Slurm's SIGTERM goes to every process of the step (GraceTime preemption, scancel --signal=TERM): Ray's processes
# would die of it (the raylet and GCS shut down, a Train worker exits) before the driver has saved. They start
# with SIGTERM *blocked*: the mask survives exec and fork, so the GCS, the raylet and every worker it starts keep
# it pending and go on; handlers Ray installs never run. (Ignoring it would not do: Ray installs handlers.)
# A failed worker group (a worker stopped answering: C13) is shut down after Ray Train's controller has waited
# TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S (default 30) for every worker's destroy_process_group, which a stopped
# worker never runs: 5 s keeps the driver's end within --timeout + 60 s. The controller runs on one of the nodes.
export TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S=${TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S:-5}
shield='import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
os.execvp(sys.argv[1], sys.argv[1:])'
setsid "$PYTHON" -c "$shield" "$PYTHON" -m ray.scripts.scripts start --block "$@" "${client[@]}" \
  --node-ip-address="$ip" --temp-dir="$temp_dir" \
  --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2)) --metrics-export-port=$((base + 3)) \
  --dashboard-agent-grpc-port=$((base + 4)) --dashboard-agent-listen-port=$((base + 5)) \
  --runtime-env-agent-port=$((base + 6)) --min-worker-port=$((base + 16)) --max-worker-port=$((base + 255)) \
  --num-cpus="$cpus" --num-gpus="${SLURM_GPUS_ON_NODE:-0}" \
  --object-store-memory=$((256 * 1024 * 1024)) --disable-usage-stats &
group=$!   # setsid in a background job runs in place: its PID is the new process group's id
echo "ray node $node ($ip): process group $group, temp dir $temp_dir"

# shellcheck disable=SC2317  # called from the traps below
stop() {
  trap - INT EXIT
  # SIGTERM is blocked in every Ray process (above): SIGKILL, the whole group. Nothing of the run is lost by
  # then -- the driver has saved and exited, or the job failed.
  kill -KILL -- "-$group" 2>/dev/null && echo "ray node $node: stopped"
  # A failed job (or a Ray that ended by itself) keeps this node's Ray logs in the run folder -- the workers'
  # stdout/stderr (worker-*.out/.err), raylet.out, ... -- before the temp dir goes.
  if [ -n "${RAY_LOGS_DIR:-}" ] && { [ -e "$RAY_LOGS_DIR/FAILED" ] || [ "${rc:-0}" != 0 ]; } \
    && [ -d "$temp_dir/session_latest/logs" ]; then
    mkdir -p "$RAY_LOGS_DIR"
    cp -rL "$temp_dir/session_latest/logs" "$RAY_LOGS_DIR/$node" \
      && echo "ray node $node: Ray's logs kept in $RAY_LOGS_DIR/$node"
  fi
  rm -rf "$temp_dir"
}
# shellcheck disable=SC2317
preempted() {
  echo "ray node $node: got TERM (preemption); Ray keeps running until the driver has saved"
  # The head's ray_node.sh runs on the batch shell's node and passes it on (RAY_NOTIFY_PID, from multinode.sbatch):
  # under GraceTime preemption Slurm signals the steps, not the batch shell and the driver.
  if [ -n "${RAY_NOTIFY_PID:-}" ]; then kill -TERM "$RAY_NOTIFY_PID" 2>/dev/null || true; fi
}
trap 'stop; exit 0' INT USR2
trap preempted TERM
trap stop EXIT
# Told to stop: the job script's teardown (USR2), or Slurm's SIGKILL when the grace time or KillWait is over.
while :; do
  rc=0
  wait "$group" || rc=$?
  kill -0 "$group" 2>/dev/null || break   # (a TERM ends `wait` early, not Ray)
done
echo "ray node $node: ray start exited with $rc" >&2
exit "$rc"
