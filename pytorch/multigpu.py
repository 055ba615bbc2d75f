"""Train with DistributedDataParallel on one node: this process spawns one worker per GPU (mp.spawn).

    python multigpu.py --epochs 3 --checkpoint-dir checkpoints/spawn            # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3                                      # CPU: 2 gloo workers

No launcher is involved: the parent picks the world size, hosts the rendezvous store and gives each worker
its rank. That is simple on one node; across nodes, use torchrun or srun (multinode.py). The training itself
is recipe.train, as in every script: only the way the processes start differs.
"""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster import parse_args, pick_backend, run
from recipe import train
from toolkit import PREEMPTED_EXIT_CODE, RecipeError, positive_int


def setup(args, rank, world_size, port):
    """Join the process group through the store the parent hosts (see main) instead of a fixed MASTER_PORT."""
    if torch.cuda.is_available():
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = pick_backend(args.backend)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=timedelta(seconds=args.rendezvous_timeout))
    # The timeout bounds every later collective: a dead peer becomes an error, not a hang.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout), device_id=device if backend == "nccl" else None)
    return device


def worker(rank, world_size, port, args):
    """What each spawned process runs (mp.spawn passes the rank first): setup, then the train() of every script."""
    run(lambda: train(args, setup(args, rank, world_size, port), rank, world_size), rank=rank)


def add_nprocs(parser):
    parser.add_argument("--nprocs", type=positive_int, default=None,
                        help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")


def main():
    args = parse_args(__doc__, extra=add_nprocs)
    world_size = args.nprocs or torch.cuda.device_count() or 2
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise RecipeError(f"--nprocs {world_size} but only {torch.cuda.device_count()} GPUs are visible")
    # The parent hosts the rendezvous store on a port the OS picks (port 0) and keeps it open while the
    # workers run: no fixed 12355 to collide with another job, and no window between "find a free port" and
    # "bind it" in which someone else can take it.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=args.rendezvous_timeout))
    try:
        mp.spawn(worker, args=(world_size, store.port, args), nprocs=world_size, join=True)
    except mp.ProcessExitedException as e:  # the worker printed its own error; mp.spawn stopped the others
        if e.exit_code == PREEMPTED_EXIT_CODE:  # the workers saved a snapshot: the job script requeues
            sys.exit(PREEMPTED_EXIT_CODE)
        raise RecipeError(f"worker {e.error_index} exited with code {e.exit_code}; "
                          "the other workers were stopped") from None


if __name__ == "__main__":  # required: the spawned workers re-import this file
    run(main)
