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
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    Preemption,
    Trainer,
    build_datasets,
    build_model,
    check_dataset_fits,
    log,
    parse_args,
    positive_int,
    run,
    start_distributed,
    stop_distributed,
)


def train(rank, world_size, args):
    """One worker: what multigpu_torchrun.py's main() does, with the rank handed over by the parent."""
    preemption = Preemption()  # first: a signal that arrives during start-up must not kill the process
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    manager = start_distributed(args, rank_hint=rank)
    device = manager.device
    try:
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
        datasets = build_datasets(args)
        check_dataset_fits(datasets[0], world_size, args.batch_size)
        model = DDP(build_model().to(device), device_ids=[device] if device.type == "cuda" else None)
        trainer = Trainer(model, datasets, args, rank, world_size, device, preemption)
        if rank == 0:
            log(rank, f"world size {world_size} (spawned) | backend {torch.distributed.get_backend()} | "
                      f"device {device} | {len(datasets[0])} samples | batch {args.batch_size}/rank | "
                      f"{len(trainer.loader)} steps/epoch")
        trainer.fit()
    finally:
        stop_distributed()


def worker(rank, world_size, args):
    run(train, rank, world_size, args, rank=rank)  # a RecipeError is one line and exit 2, as in the other scripts


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
