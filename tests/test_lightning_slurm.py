"""lightning/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py).

Templates run unmodified from lightning/; the tests only shrink the shape on the sbatch command line (this
machine has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the
last --checkpoint-dir on the command line wins over the template's). The independent jobs (every template, the
fail-fast ones) run side by side, a few at a time; each preempted job runs alone after them.
"""

import re
from functools import partial

import pytest
import torch
from helpers import ROOT, env_python, epoch_lines
from slurm_fixtures import GLOO, MULTINODE_2X1, ONE_NODE, module_prefix, requeued_once, shape

pytestmark = [pytest.mark.lightning, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "lightning"
TINY = ["--epochs", 2, "--dataset-size", 256, "--batch-size", 32, "--log-every", 4]
# Preemption: 2 ranks x 32 = 64 samples per step, 4096 samples -> 64 steps per epoch, 192 in all.
LONG = ["--epochs", 3, "--dataset-size", 4096, "--batch-size", 32, "--log-every", 16]
LONG_STEPS = 192


def checkpoint(directory):
    path = directory / "last.ckpt"
    assert path.exists(), f"no last.ckpt in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def submit(cluster, tmp_path, template, sbatch_args, args=TINY, **kwargs):
    return cluster.recipe("lightning", template, tmp_path, sbatch_args, *args, **kwargs)


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
# multinode.sbatch at 1 node x 2 tasks runs in test_preemption_requeue_resume (one launched run, both checks).
TEMPLATE_ROWS = [*ONE_NODE, MULTINODE_2X1]


def submit_no_srun(cluster, tmp_path):
    job_script = tmp_path / "no_srun.sbatch"
    job_script.write_text(NO_SRUN_JOB)
    output = tmp_path / "job.out"
    return cluster.submit(job_script, *TINY, *GLOO, "--checkpoint-dir", tmp_path / "ckpt", cwd=FOLDER,
                          output=output, env={"PYTHON": env_python("lightning")}), output


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and of the two fail-fast tests, submitted and waited for together
    (run_together): {test name: (job, checkpoint dir)}."""
    rows = {f"test_template_runs[{p.id}]": (*p.values[:2], TINY) for p in TEMPLATE_ROWS}
    rows["test_devices_mismatch_fails_fast_with_a_clear_error"] = ("multinode.sbatch", shape(1, 2),
                                                                   [*TINY, "--devices", 1])
    dirs = {name: tmp_path_factory.mktemp("lightning_job") for name in [*rows, "missing_srun"]}
    submits = {name: partial(slurm_cluster.submit_recipe, "lightning", template, dirs[name], sbatch_args, *args)
               for name, (template, sbatch_args, args) in rows.items()}
    submits["test_missing_srun_fails_fast_with_a_clear_error"] = partial(submit_no_srun, slurm_cluster,
                                                                         dirs["missing_srun"])
    done = slurm_cluster.run_together(submits, prefix=module_prefix(request), timeout=240)
    return {name: (job, job_dir / "ckpt") for (name, job), job_dir in zip(done.items(), dirs.values())}


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, ckpt = jobs[request.node.name]
    job.assert_ok()
    assert [(e.epoch, e.metric) for e in epoch_lines(job.log)] == [(1, "acc"), (2, "acc")], job.describe()
    assert world_size_of(job.log) == world_size, job.describe()
    assert checkpoint(ckpt)["global_step"] == 2 * 256 // (32 * world_size)
    if template == "multinode.sbatch":
        nodes = "2 nodes (n[1-2])" if "--nodes=2" in sbatch_args else "1 nodes (n1)"
        assert nodes in job.log, job.describe()


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
    job, ckpt = submit(slurm_cluster, tmp_path, "multigpu.sbatch", shape(1, 1, gpus_per_node=2, cpus=2),
                       args=LONG, timeout=300, on_poll=slurm_cluster.preempt_at(16, epoch=1, events=events))
    _, second, preempted = requeued_once(job, events, 16, LONG_STEPS)
    assert "resource_tracker" not in job.log, job.describe()
    assert re.search(rf"resumed from \S+/preempted-step={preempted}\.ckpt: epoch 1, step {preempted}", second), \
        job.describe()
    assert checkpoint(ckpt)["global_step"] == LONG_STEPS


def test_preemption_requeue_resume(slurm_cluster, tmp_path):
    """SIGTERM to every process of the step, DataLoader workers included, not to the batch shell or srun (Slurm's
    preemption with GraceTime; Lightning installs its own SIGTERM handler, which must not win): the ranks agree on a
    step, save preempted-step=N.ckpt and exit 75, multinode.sbatch requeues, and the requeued job (same id, same
    checkpoint directory) resumes from the checkpoint with the most progress and COMPLETES after all the steps."""
    events = {}
    job, ckpt = submit(slurm_cluster, tmp_path, "multinode.sbatch", shape(1, 2), args=[*LONG, "--num-workers", 2],
                       timeout=300, on_poll=slurm_cluster.preempt_at(96, to="steps", signal="TERM", events=events))
    first, second, preempted = requeued_once(job, events, 96, LONG_STEPS, forwarded=None)
    # 64 steps per epoch; the signal lands at step 96 or, if the ranks agree later, in epoch 3
    epoch = preempted // 64 + 1
    assert re.search(rf"resumed from \S+/preempted-step={preempted}\.ckpt: epoch {epoch}, step {preempted}", second), \
        job.describe()
    saved = torch.load(ckpt / f"preempted-step={preempted}.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == preempted
    assert checkpoint(ckpt)["global_step"] == LONG_STEPS
    # what test_template_runs checks of the other shapes: the world size and the node count
    assert world_size_of(second) == 2 and "1 nodes (n1)" in job.log, job.describe()
