"""Train on one machine with N Ray Train workers: Ray plays the role of mp.spawn.

    python multigpu.py --epochs 3 --checkpoint-dir checkpoints/spawn            # one worker per visible GPU
    python multigpu.py --nprocs 2 --epochs 3                                      # CPU: 2 gloo workers

ray.init() starts a one-node Ray cluster owned by this process (a GCS, a raylet, worker processes); the
TorchTrainer starts --nprocs workers on it, each of which gets its rank, joins the process group Ray sets up
(gloo or nccl) and runs the same loop as single_gpu.py. This process is the *driver*: it prints the workers'
lines, and on SIGUSR1/SIGTERM tells them to stop after a snapshot, then exits 75. When it ends, ray.shutdown()
ends every Ray process it started, and nothing else.
"""

import contextlib

import torch

from cluster import add_ray_flags, check_dataset_fits, local_ray, parse_args, run
from recipe import build_dataset, train
from toolkit import RecipeError, positive_int


def add_flags(parser):
    parser.add_argument("--nprocs", type=positive_int, default=None,
                        help="Ray Train workers (default: one per visible GPU; 2 on a machine without CUDA)")
    add_ray_flags(parser)


@contextlib.contextmanager
def setup(args):
    """A one-node Ray cluster owned by this process, for the duration of the `with`; yields the worker count."""
    nprocs = args.nprocs or torch.cuda.device_count() or 2
    if torch.cuda.is_available() and nprocs > torch.cuda.device_count():
        raise RecipeError(f"--nprocs {nprocs} but only {torch.cuda.device_count()} GPUs are visible")
    check_dataset_fits(build_dataset(args), nprocs, args.batch_size)  # before Ray starts: bad input fails fast
    with local_ray(num_cpus=nprocs):  # one CPU per worker: Ray schedules exactly --nprocs of them
        yield nprocs


def main():
    args = parse_args(__doc__, extra=add_flags)
    with setup(args) as workers:
        train(args, workers=workers)


if __name__ == "__main__":
    run(main)
