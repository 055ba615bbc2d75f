"""One command on one machine starts one JAX process per device: JAX's counterpart of mp.spawn.

    python multigpu.py --nprocs 2 --epochs 3 --checkpoint-dir checkpoints/spawn

JAX has no spawner of its own (and no torchrun); cluster.spawn is one, in plain Python: it picks a free port for
the coordinator, starts --nprocs processes with multiprocessing, forwards SIGUSR1/SIGTERM to them and exits with
their verdict: 0, 2 (bad input, one line) or 75 (preempted, snapshot saved). Each process calls
jax.distributed.initialize with an explicit coordinator address, process count and process id, then trains
exactly as multinode.py does. (On a single GPU node a single process that drives all GPUs is JAX's other,
simpler option: srun one task per node with multinode.py.)
"""

from cluster import check_dataset_fits, default_nprocs, nprocs_flag, parse_args, process_gpu, run, spawn
from recipe import build_dataset, init_distributed, train


def setup(args, process_id, num_processes, coordinator):
    """One JAX process: what multinode.py does, with the coordinator and the ids handed over explicitly."""
    import jax  # here, not at the top: after cluster has quieted XLA's logs

    device_ids = process_gpu(process_id, num_processes)  # one GPU each, not all of them; on CPU one CPU device
    rank, world_size = init_distributed(args, coordinator, num_processes, process_id, device_ids)
    return rank, world_size, jax.devices()


def worker(process_id, num_processes, coordinator, args):
    rank, world_size, devices = setup(args, process_id, num_processes, coordinator)
    # The mesh spans every device of every process: the batch is split over all of them.
    train(args, devices, rank, world_size)


def main():
    args = parse_args(__doc__, extra=nprocs_flag)
    nprocs = args.nprocs or default_nprocs()
    # Bad input is found here, once, before any worker starts: one error line, not one per process.
    check_dataset_fits(build_dataset(args), nprocs, nprocs * args.batch_size)
    spawn(worker, nprocs, args)


if __name__ == "__main__":
    run(main)
