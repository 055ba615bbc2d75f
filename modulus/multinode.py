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

from cluster import initialization_method, parse_args, require_launcher, run
from recipe import init_distributed, train
from toolkit import log


def setup(args):
    """srun started this task (Slurm's variables) or torchrun did (RANK...): DistributedManager reads whichever
    is there and joins the others (recipe.init_distributed)."""
    require_launcher()
    manager = init_distributed(args)
    # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
    log(manager.rank, f"host {socket.gethostname()} | local rank {manager.local_rank} | device {manager.device} | "
                      f"initialised from {initialization_method(manager)}")
    return manager


def main():
    args = parse_args(__doc__)
    manager = setup(args)
    train(args, manager.device, manager.rank, manager.world_size, launch=f"{os.environ.get('SLURM_NNODES', '?')} nodes")


if __name__ == "__main__":
    run(main)
