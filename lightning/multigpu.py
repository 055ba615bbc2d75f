"""One process per node that spawns one worker per device (Lightning's ddp_spawn, its mp.spawn).

    python multigpu.py --nprocs 2       # on CPU: 2 worker processes, gloo
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins.environments import LightningEnvironment  # noqa: E402

from cluster import parse_args, run  # noqa: E402
from recipe import ddp, train, trainer_options  # noqa: E402
from toolkit import positive_int  # noqa: E402


def add_nprocs(p):
    p.add_argument("--nprocs", "--devices", dest="nprocs", type=positive_int, default=None,
                   help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")


def setup(args):
    """This process spawns the workers (Lightning's ddp_spawn); they join each other on this host."""
    return pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=args.nprocs or torch.cuda.device_count() or 2,
        strategy=ddp(args, start_method="spawn"),  # Lightning's ddp_spawn: mp.spawn
        # This script starts its own workers. Without this, inside a Slurm job Lightning picks SLURMEnvironment
        # (ranks from srun's one task) and the spawned workers collide on one port (EADDRINUSE).
        plugins=[LightningEnvironment()],
        **trainer_options(args, START_TIME),
    )


def main():
    args = parse_args(__doc__, extra=add_nprocs)
    trainer = setup(args)
    train(args, trainer)


if __name__ == "__main__":  # required: the spawned workers re-import this file
    run(main)
