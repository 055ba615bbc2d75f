"""One process per device, started by torchrun (Lightning reads torchrun's variables). A NeMo script:
@hydra_runner composes conf/config.yaml with the overrides on the command line, in every process.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/run1
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import os  # noqa: E402

import cli  # noqa: E402


def torchrun_layout() -> tuple[int, int]:
    """(devices, num_nodes) as torchrun started this job: Lightning must agree with the launcher."""
    if "RANK" not in os.environ or "LOCAL_WORLD_SIZE" not in os.environ:
        cli.fail("RANK/LOCAL_WORLD_SIZE not set: start this script with torchrun, e.g. "
                 "`torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py` (or use single_gpu.py)")
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, int(os.environ["WORLD_SIZE"]) // per_node


if __name__ == "__main__":
    # The flags, overrides and launch, checked now: bad input fails in a second, not after NeMo's imports below.
    OVERRIDES, _ = cli.command_line(__doc__)
    DEVICES, NUM_NODES = torchrun_layout()

import lightning.pytorch as pl  # noqa: E402
from nemo.core.config import hydra_runner  # noqa: E402

import common  # noqa: E402


@hydra_runner(config_path="conf", config_name="config")
def main(cfg):
    trainer = pl.Trainer(
        devices=DEVICES,
        num_nodes=NUM_NODES,
        strategy=common.ddp(cfg),  # Lightning sees torchrun's variables and takes the ranks from them
        **common.trainer_options(cfg, START_TIME),
    )
    common.fit(trainer, cfg)


if __name__ == "__main__":
    cli.run(main, OVERRIDES)
