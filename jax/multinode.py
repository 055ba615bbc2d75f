"""Train data-parallel across processes and nodes with jax.distributed, launched either way Slurm clusters do it:

    srun python multinode.py ...     # one task per GPU, or one task per node that drives all of its GPUs

Under srun, jax.distributed.initialize() detects Slurm by itself: the process id from SLURM_PROCID, the number
of processes from SLURM_NTASKS, the coordinator on the first node of SLURM_STEP_NODELIST -- at the port in
JAX_COORDINATOR_PORT (the job script derives it from the job id; JAX's own default sits in the ephemeral range).
Anywhere else, name the coordinator and the process explicitly (two shells, or two machines):

    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python multinode.py ...
    JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python multinode.py ...

On SIGUSR1 or SIGTERM every process finishes the step it is on, rank 0 saves a snapshot, and the job exits
with 75 so its script can requeue it.
"""

import os
import socket

from common import RecipeError, Trainer, initialize_distributed, log, make_mesh, parse_args, quiet_xla_logs, run

EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def first_host(nodelist):
    """n[01-04],m7 -> n01: the first node of a Slurm host list, where process 0 runs the coordinator."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0] + "]"
    if "[" not in head:
        return head
    prefix, ranges = head[:-1].split("[")
    return prefix + ranges.split(",")[0].split("-")[0]


def local_device_ids():
    """Which of this node's GPUs this process drives, or None to let JAX pick (GPU number SLURM_LOCALID).

    One task per node: all of them. One GPU visible to this task (srun --gpus-per-task, --gpu-bind): that one,
    whatever SLURM_LOCALID says -- JAX's default would ask task 3 for a GPU 3 it cannot see.
    """
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    tasks_here = int(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    if visible and tasks_here == 1:
        return list(range(len(visible)))
    if len(visible) == 1:
        return [0]
    return None


def launch_plan():
    """(coordinator address, number of processes, process id, local device ids) from the launcher's variables."""
    if all(n in os.environ for n in EXPLICIT):
        try:
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise RecipeError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers") from None
        if not 0 <= process_id < num_processes:
            raise RecipeError(f"JAX_PROCESS_ID {process_id} is not in 0..{num_processes - 1} (JAX_NUM_PROCESSES)")
        return os.environ["JAX_COORDINATOR_ADDRESS"], num_processes, process_id, None
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        # Under srun: JAX's Slurm detection fills in process id and count. These are per-task values, read here
        # in each task -- expanded once in the batch script they would make every task process 0.
        port = os.environ.get("JAX_COORDINATOR_PORT")
        if not port:
            raise RecipeError("JAX_COORDINATOR_PORT not set: in the job script, export "
                              "JAX_COORDINATOR_PORT=$((15000 + SLURM_JOB_ID % 15000)) (JAX's own default, "
                              "61440 + job id % 4096, lies in the ephemeral range and collides now and then)")
        address = f"{first_host(os.environ['SLURM_STEP_NODELIST'])}:{port}"
        return address, None, None, local_device_ids()
    present = [n for n in EXPLICIT if n in os.environ]
    raise RecipeError(f"{', '.join(n for n in EXPLICIT if n not in present)} not set: start multinode.py with srun "
                      f"inside a Slurm job, or set all of {', '.join(EXPLICIT)} (multigpu.py does that for "
                      f"you on one machine)")


def setup_distributed(args):
    address, num_processes, process_id, device_ids = launch_plan()
    rank, num_processes = initialize_distributed(args, address, num_processes, process_id, device_ids)
    import jax

    return rank, num_processes, jax.devices(), address


def main():
    args = parse_args(__doc__)
    quiet_xla_logs()
    rank, num_processes, devices, coordinator = setup_distributed(args)
    import jax

    # One line per process: where each one landed is the first question when a multi-node job misbehaves.
    log(rank, f"host {socket.gethostname()} | process {rank} of {num_processes} | "
              f"local devices {[d.id for d in jax.local_devices()]} | coordinator {coordinator}")
    # The mesh spans every device of every process: the batch is split over all of them.
    Trainer(args, make_mesh(devices), rank, num_processes).fit()
    jax.distributed.shutdown()


if __name__ == "__main__":
    run(main)
