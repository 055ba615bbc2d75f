"""monai/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), side by
side, a few at a time. multinode.sbatch on 2 nodes x 1 task and its preemption (SIGTERM -> snapshot -> exit 75 ->
requeue -> resume -> the straight run's weights) are test_slurm_preemption.py's monai row.

Templates run unmodified from monai/; the tests only shrink the shape on the sbatch command line (this machine
has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the last
--checkpoint-dir on the command line wins over the template's).
"""

import pytest
import torch
from helpers import ROOT, epoch_lines
from slurm_fixtures import MULTINODE_1X2, ONE_NODE, run_jobs, template_rows

pytestmark = [pytest.mark.monai, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "monai"
# 12 synthetic training cases of 20^3 (+ 3 validation cases); crops of 16^3.
TINY = ["--epochs", 2, "--dataset-size", 12, "--roi-size", 16, "--batch-size", 1, "--log-every", 1, "--seed", 0,
        "--data-dir", "{dir}/data"]


def snapshot(directory):
    path = directory / "snapshot.pt"
    assert path.exists(), f"no snapshot in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def check_run(job, ckpt, world_size):
    job.assert_ok()
    steps = 12 // world_size  # 12 training cases, batch 1 per rank
    epochs = [(e.epoch, e.epochs, e.step, e.metric) for e in epoch_lines(job.log)]
    assert epochs == [(1, 2, steps, "dice"), (2, 2, 2 * steps, "dice")], job.describe()
    assert f"[rank0] world size {world_size} | device cpu" in job.log, job.describe()
    snap = snapshot(ckpt)
    assert (snap["step"], snap["world_size"]) == (2 * steps, world_size)
    assert (ckpt / "best_model.pt").exists() and (ckpt / "snapshot.prev.pt").exists()


TEMPLATE_ROWS = [*ONE_NODE, MULTINODE_1X2]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """test_template_runs' jobs (each with a data folder of its own), run together: {test name: (job, job dir)}."""
    return run_jobs(request, tmp_path_factory, template_rows("monai", TEMPLATE_ROWS, *TINY))


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, job_dir = jobs[request.node.name]
    check_run(job, job_dir / "ckpt", world_size)

