"""One process per device, started by torchrun (Lightning reads torchrun's variables).

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import os  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.environments import TorchElasticEnvironment  # noqa: E402

import common  # noqa: E402


def torchrun_layout() -> tuple[int, int]:
    """(devices, num_nodes) as torchrun started this job: Lightning must agree with the launcher."""
    if not TorchElasticEnvironment.detect():
        common.fail("RANK/LOCAL_WORLD_SIZE not set: start this script with torchrun, e.g. "
                    "`torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py` (or use single_gpu.py)")
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, int(os.environ["WORLD_SIZE"]) // per_node


def main():
    args = common.parse_args(__doc__)
    devices, num_nodes = torchrun_layout()
    common.join_restarted_attempt(args)  # torchrun --max-restarts: see common.py
    trainer = pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=devices,
        num_nodes=num_nodes,
        strategy=common.ddp(args),  # Lightning sees torchrun's variables and takes the ranks from them
        **common.trainer_options(args, START_TIME),
    )
    common.fit(trainer, args)


if __name__ == "__main__":
    main()
