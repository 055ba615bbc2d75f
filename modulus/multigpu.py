"""Train PhysicsNeMo's FNO on Darcy flow with DistributedDataParallel on one node: this process spawns one
worker per GPU (torch.multiprocessing), no launcher involved.

    python multigpu.py --checkpoint-dir checkpoints/spawn          # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3                        # CPU: 2 gloo workers

The parent picks the world size and a free MASTER_PORT and gives each worker RANK, LOCAL_RANK and WORLD_SIZE;
each worker's DistributedManager then initialises from those variables, exactly as under torchrun. Simple on one
node; across nodes use torchrun or srun (multinode.py).
"""

import os

import torch
import torch.multiprocessing as mp

from cluster import free_port, join_workers, parse_args, run
from recipe import init_distributed, train
from toolkit import positive_int


def setup(args, rank, world_size):
    """A spawned worker: the parent handed over its rank; DistributedManager reads it from the variables torchrun
    would set."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    return init_distributed(args)


def spawned(rank, world_size, args):
    manager = setup(args, rank, world_size)
    train(args, manager.device, manager.rank, manager.world_size, launch="spawned")


def worker(rank, world_size, args):
    """What each spawned process runs: a RecipeError is one line and exit 2 there too, a signal a snapshot."""
    run(spawned, rank, world_size, args, rank=rank)


def main():
    args = parse_args(__doc__, extra=lambda p: p.add_argument(
        "--nprocs", type=positive_int, default=torch.cuda.device_count() or 2,
        help="workers to spawn (default: the GPUs visible, 2 without CUDA)"))
    # The rendezvous: rank 0 (a worker) hosts it on this node. A MASTER_PORT set by the caller is kept.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    context = mp.start_processes(worker, args=(args.nprocs, args), nprocs=args.nprocs, join=False,
                                 start_method="spawn")
    join_workers(context)  # forwards SIGUSR1/SIGTERM to the workers; their exit 2 or 75 becomes ours


if __name__ == "__main__":
    run(main)
