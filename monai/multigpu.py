"""Train a 3-D UNet with DistributedDataParallel on one node: this process spawns one worker per GPU (mp.spawn).

    python multigpu.py --epochs 3 --batch-size 2 --checkpoint-dir checkpoints/spawn     # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3 --batch-size 2                               # CPU: 2 gloo workers

No launcher is involved: the parent picks the world size, hosts the rendezvous store and gives each worker
its rank. That is simple on one node; across nodes, use torchrun or srun (multinode.py).
"""

import os
import signal
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster import Ranks, check_dataset_fits, parse_args, pick_device, prepare_data, read_task, run
from recipe import init_distributed, train
from toolkit import PREEMPTED_EXIT_CODE, RecipeError, positive_int


def setup(args, rank, world_size, port):
    """One worker per device; it joins the process group through the store the parent hosts (see main)."""
    device = pick_device(rank)
    # Connect to the store the parent process is hosting instead of a fixed MASTER_PORT.
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=args.timeout))
    init_distributed(args, rank, world_size, device, store=store)
    return Ranks(rank, rank, world_size, device, distributed=True)  # train() wraps the model in DDP


def worker(rank, world_size, port, args):
    """What each spawned process runs (mp.spawn passes the rank first): setup, then the same train() as everywhere."""
    run(lambda: train(args, setup(args, rank, world_size, port)), rank=rank)


def check_input(args, world_size):
    """Bad data is found here, once, before any worker starts: one error line instead of one per worker."""
    train_cases = read_task(prepare_data(args, Ranks()))[0]
    check_dataset_fits(train_cases, world_size, args.batch_size)


def add_nprocs(parser):
    parser.add_argument("--nprocs", type=positive_int, default=None,
                        help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")


def main():
    args = parse_args(__doc__, extra=add_nprocs)
    world_size = args.nprocs or torch.cuda.device_count() or 2
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise RecipeError(f"--nprocs {world_size} but only {torch.cuda.device_count()} GPUs are visible")
    check_input(args, world_size)
    # The parent hosts the rendezvous store on a port the OS picks (port 0) and keeps it open while the
    # workers run: no fixed 12355 to collide with another job, and no window between "find a free port" and
    # "bind it" in which someone else can take it.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=args.timeout))
    workers = mp.spawn(worker, args=(world_size, store.port, args), nprocs=world_size, join=False)

    def forward(signum, frame):  # a signal sent to this process only (`kill`, sbatch's B:) reaches the workers
        for p in workers.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        while not workers.join():
            pass
    except mp.ProcessExitedException as e:  # the worker printed its own error; mp.spawn stopped the others
        if e.exit_code in (2, PREEMPTED_EXIT_CODE):
            raise SystemExit(e.exit_code) from None
        raise RecipeError(f"worker {e.error_index} exited with code {e.exit_code}; "
                          "the other workers were stopped") from None


if __name__ == "__main__":  # required: the spawned workers re-import this file
    run(main)
