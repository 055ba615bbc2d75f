"""One process per device, started by torchrun (Lightning reads torchrun's variables).

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402

from cluster import join_restarted_attempt, parse_args, run, torchrun_layout  # noqa: E402
from recipe import ddp, train, trainer_options  # noqa: E402


def setup(args):
    """torchrun started this process: Lightning takes the ranks from torchrun's variables and joins the others."""
    devices, num_nodes = torchrun_layout()
    join_restarted_attempt(args)  # torchrun --max-restarts: see cluster.py
    return pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=devices,
        num_nodes=num_nodes,
        strategy=ddp(args),  # Lightning sees torchrun's variables and takes the ranks from them
        **trainer_options(args, START_TIME),
    )


def main():
    args = parse_args(__doc__)
    trainer = setup(args)
    train(args, trainer)


if __name__ == "__main__":
    run(main)
