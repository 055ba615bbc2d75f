"""One process, one device: a GPU when there is one, else the CPU. A NeMo script: @hydra_runner composes
conf/config.yaml with the overrides on the command line; the contract's flags are overrides too.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/run1
    python single_gpu.py trainer.max_epochs=3 model.optim.lr=0.1 exp_manager.explicit_log_dir=checkpoints/run1
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import cli  # noqa: E402

if __name__ == "__main__":
    # The flags and overrides, checked now: bad input fails in a second, not after NeMo's imports below.
    OVERRIDES, _ = cli.command_line(__doc__)

import lightning.pytorch as pl  # noqa: E402
from nemo.core.config import hydra_runner  # noqa: E402

import common  # noqa: E402


@hydra_runner(config_path="conf", config_name="config")
def main(cfg):
    trainer = pl.Trainer(
        devices=1,
        **common.trainer_options(cfg, START_TIME),
    )
    common.fit(trainer, cfg)


if __name__ == "__main__":
    cli.run(main, OVERRIDES)
