"""Train with DistributedDataParallel, one process per GPU, launched by torchrun.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ddp

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE for every process. Resuming from --checkpoint-dir is automatic:
a restarted job (requeued, resubmitted, torchrun --max-restarts) continues from its last snapshot.
"""

import torch

from cluster import parse_args, run, torchrun_env
from recipe import init_distributed, train


def setup(args):
    """Join the process group: one process per device, ranks from torchrun's variables."""
    rank, local_rank, world_size = torchrun_env()  # set by torchrun for every process it starts
    if torch.cuda.is_available():
        # With --gpus-per-task each process may see only one device (always "cuda:0").
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    init_distributed(args, rank, world_size, device)  # init_process_group at MASTER_ADDR:MASTER_PORT
    return rank, world_size, device


def main():
    args = parse_args(__doc__)
    rank, world_size, device = setup(args)
    # The same train() as single_gpu.py: with a process group it wraps the model in DDP, and each rank reads
    # its own shard of the data (DistributedSampler over world_size ranks).
    train(args, device, rank, world_size)


if __name__ == "__main__":
    run(main)
