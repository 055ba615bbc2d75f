"""Train on one device in one plain Python process: the baseline that multigpu.py and multinode.py run on Ray.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single

No Ray here, on purpose: a one-worker TorchTrainer would add a Ray cluster start (seconds, several processes)
and change nothing about the training. This is the loop every Ray Train worker runs (recipe.Trainer); only the
session differs: here lines are printed directly, SIGUSR1/SIGTERM arrive directly, and the snapshot is written
into the same directory layout Ray Train uses (CHECKPOINT_DIR/train/checkpoint_*/snapshot.pt).
"""

import torch

from cluster import parse_args, run
from recipe import train


def setup(args):
    """One process, one device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def main():
    args = parse_args(__doc__)
    device = setup(args)
    train(args, device=device)


if __name__ == "__main__":
    run(main)
