"""Train PhysicsNeMo's FNO on Darcy flow with DistributedDataParallel across nodes, launched either way Slurm
clusters do it:

    srun python multinode.py ...                                    # one task per GPU (multinode.sbatch)
    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT multinode.py ...   # one launcher per node

PhysicsNeMo's DistributedManager reads torchrun's RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR first; without them,
Slurm's SLURM_PROCID/SLURM_NPROCS/SLURM_LOCALID with the address from SLURM_LAUNCH_NODE_IPADDR (set by srun, so
the tasks must be started by srun) and the port from MASTER_PORT (the job script derives it from the job id).
On SIGUSR1 or SIGTERM every rank finishes its step, rank 0 saves a snapshot, and the job exits with 75 so its
script requeues it; the requeued job resumes from the snapshot.
"""

import os
import socket

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    Preemption,
    RecipeError,
    Trainer,
    build_datasets,
    build_model,
    check_dataset_fits,
    log,
    parse_args,
    run,
    start_distributed,
    stop_distributed,
)


def require_launcher():
    """torchrun's variables, or an srun task's; a clear error otherwise (DistributedManager would quietly train
    as one process)."""
    if not any(n in os.environ for n in ("RANK", "SLURM_PROCID")):
        raise RecipeError("neither torchrun's RANK nor Slurm's SLURM_PROCID is set: start the script with `srun` "
                          "inside a Slurm job, or with torchrun")


def main():
    preemption = Preemption()  # first: a signal that arrives during start-up must not kill the process
    args = parse_args(__doc__)
    require_launcher()
    manager = start_distributed(args, rank_hint=os.environ.get("RANK", os.environ.get("SLURM_PROCID")))
    device, rank, world_size = manager.device, manager.rank, manager.world_size
    try:
        # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
        log(rank, f"host {socket.gethostname()} | local rank {manager.local_rank} | device {device} | "
                  f"initialised from {manager._initialization_method}")
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
        datasets = build_datasets(args)
        check_dataset_fits(datasets[0], world_size, args.batch_size)
        model = DDP(build_model().to(device), device_ids=[device] if device.type == "cuda" else None)
        trainer = Trainer(model, datasets, args, rank, world_size, device, preemption)
        if rank == 0:
            log(rank, f"world size {world_size} | nodes {os.environ.get('SLURM_NNODES', '?')} | "
                      f"backend {torch.distributed.get_backend()} | device {device} | {len(datasets[0])} samples | "
                      f"batch {args.batch_size}/rank | {len(trainer.loader)} steps/epoch")
        trainer.fit()
    finally:
        stop_distributed()


if __name__ == "__main__":
    run(main)
