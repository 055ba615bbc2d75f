"""Several nodes, one task per device, every task started by srun (see multinode.sbatch):

    sbatch --nodes 2 --ntasks-per-node 4 multinode.sbatch

Lightning's SLURMEnvironment reads the ranks from Slurm; every task runs @hydra_runner with the same overrides.
When Slurm sends SIGUSR1 before the time limit (`#SBATCH --signal=B:USR1@90`, forwarded by the job script) or
SIGTERM, every rank finishes its step, *-last.ckpt is saved and the job exits 75; multinode.sbatch then requeues
it and exp_manager (resume_if_exists) resumes from that checkpoint.
"""

import time

START_TIME = time.time()  # before the heavy imports: the benchmarks count them in the time to first step

import os  # noqa: E402
import sys  # noqa: E402

import cli  # noqa: E402


def slurm_layout(cfg) -> tuple[int, int]:
    """(devices, num_nodes) from the job. Lightning's devices must equal --ntasks-per-node and its num_nodes
    --nodes; a mismatch is the classic hang at "Initializing distributed", so stop with a clear message."""
    env = os.environ
    if "SLURM_NTASKS" not in env:
        cli.fail("SLURM_NTASKS not set: multinode.py runs one task per device started by srun: submit "
                 "multinode.sbatch, or run `srun python multinode.py` inside an allocation")
    if "SLURM_STEP_ID" not in env and int(env["SLURM_NTASKS"]) > 1:
        cli.fail(f"multinode.py was started without srun, as 1 process of a {env['SLURM_NTASKS']}-task "
                 "job: it would wait forever for the others. Start it with `srun python multinode.py` "
                 "(see multinode.sbatch)")
    if "SLURM_NTASKS_PER_NODE" not in env:
        cli.fail("SLURM_NTASKS_PER_NODE not set: set `#SBATCH --ntasks-per-node` (= devices per node); "
                 "Lightning needs it (--ntasks alone is not enough)")
    per_node, nodes = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0]), int(env["SLURM_NNODES"])
    problems = []
    if cfg.trainer.devices is not None and cfg.trainer.devices != per_node:
        problems.append(f"trainer.devices (--devices) {cfg.trainer.devices} but the job has "
                        f"--ntasks-per-node={per_node}")
    if cfg.trainer.num_nodes is not None and cfg.trainer.num_nodes != nodes:
        problems.append(f"trainer.num_nodes (--num-nodes) {cfg.trainer.num_nodes} but the job has --nodes={nodes}")
    if problems:
        if env.get("SLURM_PROCID", "0") == "0":  # one message, not one per task
            print("[rank0] error: " + "; ".join(problems) + ". Lightning needs one Slurm task per device: make "
                  "--ntasks-per-node equal the devices per node, or drop --devices/--num-nodes.",
                  file=sys.stderr, flush=True)
        sys.exit(2)
    return per_node, nodes


if __name__ == "__main__":
    # The flags, overrides and launch, checked now: bad input fails in a second, not after NeMo's imports below.
    OVERRIDES, CFG = cli.command_line(__doc__, num_nodes=True)
    DEVICES, NUM_NODES = slurm_layout(CFG)

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.plugins.environments import SLURMEnvironment  # noqa: E402
from nemo.core.config import hydra_runner  # noqa: E402

import common  # noqa: E402


@hydra_runner(config_path="conf", config_name="config")
def main(cfg):
    trainer = pl.Trainer(
        devices=DEVICES,
        num_nodes=NUM_NODES,
        strategy=common.ddp(cfg),
        # Explicit, so that a job named "bash" or "interactive" (which turns Lightning's Slurm detection off)
        # cannot make Lightning start extra processes itself. No auto-requeue: common.Preemption saves at a step
        # boundary and exits 75, and the job script requeues.
        plugins=[SLURMEnvironment(auto_requeue=False)],
        **common.trainer_options(cfg, START_TIME),
    )
    common.fit(trainer, cfg)


if __name__ == "__main__":
    cli.run(main, OVERRIDES)
