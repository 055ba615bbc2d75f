"""Train on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
"""

import torch

from cluster import parse_args, run
from recipe import train


def setup(args):
    """One process, one device: the GPU when there is one. No process group: nothing to join."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main():
    args = parse_args(__doc__)
    device = setup(args)
    train(args, device)


if __name__ == "__main__":
    run(main)
