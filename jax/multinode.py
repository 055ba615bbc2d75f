"""Train data-parallel across processes and nodes with jax.distributed, launched either way Slurm clusters do it:

    srun python multinode.py ...     # one task per GPU, or one task per node that drives all of its GPUs

Under srun, jax.distributed.initialize() detects Slurm by itself: the process id from SLURM_PROCID, the number
of processes from SLURM_NTASKS, the coordinator on the first node of SLURM_STEP_NODELIST -- at the port in
JAX_COORDINATOR_PORT (the job script derives it from the job id; JAX's own default sits in the ephemeral range).
Anywhere else, name the coordinator and the process explicitly (two shells, or two machines):

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python multinode.py ...
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python multinode.py ...

On SIGUSR1 or SIGTERM every process finishes the step it is on, they save a snapshot (Orbax), and the job exits
with 75 so its script can requeue it.
"""

from cluster import launch_plan, parse_args, run
from recipe import init_distributed, train


def setup(args):
    """Under srun JAX finds the coordinator and this process's id itself (Slurm detection); elsewhere they come
    from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (cluster.launch_plan)."""
    import jax  # here, not at the top: after cluster has quieted XLA's logs

    coordinator, num_processes, process_id, device_ids = launch_plan()
    rank, world_size = init_distributed(args, coordinator, num_processes, process_id, device_ids)
    return rank, world_size, jax.devices()


def main():
    args = parse_args(__doc__)
    rank, world_size, devices = setup(args)
    # The mesh spans every device of every process: the batch is split over all of them.
    train(args, devices, rank, world_size)


if __name__ == "__main__":
    run(main)
