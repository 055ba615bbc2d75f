"""Train with DeepSpeed across nodes: srun one task per GPU, `srun torchrun` one launcher per node, or DeepSpeed's
own launcher with a hostfile.

    srun python multinode.py ...                  # multinode.sbatch: ranks from SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS
    srun torchrun --nnodes N ... multinode.py     # multinode_torchrun.sbatch: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE
    deepspeed --hostfile H --launcher slurm multinode.py   # multinode_deepspeed.sbatch: the launcher runs srun

Under plain srun nobody sets RANK; DeepSpeed would then try MPI discovery (and fail on a missing mpi4py), so
this script maps Slurm's variables itself. MASTER_ADDR and MASTER_PORT come from the job script (the first
node of the allocation, a port derived from the job id).

On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or preemption) every rank finishes the step it is
on, all ranks save their part of a DeepSpeed checkpoint, and the job exits with 75 so its script can requeue it.
"""

import os
import socket

from cluster import init_distributed, launch_env, parse_args, pick_device, run
from recipe import prepare, train
from toolkit import log

SLURM_TO_TORCH = {"SLURM_PROCID": "RANK", "SLURM_LOCALID": "LOCAL_RANK", "SLURM_NTASKS": "WORLD_SIZE"}


def ranks_from_slurm():
    """Under `srun python` (one task per GPU), Slurm's per-task variables are the ranks. They are read here, in
    each task; expanded in the batch script they would be the batch shell's (rank 0 for every task)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return  # torchrun / the deepspeed launcher set RANK; without either, launch_env says what is missing
    for slurm, torch_name in SLURM_TO_TORCH.items():
        if slurm in os.environ:
            os.environ[torch_name] = os.environ[slurm]


def setup(args):
    """srun, torchrun or the deepspeed launcher started this process; its rank comes from their variables."""
    ranks_from_slurm()
    rank, local_rank, world_size = launch_env(
        "launch with srun inside a Slurm job whose script exports MASTER_ADDR=$(scontrol show hostnames "
        "\"$SLURM_JOB_NODELIST\" | head -n 1) and a MASTER_PORT derived from $SLURM_JOB_ID, or with torchrun")
    device = pick_device(local_rank)
    inputs = prepare(args, world_size, device)
    init_distributed(args, rank, world_size)
    # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
    log(rank, f"host {socket.gethostname()} | local rank {local_rank} | device {device} | "
              f"nodes {os.environ.get('SLURM_NNODES', '?')}")
    return rank, world_size, device, inputs


def main():
    args = parse_args(__doc__)
    rank, world_size, device, inputs = setup(args)
    train(args, inputs, rank, world_size, device)


if __name__ == "__main__":
    run(main)
