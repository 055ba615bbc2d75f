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

from common import Preemption, RecipeError, log, parse_args, run, start_distributed
from multigpu_torchrun import train


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
    # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
    log(manager.rank, f"host {socket.gethostname()} | local rank {manager.local_rank} | device {manager.device} | "
                      f"initialised from {manager._initialization_method}")
    train(args, manager, preemption, launch=f"{os.environ.get('SLURM_NNODES', '?')} nodes")

if __name__ == "__main__":
    run(main)
