"""One process, one device: a GPU when there is one, else the CPU. A NeMo script: @hydra_runner composes
conf/config.yaml with the overrides on the command line; the contract's flags are overrides too.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/run1
    python single_gpu.py trainer.max_epochs=3 model.optim.lr=0.1 exp_manager.explicit_log_dir=checkpoints/run1
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

from cluster import parse_args, run  # noqa: E402  (light: NeMo is imported once the command line is checked)


def setup(args):
    """One process on one device: nothing to join; Lightning's Trainer is told to use one device."""
    return {"devices": 1}


def main():
    args = parse_args(__doc__)  # bad input fails here, in a second, not after NeMo's imports (several seconds)
    launch = setup(args)
    from recipe import train

    train(args, START_TIME, **launch)


if __name__ == "__main__":
    run(main)
