"""One process per node that spawns one worker per device (Lightning's ddp_spawn, its mp.spawn).

    python multigpu.py --nprocs 2       # on CPU: 2 worker processes, gloo
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.environments import LightningEnvironment  # noqa: E402

import common  # noqa: E402


def main():
    args = common.parse_args(__doc__, nprocs=True)
    trainer = pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=args.nprocs or torch.cuda.device_count() or 2,
        strategy=common.ddp(args, start_method="spawn"),  # Lightning's ddp_spawn: mp.spawn
        # This script starts its own workers. Without this, inside a Slurm job Lightning picks SLURMEnvironment
        # (ranks from srun's one task) and the spawned workers collide on one port (EADDRINUSE).
        plugins=[LightningEnvironment()],
        **common.trainer_options(args, START_TIME),
    )
    common.fit(trainer, args)


if __name__ == "__main__":  # required: the spawned workers re-import this file
    main()
