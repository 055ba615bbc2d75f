"""One process per node that spawns one worker per device (Lightning's ddp_spawn, its mp.spawn). A NeMo
script: @hydra_runner composes the config once, in this process; the workers receive the trainer and model.

    python multigpu.py --nprocs 2       # on CPU: 2 worker processes, gloo (= trainer.devices=2)
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

from cluster import parse_args, run  # noqa: E402  (light: NeMo is imported once the command line is checked)


def setup(args):
    """This process spawns one worker per device (--nprocs; Lightning's ddp_spawn: mp.spawn), which join each
    other through Lightning's DDP. This script starts its own workers: LightningEnvironment says so. Without it,
    inside a Slurm job Lightning picks SLURMEnvironment (ranks from srun's one task) and the spawned workers
    collide on one port (EADDRINUSE)."""
    import torch
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from recipe import ddp

    return {"devices": args.cfg.trainer.devices or torch.cuda.device_count() or 2,
            "strategy": ddp(args.cfg, start_method="spawn"), "plugins": [LightningEnvironment()]}


def main():
    args = parse_args(__doc__, extra=["--nprocs"])  # bad input fails here, in a second, before NeMo's imports
    launch = setup(args)
    from recipe import train

    train(args, START_TIME, **launch)


if __name__ == "__main__":  # required: the spawned workers re-import this file
    run(main)
