"""Train a 3-D UNet with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --batch-size 2 --checkpoint-dir ckpt

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process and restarts them from the last snapshot
if one fails (--max-restarts), which is why resuming is automatic.
"""

import os

from torch.nn.parallel import DistributedDataParallel as DDP

from common import Ranks, fit, init_distributed, launch_env, leave_process_group, parse_args, pick_device, run


def main():
    args = parse_args(__doc__)
    rank, local_rank, world_size = launch_env(f"launch with `torchrun --nproc_per_node N {os.path.basename(__file__)}` "
                                              f"(or use single_gpu.py)")
    device = pick_device(local_rank)
    init_distributed(args, rank, world_size, device)
    try:
        ranks = Ranks(rank, local_rank, world_size, device, distributed=True)
        fit(args, ranks, wrap=lambda model: DDP(model))  # gradients averaged over ranks in every backward
    finally:
        leave_process_group()


if __name__ == "__main__":
    run(main)
