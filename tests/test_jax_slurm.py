"""jax/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), from
inside jax/ as a user would, interpreter in PYTHON, side by side, a few at a time. multinode.sbatch on 2 nodes and
its preemption (SIGTERM -> snapshot -> exit 75 -> requeue -> resume -> the weights of the straight run) are
test_slurm_preemption.py's jax row.

The tests only shrink the shape on the sbatch command line (this machine has 2 cores) and pass small training
arguments; a later --checkpoint-dir overrides the template's own.
"""

import re

import pytest
from helpers import ROOT
from recipes import jax_checkpoints
from slurm_fixtures import hosts, run_jobs, shape, template_rows

pytestmark = [pytest.mark.jax, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "jax"
TINY = ["--epochs", 2, "--dataset-size", 512, "--batch-size", 16, "--log-every", 8]


def snapshot(directory):
    assert any(p.name.isdigit() for p in directory.iterdir()), \
        f"no checkpoint in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return jax_checkpoints(directory)[0]


TEMPLATE_ROWS = [  # (template, sbatch args, processes, {rank: host} expected; {} no host lines; None any)
    pytest.param("single_gpu.sbatch", shape(1, 1), 1, {}, id="single_gpu"),
    pytest.param("multigpu.sbatch", shape(1, 1, gpus_per_node=2), 2, None, id="multigpu"),  # one task, 2 processes
    pytest.param("multinode.sbatch", shape(1, 2), 2, None, id="multinode-1x2"),
    pytest.param("multinode_pernode.sbatch", shape(2, 1, gpus_per_node=2), 2, {0: "n1", 1: "n2"}, id="pernode-2x1"),
]  # multinode 2x1: test_slurm_preemption.py


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """test_template_runs' jobs, run together: {test name: (job, job dir)}."""
    return run_jobs(request, tmp_path_factory, template_rows("jax", TEMPLATE_ROWS, *TINY))


@pytest.mark.parametrize("template, sbatch_args, processes, ranks", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, processes, ranks):
    job, job_dir = jobs[request.node.name]
    job.assert_ok()
    assert f"[rank0] processes {processes} | devices {processes}" in job.log, job.describe()
    assert len(re.findall(r"\[rank0\] epoch \d+/2 \|", job.log)) == 2, job.describe()
    leaves, meta = snapshot(job_dir / "ckpt")
    assert (meta["step"], meta["world_size"]) == (2 * 512 // (16 * processes), processes), job.describe()
    if ranks is not None:
        seen = hosts(job.log)
        assert (seen == ranks) if ranks else not seen, job.describe()
    if processes == 2 and ranks is None:  # both on the node the job got
        assert set(hosts(job.log)) == {0, 1} and len(set(hosts(job.log).values())) == 1, job.describe()

