"""Train with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ddp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process. Resuming from --checkpoint-dir is automatic:
a restarted job (requeued, resubmitted, torchrun --max-restarts) continues from its last snapshot.
"""

from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

from common import (
    Trainer,
    allow_tf32,
    build_dataset,
    build_loader,
    build_model,
    check_dataset_fits,
    explained_rendezvous,
    fetch_dataset,
    log,
    parse_args,
    pick_backend,
    rendezvous_store,
    run,
    torchrun_env,
)


def setup(args):
    """Join the process group: one process per device, ranks from torchrun's variables."""
    rank, local_rank, world_size = torchrun_env()  # set by torchrun for every process it starts
    if torch.cuda.is_available():
        # With --gpus-per-task each process may see only one device (always "cuda:0").
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = pick_backend(args.backend)
    # Two deadlines: --rendezvous-timeout for all ranks to arrive, --timeout for every later collective (a dead
    # peer becomes an error, not a hang).
    with explained_rendezvous(rank, world_size, args.rendezvous_timeout):
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout),
                                device_id=device if backend == "nccl" else None,
                                **rendezvous_store(rank, world_size, args.rendezvous_timeout))
    return rank, world_size, device


def data(args, rank, world_size):
    """The training set and a loader over this rank's shard of it."""
    fetch_dataset(args, rank)  # one download per copy of --data-dir; the others wait
    dataset = build_dataset(args, download=False)
    check_dataset_fits(dataset, world_size, args.batch_size)
    # Each rank reads a disjoint 1/world_size of the data, reshuffled every epoch (the Trainer calls set_epoch).
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return dataset, build_loader(dataset, sampler, args)


def train(args, rank, world_size, device):
    """Everything after setup. multigpu.py and multinode.py run exactly this: only their processes start differently."""
    allow_tf32()
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
    dataset, loader = data(args, rank, world_size)
    model = DDP(build_model(dataset).to(device))
    if rank == 0:
        log(0, f"world size {world_size} | backend {dist.get_backend()} | device {device} | "
               f"{len(dataset)} samples | batch {args.batch_size}/rank | {len(loader)} steps/epoch")
    Trainer(model, loader, args, device, rank, world_size).train()


def main():
    args = parse_args(__doc__)
    rank, world_size, device = setup(args)
    train(args, rank, world_size, device)


if __name__ == "__main__":
    run(main)
