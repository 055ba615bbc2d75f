"""Train across the nodes of a running Ray cluster: this script is the *driver* that joins it.

    RAY_ADDRESS=HEAD_IP:GCS_PORT python multinode.py --epochs 3 --checkpoint-dir checkpoints/run
    python multinode.py --address HEAD_IP:GCS_PORT --workers 16 ...

Ray has no torchrun and no per-rank launch: the cluster (one `ray start` per node; multinode.sbatch starts and
ends it inside a Slurm job) already has its processes, and one driver anywhere in it asks Ray Train for
--workers workers. Ray places them on the nodes by their resources, gives each its rank, sets up the process
group and runs the same loop as single_gpu.py in each. The driver prints their lines and owns the run: on
SIGUSR1/SIGTERM the workers stop after the same step, rank 0 saves a snapshot, and the driver exits 75; a worker
that dies (node lost, process killed) is replaced and training continues from the last snapshot (--max-failures).
"""

import os
import time

import torch

from common import RecipeError, add_ray_flags, catch_stop_signals, fit_on_ray, joined_ray, parse_args, positive_int, run


def add_flags(parser):
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="HEAD_IP:GCS_PORT of the Ray cluster to join (default: $RAY_ADDRESS)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="Ray Train workers (default: one per GPU of the cluster, one per node without GPUs)")
    parser.add_argument("--wait-for-nodes", type=positive_int, default=1,
                        help="wait (polling, at most --timeout s) until this many nodes have joined the cluster")
    add_ray_flags(parser)


def default_workers():
    """One worker per device of the cluster: its GPUs, or one per node where there are none."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus if torch.cuda.is_available() and gpus else len([n for n in ray.nodes() if n["Alive"]])


def wait_for_nodes(count, timeout):
    """Poll until `count` nodes are alive: the job script starts them all, but each joins when it is ready."""
    import ray

    deadline = time.monotonic() + timeout
    while (alive := [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]) and len(alive) < count:
        if time.monotonic() > deadline:
            raise RecipeError(f"only {len(alive)} of {count} nodes joined the Ray cluster within --timeout {timeout} s "
                              f"(joined: {', '.join(alive)}): see the job log for the nodes' `ray start` output")
        time.sleep(1)
    print(f"[rank0] cluster: {len(alive)} nodes ({', '.join(sorted(alive))})", flush=True)


def main():
    catch_stop_signals()  # a SIGUSR1/SIGTERM during start-up must not kill the driver before it can pass it on
    args = parse_args(__doc__, extra=add_flags)
    if not args.address:
        raise RecipeError("no Ray cluster to join: pass --address HEAD_IP:GCS_PORT or set RAY_ADDRESS "
                          "(multinode.sbatch starts a cluster and does this); on one machine use multigpu.py")
    with joined_ray(args.address, args.timeout):
        wait_for_nodes(args.wait_for_nodes, args.timeout)
        fit_on_ray(args, args.workers or default_workers())


if __name__ == "__main__":
    run(main)
