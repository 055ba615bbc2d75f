"""modulus/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py).

Templates run unmodified from modulus/; the tests only shrink the shape on the sbatch command line (this machine
has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the last one on
the command line wins over the template's). The independent jobs (every template, the darcy data job) run side
by side, a few at a time; the preempted job runs alone after them.
"""

import re
from functools import partial

import numpy as np
import pytest
import torch
from helpers import ROOT, env_python, epoch_lines
from slurm_fixtures import MULTINODE_2X1, ONE_NODE, module_prefix, shape

pytestmark = [pytest.mark.modulus, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "modulus"
# 2 ranks x batch 8: 4 steps per epoch, 8 in all (1 rank: 8 steps per epoch).
TINY = ["--epochs", 2, "--dataset-size", 64, "--batch-size", 8, "--log-every", 1000]
# Preemption: 2 ranks x 8 = 16 samples per step, 256 samples -> 16 steps per epoch, 32 in all.
LONG = ["--epochs", 2, "--dataset-size", 256, "--batch-size", 8, "--log-every", 2]
LONG_STEPS = 32


def snapshot(directory):
    path = directory / "snapshot.pt"
    assert path.exists(), f"no snapshot in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def submit(cluster, tmp_path, template, sbatch_args, args=TINY, **kwargs):
    return cluster.recipe("modulus", template, tmp_path, sbatch_args, *args, **kwargs)


TEMPLATE_ROWS = [
    *ONE_NODE,
    MULTINODE_2X1,  # srun, one task per node: DistributedManager's SLURM method
    pytest.param("multinode_torchrun.sbatch", shape(2, 1, gpus_per_node=1), 2, id="multinode_torchrun-2x1"),
]
DARCY = "test_darcy_data_job_writes_the_files"


def submit_darcy(cluster, tmp_path):
    output = tmp_path / "job.out"
    return cluster.submit(FOLDER / "darcy.sbatch", tmp_path / "darcy", "--train", 32, "--val", 8, "--resolution", 16,
                          sbatch_args=["--cpus-per-task=1", "--time=00:05:00"], cwd=FOLDER, output=output,
                          env={"PYTHON": env_python("modulus")}), output


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and of the darcy test, submitted and waited for together
    (run_together): {test name: (job, its temporary folder)}."""
    rows = {f"test_template_runs[{p.id}]": p.values[:2] for p in TEMPLATE_ROWS}
    dirs = {name: tmp_path_factory.mktemp("modulus_job") for name in [*rows, DARCY]}
    submits = {name: partial(slurm_cluster.submit_recipe, "modulus", template, dirs[name], sbatch_args, *TINY)
               for name, (template, sbatch_args) in rows.items()}
    submits[DARCY] = partial(submit_darcy, slurm_cluster, dirs[DARCY])
    done = slurm_cluster.run_together(submits, prefix=module_prefix(request), timeout=300)
    return {name: (job, dirs[name]) for name, job in done.items()}


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, job_dir = jobs[request.node.name]
    ckpt = job_dir / "ckpt"
    job.assert_ok()
    steps = 64 // (8 * world_size)
    epochs = epoch_lines(job.log)
    assert [(e.epoch, e.epochs, e.step, e.metric) for e in epochs] == [(1, 2, steps, "rel_l2"),
                                                                       (2, 2, 2 * steps, "rel_l2")], job.describe()
    assert snapshot(ckpt)["step"] == 2 * steps and (ckpt / "fno.mdlus").exists()
    if template.startswith("multinode"):
        hosts = dict(re.findall(r"\[rank(\d)\] host (\S+) \|", job.log))
        assert hosts == {"0": "n1", "1": "n2"}, job.describe()
    if template == "multinode.sbatch":
        assert "initialised from slurm" in job.log, job.describe()


def test_multinode_preemption_requeue_resume(slurm_cluster, tmp_path):
    """1 node x 2 tasks. SIGTERM to every process of the step mid-training, not to the batch shell or srun (Slurm's
    preemption with GraceTime) -> snapshot -> exit 75 -> scontrol requeue -> the requeued job (same id, same checkpoint
    directory) resumes from the snapshot -> COMPLETED after all the steps."""
    events = {}
    job, ckpt = submit(slurm_cluster, tmp_path, "multinode.sbatch", shape(1, 2), args=LONG, timeout=300,
                       on_poll=slurm_cluster.preempt_at(6, epoch=1, to="steps", signal="TERM", events=events))
    job.assert_ok()
    assert events["signalled"], f"training never reached step 6\n{job.describe()}"
    assert job.info["Restarts"] == "1", job.describe()
    first, _, second = job.log.partition("run 2 (restart 1 of at most 3)")
    assert second, f"the requeued run never started\n{job.describe()}"
    for needle in ("snapshot saved",
                   "after checkpointing; requeueing job"):
        assert needle in first, f"{needle!r} missing before the requeue\n{job.describe()}"
    stopped_at = int(re.search(r"preempted at step (\d+)", first).group(1))
    assert 6 <= stopped_at < LONG_STEPS
    assert re.search(rf"resumed from \S+snapshot\.pt: epoch \d, step {stopped_at}$", second, re.M), job.describe()
    assert snapshot(ckpt)["step"] == LONG_STEPS


def test_darcy_data_job_writes_the_files(jobs):
    """darcy.sbatch: the data-preparation job writes train.npz and val.npz where training jobs can read them."""
    job, job_dir = jobs[DARCY]
    data = job_dir / "darcy"
    job.assert_ok()
    assert f"wrote 32 + 8 Darcy samples at 16x16 to {data}" in job.log, job.describe()
    for name, n in (("train.npz", 32), ("val.npz", 8)):
        with np.load(data / name) as f:
            assert f["coeff"].shape == f["sol"].shape == (n, 16, 16)
