"""Train with DeepSpeed, one process per GPU, started by torchrun or by DeepSpeed's own launcher.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ds
    deepspeed --num_gpus 2 --master_port 29512 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ds

Both launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process (`deepspeed`
also appends --local_rank=N to the arguments; its default port is a fixed 29500, hence --master_port).
"""

from cluster import init_distributed, launch_env, parse_args, pick_device, run
from recipe import prepare, train


def setup(args):
    """The launcher started this process and set its rank and the rendezvous address in the environment."""
    rank, local_rank, world_size = launch_env(
        "launch with `torchrun --nproc_per_node N multigpu_torchrun.py` or `deepspeed --num_gpus N "
        "multigpu_torchrun.py`")
    device = pick_device(local_rank)
    inputs = prepare(args, world_size, device)
    init_distributed(args, rank, world_size)
    return rank, world_size, device, inputs


def main():
    args = parse_args(__doc__)
    rank, world_size, device, inputs = setup(args)
    train(args, inputs, rank, world_size, device)


if __name__ == "__main__":
    run(main)
