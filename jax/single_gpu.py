"""Train on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
"""

from common import Trainer, make_mesh, parse_args, quiet_xla_logs, run, select_platform


def setup_device(args):
    import jax  # imported after quiet_xla_logs(): XLA reads its logging settings once, at import

    select_platform(args.backend)
    return 0, 1, jax.devices()[:1]


def main():
    args = parse_args(__doc__)
    quiet_xla_logs()
    rank, num_processes, devices = setup_device(args)
    # The same Trainer as every other script, on a mesh of one device: nothing to shard, nothing to reduce.
    Trainer(args, make_mesh(devices), rank, num_processes).fit()


if __name__ == "__main__":
    run(main)
