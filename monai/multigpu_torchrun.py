"""Train a 3-D UNet with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --batch-size 2 --checkpoint-dir ckpt

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process and restarts them from the last snapshot
if one fails (--max-restarts), which is why resuming is automatic.
"""

import os

from cluster import Ranks, parse_args, pick_device, run, torchrun_env
from recipe import init_distributed, train


def setup(args):
    """One process per device, ranks from torchrun's variables; every process joins the process group."""
    rank, local_rank, world_size = torchrun_env(f"launch with `torchrun --nproc_per_node N "
                                                f"{os.path.basename(__file__)}` (or use single_gpu.py)")
    device = pick_device(local_rank)
    init_distributed(args, rank, world_size, device)
    return Ranks(rank, local_rank, world_size, device, distributed=True)  # train() wraps the model in DDP


def main():
    args = parse_args(__doc__)
    ranks = setup(args)
    train(args, ranks)


if __name__ == "__main__":
    run(main)
