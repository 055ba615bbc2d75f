"""modulus/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py).

Templates run unmodified from modulus/; the tests only shrink the shape on the sbatch command line (this machine
has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the last one on
the command line wins over the template's). The independent jobs (every template, the darcy data job) run side
by side, a few at a time. multinode.sbatch on 2 nodes x 1 task (DistributedManager's SLURM method) and its
preemption are test_slurm_preemption.py's modulus row.
"""

from functools import partial

import numpy as np
import pytest
import torch
from helpers import ROOT, env_python, epoch_lines
from slurm_fixtures import ONE_NODE, hosts, run_jobs, shape, template_rows

pytestmark = [pytest.mark.modulus, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "modulus"
# 2 ranks x batch 8: 4 steps per epoch, 8 in all (1 rank: 8 steps per epoch).
TINY = ["--epochs", 2, "--dataset-size", 64, "--batch-size", 8, "--log-every", 1000]


def snapshot(directory):
    path = directory / "snapshot.pt"
    assert path.exists(), f"no snapshot in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


TEMPLATE_ROWS = [
    *ONE_NODE,  # multinode.sbatch: test_slurm_preemption.py
    pytest.param("multinode_torchrun.sbatch", shape(2, 1, gpus_per_node=1), 2, id="multinode_torchrun-2x1"),
]
DARCY = "test_darcy_data_job_writes_the_files"


def submit_darcy(cluster, job_dir):
    output = job_dir / "job.out"
    return cluster.submit(FOLDER / "darcy.sbatch", job_dir / "darcy", "--train", 32, "--val", 8, "--resolution", 16,
                          sbatch_args=["--cpus-per-task=1", "--time=00:05:00"], cwd=FOLDER, output=output,
                          env={"PYTHON": env_python("modulus")}), output


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and of the darcy test, run together: {test name: (job, job dir)}."""
    return run_jobs(request, tmp_path_factory, {**template_rows("modulus", TEMPLATE_ROWS, *TINY),
                                                DARCY: partial(submit_darcy, slurm_cluster)}, timeout=300)


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
        assert hosts(job.log) == {0: "n1", 1: "n2"}, job.describe()


def test_darcy_data_job_writes_the_files(jobs):
    """darcy.sbatch: the data-preparation job writes train.npz and val.npz where training jobs can read them."""
    job, job_dir = jobs[DARCY]
    data = job_dir / "darcy"
    job.assert_ok()
    assert f"wrote 32 + 8 Darcy samples at 16x16 to {data}" in job.log, job.describe()
    for name, n in (("train.npz", 32), ("val.npz", 8)):
        with np.load(data / name) as f:
            assert f["coeff"].shape == f["sol"].shape == (n, 16, 16)
