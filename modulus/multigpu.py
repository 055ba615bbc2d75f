"""Train PhysicsNeMo's FNO on Darcy flow with DistributedDataParallel on one node: this process spawns one
worker per GPU (torch.multiprocessing), no launcher involved.

    python multigpu.py --checkpoint-dir checkpoints/spawn          # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3                        # CPU: 2 gloo workers

The parent picks the world size and a free MASTER_PORT and gives each worker RANK, LOCAL_RANK and WORLD_SIZE;
each worker's DistributedManager then initialises from those variables, exactly as under torchrun. Simple on one
node; across nodes use torchrun or srun (multinode.py).
"""

import os
import signal
import socket
import sys

import torch
import torch.multiprocessing as mp

from common import Preemption, parse_args, positive_int, run, start_distributed
from multigpu_torchrun import train


def train_worker(rank, world_size, args):
    """One worker: the parent handed over its rank; from here on it is multigpu_torchrun.py's train()."""
    preemption = Preemption()  # first: a signal that arrives during start-up must not kill the process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    manager = start_distributed(args, rank_hint=rank)
    train(args, manager, preemption, launch="spawned")


def worker(rank, world_size, args):
    run(train_worker, rank, world_size, args, rank=rank)  # a RecipeError: one line and exit 2, as everywhere


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    args = parse_args(__doc__, extra=lambda p: p.add_argument(
        "--nprocs", type=positive_int, default=torch.cuda.device_count() or 2,
        help="workers to spawn (default: the GPUs visible, 2 without CUDA)"))
    # The rendezvous: rank 0 (a worker) hosts it on this node. A MASTER_PORT set by the caller is kept.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    context = mp.start_processes(worker, args=(args.nprocs, args), nprocs=args.nprocs, join=False,
                                 start_method="spawn")

    def forward(signum, frame):
        # Slurm's warning (USR1) or a preemption (TERM) reaches this process: the workers decide when to stop.
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        # 2 (bad input, the worker printed the line) and 75 (preempted after a snapshot) pass through.
        sys.exit(e.exit_code if e.exit_code in (2, 75) else 1)


if __name__ == "__main__":
    main()
