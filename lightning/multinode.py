"""Several nodes, one task per device, every task started by srun (see multinode.sbatch):

    sbatch --nodes 2 --ntasks-per-node 4 multinode.sbatch

Lightning's SLURMEnvironment reads the ranks from Slurm. When Slurm sends SIGUSR1 before the time limit
(`#SBATCH --signal=B:USR1@90`, forwarded by the job script) or SIGTERM, every rank finishes its step, a
checkpoint is saved and the job exits 75; multinode.sbatch then requeues it and the requeued job resumes from
the checkpoint with the most progress. (Lightning's own auto-requeue is off: it saves inside the signal handler
and requeues from the task, see README.md.)
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import os  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.environments import SLURMEnvironment  # noqa: E402

from cluster import init_distributed, parse_args, run  # noqa: E402
from recipe import ddp, train, trainer_options  # noqa: E402
from toolkit import RecipeError, positive_int  # noqa: E402


def add_layout(p):
    p.add_argument("--devices", type=positive_int, default=None, help="devices per node (must equal --ntasks-per-node)")
    p.add_argument("--num-nodes", type=positive_int, default=None)


def slurm_layout(args) -> tuple[int, int]:
    """(devices, num_nodes) from the job. Lightning's devices must equal --ntasks-per-node and its num_nodes
    --nodes; a mismatch is the classic hang at "Initializing distributed", so stop with a clear message."""
    env = os.environ
    if "SLURM_NTASKS" not in env:
        raise RecipeError("SLURM_NTASKS not set: multinode.py runs one task per device started by srun: submit "
                          "multinode.sbatch, or run `srun python multinode.py` inside an allocation")
    if "SLURM_STEP_ID" not in env and int(env["SLURM_NTASKS"]) > 1:
        # The batch script itself has the job's SLURM_NTASKS but no step: Lightning would wait forever for
        # the other SLURM_NTASKS - 1 processes.
        raise RecipeError(f"multinode.py was started without srun, as 1 process of a {env['SLURM_NTASKS']}-task "
                          "job: it would wait forever for the others. Start it with `srun python multinode.py` "
                          "(see multinode.sbatch)")
    if "SLURM_NTASKS_PER_NODE" not in env:
        raise RecipeError("SLURM_NTASKS_PER_NODE not set: set `#SBATCH --ntasks-per-node` (= devices per node); "
                          "Lightning needs it (--ntasks alone is not enough)")
    per_node, nodes = int(env["SLURM_NTASKS_PER_NODE"]), int(env["SLURM_NNODES"])
    problems = []
    if args.devices is not None and args.devices != per_node:
        problems.append(f"--devices {args.devices} but the job has --ntasks-per-node={per_node}")
    if args.num_nodes is not None and args.num_nodes != nodes:
        problems.append(f"--num-nodes {args.num_nodes} but the job has --nodes={nodes}")
    if problems:  # one message (rank 0's), not one per task
        raise RecipeError("; ".join(problems) + ". Lightning needs one Slurm task per device: make "
                          "--ntasks-per-node equal the devices per node, or drop --devices/--num-nodes.",
                          every_rank=False)
    return per_node, nodes


def setup(args):
    """srun started this process, one task per device: it joins the others under --timeout
    (cluster.init_distributed), with the ranks Lightning's SLURMEnvironment takes from Slurm."""
    devices, num_nodes = slurm_layout(args)
    init_distributed(args)  # a busy MASTER_PORT or missing ranks: one line and exit 2, not a hang
    return pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=devices,
        num_nodes=num_nodes,
        strategy=ddp(args, per_node=devices),  # the GPUs init_distributed chose
        # Explicit, so that a job named "bash" or "interactive" (which turns Lightning's Slurm detection off)
        # cannot make Lightning start extra processes itself. No auto-requeue: recipe.Preemption saves at a step
        # boundary and exits 75, and the job script requeues.
        plugins=[SLURMEnvironment(auto_requeue=False)],
        **trainer_options(args, START_TIME),
    )


def main():
    args = parse_args(__doc__, extra=add_layout)
    trainer = setup(args)
    train(args, trainer)


if __name__ == "__main__":
    run(main)
