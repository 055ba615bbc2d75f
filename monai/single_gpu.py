"""Train a 3-D UNet on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --batch-size 4 --checkpoint-dir checkpoints/single
    python single_gpu.py --data decathlon --data-dir Task09_Spleen --batch-size 2 --roi-size 96 --checkpoint-dir ckpt
"""

import torch

from cluster import Ranks, parse_args, run
from recipe import train


def setup(args):
    """One process, one device (the GPU when there is one), no process group."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return Ranks(device=device)  # rank 0 of 1


def main():
    args = parse_args(__doc__)
    ranks = setup(args)
    train(args, ranks)


if __name__ == "__main__":
    run(main)
