"""Train PhysicsNeMo's FNO on Darcy flow with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ddp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) for every process; PhysicsNeMo's
DistributedManager reads them, creates the process group and picks the device. torchrun restarts failed
processes (--max-restarts), and they resume from the last snapshot.
"""

import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from common import (
    Preemption,
    RecipeError,
    Trainer,
    build_datasets,
    build_model,
    check_dataset_fits,
    log,
    parse_args,
    run,
    start_distributed,
    stop_distributed,
)


def require_torchrun():
    """Without torchrun's variables DistributedManager would quietly train as one process: say so instead."""
    missing = [n for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc_per_node N "
                          f"{os.path.basename(__file__)}`")


def train(args, manager, preemption, launch="torchrun"):
    """Everything after DistributedManager has joined the process group. multigpu.py and multinode.py run exactly
    this: only how their processes start differs."""
    try:
        fit(args, manager, preemption, launch)
    finally:
        stop_distributed()  # after fit() has returned: the model must be gone first (see stop_distributed)


def fit(args, manager, preemption, launch):
    device, rank, world_size = manager.device, manager.rank, manager.world_size
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
    datasets = build_datasets(args)
    check_dataset_fits(datasets[0], world_size, args.batch_size)
    model = DDP(build_model().to(device), device_ids=[device] if device.type == "cuda" else None)
    trainer = Trainer(model, datasets, args, rank, world_size, device, preemption)
    if rank == 0:
        log(rank, f"world size {world_size} ({launch}) | backend {torch.distributed.get_backend()} | "
                  f"device {device} | {len(datasets[0])} samples | batch {args.batch_size}/rank | "
                  f"{len(trainer.loader)} steps/epoch")
    trainer.fit()


def main():
    preemption = Preemption()  # first: a signal that arrives during start-up must not kill the process
    args = parse_args(__doc__)
    require_torchrun()
    manager = start_distributed(args, rank_hint=os.environ["RANK"])
    train(args, manager, preemption)


if __name__ == "__main__":
    run(main)
