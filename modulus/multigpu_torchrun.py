"""Train PhysicsNeMo's FNO on Darcy flow with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ddp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) for every process; PhysicsNeMo's
DistributedManager reads them, creates the process group and picks the device. torchrun restarts failed
processes (--max-restarts), and they resume from the last snapshot.
"""

from cluster import parse_args, require_torchrun, run
from recipe import init_distributed, train


def setup(args):
    """torchrun started this process: DistributedManager joins the others (recipe.init_distributed)."""
    require_torchrun(__file__)  # without torchrun's variables: one line, not a silent single process
    return init_distributed(args)


def main():
    args = parse_args(__doc__)
    manager = setup(args)
    train(args, manager.device, manager.rank, manager.world_size, launch="torchrun")


if __name__ == "__main__":
    run(main)
