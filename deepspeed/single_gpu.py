"""Train on one device with DeepSpeed: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
    python single_gpu.py --model gpt --gpt-params 50M --ds-config configs/zero3_offload.json   # ZeRO-Offload

A DeepSpeed engine always lives in a process group, even alone. Here it is a group of one whose store is inside
this process: no launcher, no MASTER_ADDR/MASTER_PORT. One process still gains from DeepSpeed: offloading the
optimizer states (and parameters) to CPU memory fits a model the GPU alone cannot hold.
"""

import os

import torch.distributed as dist

from common import (
    import_deepspeed,
    pick_backend,
    pick_device,
    prepare,
    recipe_main,
    run,
)


def setup_distributed(args):
    device = pick_device(0)
    import_deepspeed()
    inputs = prepare(args, 1, device)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it from the environment, even for one process
    dist.init_process_group(pick_backend(args.backend), store=dist.HashStore(), rank=0, world_size=1)
    return 0, 1, device, inputs


if __name__ == "__main__":
    run(recipe_main, setup_distributed, __doc__)
