"""Train PhysicsNeMo's FNO on Darcy flow on one device: the baseline every other recipe here changes as little as
possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
    python darcy.py data/darcy && python single_gpu.py --data darcy --data-dir data/darcy
"""

import torch

from cluster import parse_args, run
from recipe import train


def setup(args):
    """One process, one device: nothing to start, nobody to join."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main():
    args = parse_args(__doc__)
    device = setup(args)
    train(args, device)


if __name__ == "__main__":
    run(main)
