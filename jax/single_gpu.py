"""Train on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
"""

from cluster import parse_args, platform_start, run, select_platform
from recipe import train


def setup(args):
    """One process, one device: nobody to find, nothing to join."""
    import jax  # here, not at the top: after cluster has quieted XLA's logs

    select_platform(args.backend)
    with platform_start(args.backend):  # the first use of a device: JAX starts CUDA here, or says why not
        return 0, 1, jax.devices()[:1]


def main():
    args = parse_args(__doc__)
    rank, world_size, devices = setup(args)
    # The same training as every other script, on a mesh of one device: nothing to shard, nothing to reduce.
    train(args, devices, rank, world_size)


if __name__ == "__main__":
    run(main)
