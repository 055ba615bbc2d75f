"""Train with DistributedDataParallel across nodes, launched either way Slurm clusters do it:

    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv-backend c10d \
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT multinode.py ...   # one launcher per node
    srun python multinode.py ...                                    # one task per GPU

Under torchrun the usual RANK/LOCAL_RANK/WORLD_SIZE are set; under plain srun they are taken from
SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. Either way MASTER_ADDR/MASTER_PORT come from the job script.
On SIGUSR1 or SIGTERM (Slurm's warning before a time limit, or preemption) every rank finishes the step it
is on, rank 0 saves a snapshot, and the job exits with 75 so its script can requeue it (see multinode.sbatch).
The training itself is recipe.train, as in every script: only the way the processes start differs.
"""

import os
import socket

from cluster import parse_args, run
from multigpu_torchrun import setup as join_like_torchrun
from recipe import train
from toolkit import RecipeError, log


def ranks_from_slurm():
    """Plain `srun python multinode.py`: one task per GPU, ranks from srun's per-task variables.

    They must be read here, in each task, never expanded once in the batch script (that makes every task
    rank 0). Under torchrun this does nothing: torchrun has set RANK, LOCAL_RANK and WORLD_SIZE already.
    """
    if any(n in os.environ for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return
    if "SLURM_PROCID" not in os.environ:
        raise RecipeError("neither torchrun's RANK/LOCAL_RANK/WORLD_SIZE nor srun's SLURM_PROCID is set: "
                          "launch with torchrun, or with srun inside a Slurm job (see multinode.sbatch)")
    os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                      WORLD_SIZE=os.environ["SLURM_NTASKS"])
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise RecipeError(f"{' and '.join(missing)} not set: in the job script, export MASTER_ADDR=$(scontrol "
                          f"show hostnames \"$SLURM_JOB_NODELIST\" | sed -n 1p) and a MASTER_PORT derived "
                          f"from $SLURM_JOB_ID")


def setup(args):
    """Ranks from torchrun or from srun, then join the process group as multigpu_torchrun.py does."""
    ranks_from_slurm()
    rank, world_size, device = join_like_torchrun(args)
    # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
    log(rank, f"host {socket.gethostname()} | local rank {os.environ['LOCAL_RANK']} | device {device} | "
              f"nodes {os.environ.get('SLURM_NNODES', '?')}")
    return rank, world_size, device


def main():
    args = parse_args(__doc__)
    rank, world_size, device = setup(args)
    train(args, device, rank, world_size)


if __name__ == "__main__":
    run(main)
