"""Every framework folder's launch, as data: what the behavioural tests over all folders (test_behaviour.py) and
the per-folder tests start. A new folder adds a row to RECIPES and gets those tests with no other edit.

    RECIPES[folder].srun(args, n, port)     n processes started as `srun python multinode.py` starts them
    wait_all(procs, timeout)                 their exit codes and outputs, or a test failure naming the hang
"""

import subprocess
import time
from dataclasses import dataclass, field

import pytest
from helpers import ROOT, clean_env, env_python, with_teardown_check


@dataclass(frozen=True)
class Recipe:
    folder: str
    small: tuple = ()  # a few seconds of training
    env: dict = field(default_factory=dict)  # what this folder's tests set besides Slurm's variables
    teardown_check: bool = False  # the folder's processes report their DDP models at destroy_process_group

    def srun(self, args=(), n=2, port=0, *, extra_env=None, drop=(), cwd=None, stderr_apart=False):
        """Start n processes as `srun python multinode.py` does: one task each, Slurm's variables only (no RANK),
        MASTER_ADDR/MASTER_PORT from the job script."""
        procs = []
        for rank in range(n):
            variables = dict(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=n, SLURM_NPROCS=n, SLURM_NNODES=1,
                             SLURM_NTASKS_PER_NODE=n, SLURM_NODEID=0, SLURM_STEP_ID=0, SLURM_NODELIST="localhost",
                             SLURM_JOB_ID=4242, SLURM_JOB_NAME=f"{self.folder}-test",
                             SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                             **self.env, **(extra_env or {}))
            env = clean_env(**{k: v for k, v in variables.items() if k not in drop})
            env = with_teardown_check(env) if self.teardown_check else env
            procs.append(subprocess.Popen(
                [str(env_python(self.folder)), "multinode.py", *map(str, args)], env=env,
                cwd=cwd or ROOT / self.folder, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT, text=True, start_new_session=True))
        return procs


RECIPES = {r.folder: r for r in [
    Recipe("pytorch", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"), teardown_check=True),
    Recipe("lightning", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000")),
    Recipe("monai", ("--epochs", "2", "--dataset-size", "8", "--roi-size", "16", "--log-every", "1"),
           teardown_check=True),
    Recipe("modulus", ("--epochs", "2", "--dataset-size", "128", "--log-every", "1"), teardown_check=True),
    Recipe("deepspeed", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000")),
    Recipe("nemo", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000")),
]}


def wait_all(procs, timeout=180):
    """(exit codes, outputs) of every process; a process still running after `timeout` s is a failure (all are
    killed): a hang must never stall the suite. With stderr kept apart an output is (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outs.append(out if err is None else (out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"processes still running after {timeout}s: {[p.args for p in procs]}")
    return [p.returncode for p in procs], outs
