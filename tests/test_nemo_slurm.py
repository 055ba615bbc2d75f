"""nemo/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py).

Templates run unmodified from nemo/; the tests only shrink the shape on the sbatch command line (this machine has
2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the last
--checkpoint-dir on the command line wins over the template's). The independent jobs (every template, the
Megatron one) run side by side, two at a time; NeMo-Run's runs alone after them. multinode.sbatch on 2 nodes and
its preemption are test_slurm_preemption.py's nemo row.
"""

import os
import re
import shutil
import subprocess
from functools import partial

import pytest
from helpers import ROOT, env_python, epoch_lines
from slurm_fixtures import GLOO, LOCAL_CLUSTER, ONE_NODE, cluster_env, run_jobs, shape, template_rows
from test_nemo import last_checkpoint  # reads a NeMo checkpoint without NeMo

pytestmark = [pytest.mark.nemo, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "nemo"
TINY = ["--epochs", 2, "--dataset-size", 64, "--batch-size", 8, "--log-every", 4]


TEMPLATE_ROWS = ONE_NODE  # multinode.sbatch: test_slurm_preemption.py
MEGATRON = "test_megatron_parallel_two_nodes_tensor_parallel_across_them"


def submit_megatron(cluster, job_dir):
    output = job_dir / "job.out"
    return cluster.submit(FOLDER / "megatron_parallel.sbatch", "--tensor-model-parallel-size", 2, *GLOO, cwd=FOLDER,
                          sbatch_args=shape(2, 1), output=output, env={"PYTHON": env_python("nemo")}), output


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and of the Megatron test, run together (two at a time: every NeMo process
    spends ~20 CPU-s importing): {test name: (job, job dir)}."""
    return run_jobs(request, tmp_path_factory, {**template_rows("nemo", TEMPLATE_ROWS, *TINY),
                                                MEGATRON: partial(submit_megatron, slurm_cluster)},
                    at_once=2, timeout=300)


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, job_dir = jobs[request.node.name]
    job.assert_ok()
    assert [(e.epoch, e.metric) for e in epoch_lines(job.log)] == [(1, "acc"), (2, "acc")], job.describe()
    assert re.search(rf"^0: \[rank0\] world size {world_size} \|", job.log, re.M), job.describe()
    assert last_checkpoint(job_dir / "ckpt")["global_step"] == 2 * 64 // (8 * world_size)
    assert (job_dir / "ckpt" / "checkpoints" / "nemo-toy.nemo").exists()


def test_megatron_parallel_two_nodes_tensor_parallel_across_them(jobs):
    """srun one task per (fake) GPU on 2 nodes, TP 2: the tensor-parallel group spans the two tasks."""
    job, _ = jobs[MEGATRON]
    job.assert_ok()
    assert "0: [rank0] world size 2 = tensor 2 x pipeline 1 x data 1 | backend gloo" in job.log, job.describe()
    assert "0: [rank0] rank 1: tp [0, 1] | pp [1] | dp [1]" in job.log, job.describe()


def test_nemo_run_submits_multinode_and_the_job_completes(slurm_cluster, tmp_path):
    """launch_nemo_run.py (NeMo-Run's environment) submits multinode.py on 2 nodes x 1 task through NeMo-Run's
    SlurmExecutor and LocalTunnel -- sbatch runs on this machine, as on a login node -- and the job completes
    with the recipe's checkpoints. Slurm's client commands reach the local cluster through run.sh."""
    bin_dir = tmp_path / "bin"  # what a login node has on PATH: sbatch and friends, talking to the cluster
    bin_dir.mkdir()
    for command in ("sbatch", "squeue", "sacct", "scancel"):
        real = shutil.which(command)  # by its path: run.sh's own PATH lookup would find this wrapper again
        (bin_dir / command).write_text(f'#!/bin/sh\nexec "{LOCAL_CLUSTER / "run.sh"}" {real} "$@"\n')
        (bin_dir / command).chmod(0o755)
    ckpt, home = tmp_path / "ckpt", tmp_path / "home"  # NeMo-Run writes the job script and logs under home
    env = cluster_env(PATH=f"{bin_dir}:{os.environ['PATH']}", NEMORUN_HOME=home, COLUMNS=400)
    proc = subprocess.run([str(env_python("nemo-run")), "launch_nemo_run.py", "--nodes", "2", "--gpus-per-node", "1",
                           "--cpus-per-gpu", "1", "--time", "00:05:00", "--python", str(env_python("nemo")),
                           "--checkpoint-dir", str(ckpt), "--", *map(str, TINY), *GLOO],
                          cwd=FOLDER, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    submitted = re.search(r"^submitted Slurm job (\d+);", proc.stdout, re.M)
    assert proc.returncode == 0 and submitted, proc.stdout[-3000:] + proc.stderr[-3000:]
    job = slurm_cluster.wait(submitted[1], tmp_path / "none", timeout=240)
    logs = "".join(p.read_text(errors="replace") for p in sorted(home.rglob("*.out")))
    assert job.state == "COMPLETED" and job.exit_code == 0, f"{job.describe()}\n{logs[-6000:]}"
    assert job.info["NodeList"] == "n[1-2]" and re.search(r"\[rank0\] world size 2 \|", logs), logs[-6000:]
    assert last_checkpoint(ckpt)["global_step"] == 2 * 64 // (8 * 2)
    assert (ckpt / "checkpoints" / "nemo-toy.nemo").exists()
