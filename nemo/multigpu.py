"""One process per node that spawns one worker per device (Lightning's ddp_spawn, its mp.spawn). A NeMo
script: @hydra_runner composes the config once, in this process; the workers receive the trainer and model.

    python multigpu.py --nprocs 2       # on CPU: 2 worker processes, gloo (= trainer.devices=2)
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import cli  # noqa: E402

if __name__ == "__main__":
    # The flags and overrides, checked now: bad input fails in a second, not after NeMo's imports below.
    OVERRIDES, _ = cli.command_line(__doc__, nprocs=True)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.environments import LightningEnvironment  # noqa: E402
from nemo.core.config import hydra_runner  # noqa: E402

import common  # noqa: E402


@hydra_runner(config_path="conf", config_name="config")
def main(cfg):
    trainer = pl.Trainer(
        devices=cfg.trainer.devices or torch.cuda.device_count() or 2,  # --nprocs
        strategy=common.ddp(cfg, start_method="spawn"),  # Lightning's ddp_spawn: mp.spawn
        # This script starts its own workers. Without this, inside a Slurm job Lightning picks SLURMEnvironment
        # (ranks from srun's one task) and the spawned workers collide on one port (EADDRINUSE).
        plugins=[LightningEnvironment()],
        **common.trainer_options(cfg, START_TIME),
    )
    common.fit(trainer, cfg)


if __name__ == "__main__":  # required: the spawned workers re-import this file
    cli.run(main, OVERRIDES)
