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

import contextlib
import os

from cluster import add_ray_flags, default_workers, joined_ray, parse_args, run, wait_for_nodes
from recipe import train
from toolkit import RecipeError, positive_int


def add_flags(parser):
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="HEAD_IP:GCS_PORT of the Ray cluster to join (default: $RAY_ADDRESS)")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="Ray Train workers (default: one per GPU of the cluster, one per node without GPUs)")
    parser.add_argument("--wait-for-nodes", type=positive_int, default=1,
                        help="wait (polling, at most --timeout s) until this many nodes have joined the cluster")
    add_ray_flags(parser)


@contextlib.contextmanager
def setup(args):
    """Join the running Ray cluster (the job script started it) for the duration of the `with`, once all its
    nodes are there; yields the worker count."""
    if not args.address:
        raise RecipeError("no Ray cluster to join: pass --address HEAD_IP:GCS_PORT or set RAY_ADDRESS "
                          "(multinode.sbatch starts a cluster and does this); on one machine use multigpu.py")
    with joined_ray(args.address, args.timeout):
        wait_for_nodes(args.wait_for_nodes, args.timeout)
        yield args.workers or default_workers()


def main():
    args = parse_args(__doc__, extra=add_flags)
    with setup(args) as workers:
        train(args, workers=workers)


if __name__ == "__main__":
    run(main)
