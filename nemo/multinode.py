"""Several nodes, one task per device, every task started by srun (see multinode.sbatch):

    sbatch --nodes 2 --ntasks-per-node 4 multinode.sbatch

Lightning's SLURMEnvironment reads the ranks from Slurm; every task runs @hydra_runner with the same overrides.
When Slurm sends SIGUSR1 before the time limit (`#SBATCH --signal=B:USR1@90`, forwarded by the job script) or
SIGTERM, every rank finishes its step, *-last.ckpt is saved and the job exits 75; multinode.sbatch then requeues
it and exp_manager (resume_if_exists) resumes from that checkpoint.
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

from cluster import init_distributed, parse_args, run, slurm_layout  # noqa: E402  (light: NeMo after the checks)


def setup(args):
    """srun started one task per device; Lightning's SLURMEnvironment reads each task's rank from Slurm's
    variables (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID), and the task joins the others at MASTER_ADDR/MASTER_PORT
    under --timeout (cluster.init_distributed); Lightning's DDP uses that process group. devices and num_nodes must
    equal the job's --ntasks-per-node and --nodes (checked: else a hang)."""
    devices, num_nodes = slurm_layout(args.cfg)  # a bad launch: one line, before NeMo's imports
    init_distributed(args.cfg)  # a busy MASTER_PORT or missing ranks: one line and exit 2, not a hang
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from recipe import ddp

    # Explicit, so that a job named "bash" or "interactive" (which turns Lightning's Slurm detection off) cannot
    # make Lightning start extra processes itself. No auto-requeue: recipe.Preemption saves at a step boundary
    # and exits 75, and the job script requeues.
    return {"devices": devices, "num_nodes": num_nodes, "strategy": ddp(args.cfg, per_node=devices),
            "plugins": [SLURMEnvironment(auto_requeue=False)]}


def main():
    args = parse_args(__doc__, extra=["--devices", "--num-nodes"])  # bad input: one line, before NeMo's imports
    launch = setup(args)
    from recipe import train

    train(args, START_TIME, **launch)


if __name__ == "__main__":
    run(main)
