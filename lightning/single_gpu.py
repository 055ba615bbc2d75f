"""One process, one device: a GPU when there is one, else the CPU.

    python single_gpu.py --epochs 3
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402

import common  # noqa: E402


def main():
    args = common.parse_args(__doc__)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        **common.trainer_options(args, START_TIME),
    )
    common.fit(trainer, args)


if __name__ == "__main__":
    main()
