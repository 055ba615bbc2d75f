"""Train on one device with DeepSpeed: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
    python single_gpu.py --model gpt --gpt-params 50M --ds-config configs/zero3_offload.json   # ZeRO-Offload

A DeepSpeed engine always lives in a process group, even alone. Here it is a group of one whose store is inside
this process: no launcher, no MASTER_ADDR/MASTER_PORT. One process still gains from DeepSpeed: offloading the
optimizer states (and parameters) to CPU memory fits a model the GPU alone cannot hold.
"""

import torch.distributed as dist

from cluster import import_deepspeed, parse_args, pick_backend, pick_device, run
from recipe import prepare, train


def setup(args):
    """One process: a process group of one whose store lives in this process (no launcher, no port)."""
    device = pick_device(0)  # and LOCAL_RANK, which DeepSpeed reads even for one process
    import_deepspeed()
    inputs = prepare(args, 1, device)
    dist.init_process_group(pick_backend(args.backend), store=dist.HashStore(), rank=0, world_size=1)
    return 0, 1, device, inputs


def main():
    args = parse_args(__doc__)
    rank, world_size, device, inputs = setup(args)
    train(args, inputs, rank, world_size, device)


if __name__ == "__main__":
    run(main)
