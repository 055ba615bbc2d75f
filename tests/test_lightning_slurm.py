"""lightning/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py).

Templates run unmodified from lightning/; the tests only shrink the shape on the sbatch command line (this
machine has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the
last --checkpoint-dir on the command line wins over the template's). The independent jobs (every template, the
fail-fast ones) run side by side, a few at a time; the preempted spawn job runs alone after them. multinode.sbatch
on 2 nodes and its preemption (SIGTERM to every process of the step) are test_slurm_preemption.py's lightning row.
"""

import re
from functools import partial

import pytest
import torch
from helpers import ROOT, env_python, epoch_lines
from slurm_fixtures import GLOO, ONE_NODE, requeued_once, run_jobs, shape, template_job, template_rows

pytestmark = [pytest.mark.lightning, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "lightning"
TINY = ["--epochs", 2, "--dataset-size", 256, "--batch-size", 32, "--log-every", 4]
# The spawn template preempted: 2 ranks x 32 = 64 samples per step, 4096 samples -> 64 steps per epoch, 192 in all.
LONG = ["--epochs", 3, "--dataset-size", 4096, "--batch-size", 32, "--log-every", 16]
LONG_STEPS = 192


def checkpoint(directory):
    path = directory / "last.ckpt"
    assert path.exists(), f"no last.ckpt in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def world_size_of(log):
    return int(re.search(r"^0: \[rank0\] world size (\d+) \|", log, re.M).group(1))


NO_SRUN_JOB = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:02:00
set -euo pipefail
"$PYTHON" multinode.py "$@"
"""
# multinode.sbatch: test_slurm_preemption.py (2 nodes straight through, 1 node x 2 tasks preempted)
TEMPLATE_ROWS = ONE_NODE


def submit_no_srun(cluster, job_dir):
    job_script = job_dir / "no_srun.sbatch"
    job_script.write_text(NO_SRUN_JOB)
    output = job_dir / "job.out"
    return cluster.submit(job_script, *TINY, *GLOO, "--checkpoint-dir", job_dir / "ckpt", cwd=FOLDER, output=output,
                          env={"PYTHON": env_python("lightning")}), output


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and of the two fail-fast tests, run together: {test name: (job, job
    dir)}."""
    return run_jobs(request, tmp_path_factory, {
        **template_rows("lightning", TEMPLATE_ROWS, *TINY),
        "test_devices_mismatch_fails_fast_with_a_clear_error": template_job(
            "lightning", "multinode.sbatch", shape(1, 2), *TINY, "--devices", 1),
        "test_missing_srun_fails_fast_with_a_clear_error": partial(submit_no_srun, slurm_cluster)})


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, job_dir = jobs[request.node.name]
    job.assert_ok()
    assert [(e.epoch, e.metric) for e in epoch_lines(job.log)] == [(1, "acc"), (2, "acc")], job.describe()
    assert world_size_of(job.log) == world_size, job.describe()
    assert checkpoint(job_dir / "ckpt")["global_step"] == 2 * 256 // (32 * world_size)


def test_devices_mismatch_fails_fast_with_a_clear_error(jobs, request):
    """--devices 1 under --ntasks-per-node=2: the job fails at once with one clear line, it does not hang."""
    job, _ = jobs[request.node.name]
    assert job.state == "FAILED", job.describe()
    assert "error: --devices 1 but the job has --ntasks-per-node=2" in job.log, job.describe()
    assert "Traceback" not in job.log, job.describe()


def test_missing_srun_fails_fast_with_a_clear_error(jobs, request):
    """The classic Lightning hang: python in the batch shell of a 2-task job, without srun (NO_SRUN_JOB). Lightning
    alone would wait for the second process until its 30-minute timeout; multinode.py stops at once."""
    job, _ = jobs[request.node.name]
    assert job.state == "FAILED", job.describe()
    assert "error: multinode.py was started without srun, as 1 process of a 2-task job" in job.log, job.describe()
    assert "Traceback" not in job.log, job.describe()


def test_spawn_template_preempted_requeues_and_resumes(slurm_cluster, tmp_path):
    """#27: multigpu.sbatch (Lightning's ddp_spawn) had no --signal and no requeue. Preempted now, it saves, exits
    75, is requeued and resumes. Two bugs this found: multiprocessing's resource tracker (started by the spawn)
    died of Slurm's USR1 and came back with KeyError tracebacks; the spawn parent, which never trains, said
    "preempted at step 0" (the step now comes back from the workers in callback_metrics)."""
    events = {}
    job, ckpt = slurm_cluster.recipe("lightning", "multigpu.sbatch", tmp_path, shape(1, 1, gpus_per_node=2, cpus=2),
                                     *LONG, timeout=300, on_poll=slurm_cluster.preempt_at(16, epoch=1, events=events))
    _, second, preempted = requeued_once(job, events, 16, LONG_STEPS)
    assert "resource_tracker" not in job.log, job.describe()
    assert re.search(rf"resumed from \S+/preempted-step={preempted}\.ckpt: epoch 1, step {preempted}", second), \
        job.describe()
    assert checkpoint(ckpt)["global_step"] == LONG_STEPS

