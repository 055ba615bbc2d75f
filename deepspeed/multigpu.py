"""Train with DeepSpeed on one node: this process spawns one worker per GPU (mp.spawn).

    python multigpu.py --epochs 3 --checkpoint-dir checkpoints/spawn            # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3                                      # CPU: 2 gloo workers

No launcher is involved: the parent picks the world size, hosts the rendezvous store and gives each worker its
rank; DeepSpeed then uses the process group the worker made. Simple on one node; across nodes, use torchrun,
srun or the deepspeed launcher (multinode.py).
"""

import gc
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster import (bound_deepspeed_groups, explained_rendezvous, import_deepspeed, parse_args, pick_backend,
                     pick_device, run)
from recipe import prepare, train
from toolkit import PREEMPTED_EXIT_CODE, RecipeError, positive_int


def setup(rank, world_size, port, args):
    """A spawned worker joins the others through the store its parent hosts (see main), not a fixed port."""
    device = pick_device(rank)  # and LOCAL_RANK, which DeepSpeed reads
    import_deepspeed()
    with explained_rendezvous(rank, world_size, args.timeout):
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=args.timeout))
        dist.init_process_group(pick_backend(args.backend), store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=args.timeout))
    bound_deepspeed_groups(args.timeout)  # ZeRO's own groups too
    return device


def worker(rank, world_size, port, args, inputs):
    """What each spawned process runs; mp.spawn passes the rank as the first argument."""
    run(spawned_main, rank, world_size, port, args, inputs, rank=rank)


def spawned_main(rank, world_size, port, args, inputs):
    device = setup(rank, world_size, port, args)
    try:
        train(args, inputs, rank, world_size, device)
    except SystemExit as e:  # preempted (75) or bad input (2)
        code = e.code
    else:
        return
    # A spawned process exits through multiprocessing, which SIGTERMs its daemonic children -- the DataLoader
    # workers, which ignore SIGTERM (Slurm's) -- and joins them: it hung. The exit's traceback kept the trainer,
    # and with it the loader that stops its workers, alive: freed first (gc: DeepSpeed's engine holds cycles).
    gc.collect()
    sys.exit(code)


def add_nprocs(parser):
    parser.add_argument("--nprocs", type=positive_int, default=None,
                        help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")


def main():
    args = parse_args(__doc__, extra=add_nprocs)
    world_size = args.nprocs or torch.cuda.device_count() or 2
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise RecipeError(f"--nprocs {world_size} but only {torch.cuda.device_count()} GPUs are visible")
    # Checked here, before any worker starts; the workers receive the config and the dataset with their arguments.
    inputs = prepare(args, world_size, pick_device(0))
    # The parent hosts the rendezvous store on a port the OS picks (port 0) and keeps it open while the workers
    # run: no fixed 12355 to collide with another job, and no window in which someone else can take the port.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=args.timeout))
    workers = mp.start_processes(worker, args=(world_size, store.port, args, inputs), nprocs=world_size,
                                 join=False, start_method="spawn")

    def forward(signum, frame):  # a signal sent to this process alone still reaches the workers, which decide
        for p in workers.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    try:
        while not workers.join():
            pass
    except mp.ProcessExitedException as e:  # the worker printed its own line; mp.spawn stopped the others
        if e.exit_code in (2, PREEMPTED_EXIT_CODE):
            sys.exit(e.exit_code)
        raise RecipeError(f"worker {e.error_index} exited with code {e.exit_code}; the others were stopped") \
            from None


if __name__ == "__main__":
    run(main)
