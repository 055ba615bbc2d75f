"""One process, one device: a GPU when there is one, else the CPU.

    python single_gpu.py --epochs 3
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402

from cluster import parse_args, run  # noqa: E402
from recipe import train, trainer_options  # noqa: E402


def setup(args):
    """One process: Lightning picks the device, nothing to join."""
    return pl.Trainer(
        accelerator="auto",
        devices=1,
        **trainer_options(args, START_TIME),
    )


def main():
    args = parse_args(__doc__)
    trainer = setup(args)
    train(args, trainer)


if __name__ == "__main__":
    run(main)
