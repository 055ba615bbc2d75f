"""One process per device, started by torchrun (Lightning reads torchrun's variables).

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import lightning.pytorch as pl  # noqa: E402

from cluster import init_distributed, parse_args, run, torchrun_layout  # noqa: E402
from recipe import ddp, train, trainer_options  # noqa: E402


def setup(args):
    """torchrun started this process: it joins the others under --timeout (cluster.init_distributed), with the
    ranks Lightning takes from torchrun's variables; Lightning uses that process group."""
    devices, num_nodes = torchrun_layout()
    init_distributed(args)  # a busy MASTER_PORT or missing ranks: one line, exit 2 (and torchrun restarts)
    return pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=devices,
        num_nodes=num_nodes,
        strategy=ddp(args, per_node=devices),  # ranks from torchrun's variables, the GPUs init_distributed chose
        **trainer_options(args, START_TIME),
    )


def main():
    args = parse_args(__doc__)
    trainer = setup(args)
    train(args, trainer)


if __name__ == "__main__":
    run(main)
