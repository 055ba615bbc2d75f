"""Train with DeepSpeed, one process per GPU, started by torchrun or by DeepSpeed's own launcher.

    torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ds
    deepspeed --num_gpus 2 --master_port 29512 multigpu_torchrun.py --epochs 3 --checkpoint-dir checkpoints/ds

Both launchers set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process (`deepspeed`
also appends --local_rank=N to the arguments; its default port is a fixed 29500, hence --master_port).
"""


from common import (
    init_deepspeed_distributed,
    launch_env,
    pick_device,
    prepare,
    recipe_main,
    run,
)


def setup_distributed(args):
    rank, local_rank, world_size = launch_env(
        "launch with `torchrun --nproc_per_node N multigpu_torchrun.py` or `deepspeed --num_gpus N "
        "multigpu_torchrun.py`")
    device = pick_device(local_rank)
    inputs = prepare(args, world_size, device)
    init_deepspeed_distributed(args, rank, world_size)
    return rank, world_size, device, inputs


if __name__ == "__main__":
    run(recipe_main, setup_distributed, __doc__)
