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
import sys  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.environments import SLURMEnvironment  # noqa: E402

import common  # noqa: E402


def slurm_layout(args) -> tuple[int, int]:
    """(devices, num_nodes) from the job. Lightning's devices must equal --ntasks-per-node and its num_nodes
    --nodes; a mismatch is the classic hang at "Initializing distributed", so stop with a clear message."""
    env = os.environ
    if "SLURM_NTASKS" not in env:
        common.fail("SLURM_NTASKS not set: multinode.py runs one task per device started by srun: submit "
                    "multinode.sbatch, or run `srun python multinode.py` inside an allocation")
    if "SLURM_STEP_ID" not in env and int(env["SLURM_NTASKS"]) > 1:
        # The batch script itself has the job's SLURM_NTASKS but no step: Lightning would wait forever for
        # the other SLURM_NTASKS - 1 processes.
        common.fail(f"multinode.py was started without srun, as 1 process of a {env['SLURM_NTASKS']}-task "
                    "job: it would wait forever for the others. Start it with `srun python multinode.py` "
                    "(see multinode.sbatch)")
    if "SLURM_NTASKS_PER_NODE" not in env:
        common.fail("SLURM_NTASKS_PER_NODE not set: set `#SBATCH --ntasks-per-node` (= devices per node); "
                    "Lightning needs it (--ntasks alone is not enough)")
    per_node, nodes = int(env["SLURM_NTASKS_PER_NODE"]), int(env["SLURM_NNODES"])
    problems = []
    if args.devices is not None and args.devices != per_node:
        problems.append(f"--devices {args.devices} but the job has --ntasks-per-node={per_node}")
    if args.num_nodes is not None and args.num_nodes != nodes:
        problems.append(f"--num-nodes {args.num_nodes} but the job has --nodes={nodes}")
    if problems:
        if env.get("SLURM_PROCID", "0") == "0":  # one message, not one per task
            print("[rank0] error: " + "; ".join(problems) + ". Lightning needs one Slurm task per device: make "
                  "--ntasks-per-node equal the devices per node, or drop --devices/--num-nodes.",
                  file=sys.stderr, flush=True)
        sys.exit(2)
    return per_node, nodes


def main():
    args = common.parse_args(__doc__, num_nodes=True)
    devices, num_nodes = slurm_layout(args)
    trainer = pl.Trainer(
        accelerator="auto",  # CUDA -> nccl, else CPU -> gloo
        devices=devices,
        num_nodes=num_nodes,
        strategy=common.ddp(args),
        # Explicit, so that a job named "bash" or "interactive" (which turns Lightning's Slurm detection off)
        # cannot make Lightning start extra processes itself. No auto-requeue: common.Preemption saves at a step
        # boundary and exits 75, and the job script requeues.
        plugins=[SLURMEnvironment(auto_requeue=False)],
        **common.trainer_options(args, START_TIME),
    )
    common.fit(trainer, args)


if __name__ == "__main__":
    main()
