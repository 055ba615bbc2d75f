"""Train on one device in one plain Python process: the baseline that multigpu.py and multinode.py run on Ray.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single

No Ray here, on purpose: a one-worker TorchTrainer would add a Ray cluster start (seconds, several processes)
and change nothing about the training. This is the loop every Ray Train worker runs (common.Trainer); only the
session differs: here lines are printed directly, SIGUSR1/SIGTERM arrive directly, and the snapshot is written
into the same directory layout Ray Train uses (CHECKPOINT_DIR/train/checkpoint_*/snapshot.pt).
"""

import torch

from common import ConvNet, LocalSession, Trainer, build_dataset, build_loader, check_dataset_fits, log, parse_args, run


def setup(args):
    """One process, one device: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(args, device):
    session = LocalSession(args)  # catches SIGUSR1/SIGTERM from here on: a stop at a step boundary, with a snapshot
    torch.manual_seed(args.seed)
    dataset = build_dataset(args)
    check_dataset_fits(dataset, 1, args.batch_size)
    loader = build_loader(dataset, rank=0, world_size=1, args=args)
    model = ConvNet(in_channels=dataset.in_channels).to(device)
    log(0, f"device {device} | {len(dataset)} samples | batch {args.batch_size} | {len(loader)} steps/epoch")
    if Trainer(model, loader, args, device, session).train() == "preempted":
        raise SystemExit(75)


def main():
    args = parse_args(__doc__)
    device = setup(args)
    train(args, device)


if __name__ == "__main__":
    run(main)
