"""One command on one machine starts one JAX process per device: JAX's counterpart of mp.spawn.

    python multigpu.py --nprocs 2 --epochs 3 --checkpoint-dir checkpoints/spawn

JAX has no spawner of its own (and no torchrun); this script is one, in plain Python: it picks a free port for
the coordinator, starts --nprocs processes with multiprocessing, and each calls jax.distributed.initialize with
an explicit coordinator address, process count and process id, then trains exactly as multinode.py does.
(On a single GPU node a single process that drives all GPUs is JAX's other, simpler option: srun one task per
node with multinode.py.) The parent forwards SIGUSR1/SIGTERM to the workers and exits with their verdict:
0, 2 (bad input, one line) or 75 (preempted, snapshot saved).
"""

import multiprocessing
import os
import signal
import socket
import sys
import time

from common import (
    PREEMPTED_EXIT_CODE,
    Trainer,
    build_dataset,
    check_dataset_fits,
    initialize_distributed,
    log,
    make_mesh,
    parse_args,
    positive_int,
    quiet_xla_logs,
    run,
)


def worker(process_id, num_processes, port, args):
    """One JAX process: what multinode.py does, with the coordinator and the ids handed over explicitly."""
    os.environ["JAX_PROCESS_ID"] = str(process_id)  # for error lines printed before JAX knows the rank
    quiet_xla_logs()
    gpus = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    device_ids = [process_id % len(gpus)] if gpus else None  # one GPU each; on CPU each has one CPU device
    run(train, args, f"127.0.0.1:{port}", num_processes, process_id, device_ids)


def train(args, coordinator, num_processes, process_id, device_ids):
    rank, num_processes = initialize_distributed(args, coordinator, num_processes, process_id, device_ids)
    import jax

    log(rank, f"host {socket.gethostname()} | process {rank} of {num_processes} | "
              f"local devices {[d.id for d in jax.local_devices()]} | coordinator {coordinator}")
    Trainer(args, make_mesh(jax.devices()), rank, num_processes).fit()
    jax.distributed.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nprocs():
    gpus = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    return len(gpus) or 2  # no GPUs: 2 CPU processes, like the other folders


def verdict(codes):
    """The workers' exit codes -> the job's: the worst of them, 75 only if nobody failed."""
    if all(c == 0 for c in codes):
        return 0
    if 2 in codes:
        return 2
    if all(c in (0, PREEMPTED_EXIT_CODE) for c in codes):
        return PREEMPTED_EXIT_CODE
    return next(c for c in codes if c not in (0, PREEMPTED_EXIT_CODE))


def main():
    args = parse_args(__doc__, extra=lambda p: p.add_argument(
        "--nprocs", type=positive_int, default=None, help="processes to start (default: the GPUs visible, 2 without)"))
    nprocs = args.nprocs or default_nprocs()
    # Bad input is found here, once, before any worker starts: one error line, not one per process.
    check_dataset_fits(build_dataset(args), nprocs, nprocs * args.batch_size)
    port = free_port()
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold XLA's threads
    procs = [ctx.Process(target=worker, args=(i, nprocs, port, args)) for i in range(nprocs)]

    def forward(signum, frame):  # Slurm signals the whole step; a parent signalled alone passes it on
        for p in procs:
            if p.pid and p.exitcode is None:
                os.kill(p.pid, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    for p in procs:
        p.start()
    # A worker that fails early (bad input, unreachable coordinator) leaves the others waiting for it:
    # give them --timeout to notice on their own, then stop them.
    first_failure = None
    while any(p.exitcode is None for p in procs):
        time.sleep(0.2)
        failed = any(p.exitcode not in (None, 0, PREEMPTED_EXIT_CODE) for p in procs)
        if failed and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > min(args.timeout, 30):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
    sys.exit(verdict([p.exitcode for p in procs]))


if __name__ == "__main__":
    run(main)
