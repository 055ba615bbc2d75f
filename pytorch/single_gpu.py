"""Train on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
"""

import torch
from torch.utils.data.distributed import DistributedSampler

from common import (
    Trainer,
    allow_tf32,
    build_dataset,
    build_loader,
    build_model,
    check_dataset_fits,
    log,
    parse_args,
    run,
)


def setup(args):
    """One process, one device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def data(args):
    """The training set and a loader over all of it."""
    dataset = build_dataset(args, download=True)
    check_dataset_fits(dataset, 1, args.batch_size)
    # One "shard" holding everything: the order still depends only on (seed, epoch), which makes a resumed run
    # see the batches an uninterrupted one would, and equals what DDP's sampler draws with a single rank.
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=args.seed, drop_last=True)
    return dataset, build_loader(dataset, sampler, args)


def train(args, device):
    allow_tf32()
    torch.manual_seed(args.seed)
    dataset, loader = data(args)
    model = build_model(dataset).to(device)
    log(0, f"device {device} | {len(dataset)} samples | batch {args.batch_size} | {len(loader)} steps/epoch")
    Trainer(model, loader, args, device).train()


def main():
    args = parse_args(__doc__)
    device = setup(args)
    train(args, device)


if __name__ == "__main__":
    run(main)
