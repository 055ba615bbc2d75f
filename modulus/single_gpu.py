"""Train PhysicsNeMo's FNO on Darcy flow on one device: the baseline every other recipe here changes as little as
possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
    python darcy.py data/darcy && python single_gpu.py --data darcy --data-dir data/darcy
"""

import torch

from common import Preemption, Trainer, build_datasets, build_model, check_dataset_fits, log, parse_args, run


def main():
    preemption = Preemption()  # first: a signal that arrives during start-up must not kill the process
    args = parse_args(__doc__)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size = 0, 1
    torch.manual_seed(args.seed)
    datasets = build_datasets(args)
    check_dataset_fits(datasets[0], world_size, args.batch_size)
    model = build_model().to(device)
    trainer = Trainer(model, datasets, args, rank, world_size, device, preemption)
    log(rank, f"device {device} | {len(datasets[0])} samples | batch {args.batch_size} | "
              f"{len(trainer.loader)} steps/epoch")
    trainer.fit()


if __name__ == "__main__":
    run(main)
