"""One process per device, started by torchrun (Lightning reads torchrun's variables). A NeMo script:
@hydra_runner composes conf/config.yaml with the overrides on the command line, in every process.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/run1
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

from cluster import init_distributed, parse_args, run, torchrun_layout  # noqa: E402  (light: NeMo after the checks)


def setup(args):
    """torchrun started one process per device and told each its place (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/MASTER_PORT): it joins the others under --timeout (cluster.init_distributed), with the ranks
    Lightning reads from them, and Lightning's DDP uses that process group. devices and num_nodes repeat
    torchrun's layout, which Lightning must agree with."""
    devices, num_nodes = torchrun_layout()  # started without torchrun: one line, before NeMo's imports
    init_distributed(args.cfg)  # a busy MASTER_PORT or missing ranks: one line, exit 2 (and torchrun restarts)
    from recipe import ddp

    return {"devices": devices, "num_nodes": num_nodes, "strategy": ddp(args.cfg, per_node=devices)}


def main():
    args = parse_args(__doc__)  # bad input fails here, in a second, not after NeMo's imports (several seconds)
    launch = setup(args)
    from recipe import train

    train(args, START_TIME, **launch)


if __name__ == "__main__":
    run(main)
