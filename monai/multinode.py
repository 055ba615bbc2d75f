"""Train a 3-D UNet with DistributedDataParallel across nodes, launched either way Slurm clusters do it:

    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv-backend c10d \\
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT multinode.py ...   # one launcher per node
    srun python multinode.py ...                                    # one task per GPU

Under torchrun the usual RANK/LOCAL_RANK/WORLD_SIZE are set; under plain srun they are taken from
SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. Either way MASTER_ADDR/MASTER_PORT come from the job script.
On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or preemption) every rank finishes the step it
is on, rank 0 saves a snapshot, and the job exits with 75 so its script can requeue it.
"""

import os
import socket

from cluster import Ranks, parse_args, pick_device, run, torchrun_env
from recipe import init_distributed, train
from toolkit import RecipeError, log


def ranks_from_slurm():
    """Plain `srun python multinode.py` (one task per GPU) sets no RANK: take it from srun's variables. These are
    per-task values, so they must be read here, in each task, never expanded once in the batch script (that makes
    every task rank 0). Under torchrun nothing is changed."""
    if any(n in os.environ for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) or "SLURM_PROCID" not in os.environ:
        return
    os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                      WORLD_SIZE=os.environ["SLURM_NTASKS"])
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise RecipeError(f"{' and '.join(missing)} not set: in the job script, export MASTER_ADDR=$(scontrol "
                          f"show hostnames \"$SLURM_JOB_NODELIST\" | sed -n 1p) and "
                          f"MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))")


def setup(args):
    """One process per device on every node, ranks from torchrun or srun; every process joins the process group."""
    ranks_from_slurm()
    rank, local_rank, world_size = torchrun_env("launch with torchrun, or with srun inside a Slurm job "
                                                "(see multinode.sbatch)")
    device = pick_device(local_rank)
    init_distributed(args, rank, world_size, device)
    # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
    log(rank, f"host {socket.gethostname()} | local rank {local_rank} | device {device}")
    return Ranks(rank, local_rank, world_size, device, distributed=True)  # train() wraps the model in DDP


def main():
    args = parse_args(__doc__)
    ranks = setup(args)
    train(args, ranks)


if __name__ == "__main__":
    run(main)
