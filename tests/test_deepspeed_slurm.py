"""deepspeed/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), as a
user would (from inside deepspeed/, interpreter in PYTHON), side by side, a few at a time. multinode.sbatch on 2
nodes and its preemption (SIGTERM -> every rank saves its part of the checkpoint -> exit 75 -> requeue -> the
requeued job resumes -> the straight run's weights) are test_slurm_preemption.py's deepspeed row.

The tests only shrink the shape on the sbatch command line (this machine has 2 cores) and pass small training
arguments; the last --checkpoint-dir on the command line wins over the template's checkpoints/$RUN.
"""

import json
import re

import pytest
from helpers import ROOT
from slurm_fixtures import hosts, run_jobs, shape, template_rows

pytestmark = [pytest.mark.deepspeed, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "deepspeed"
TINY = ["--epochs", 2, "--dataset-size", 256, "--batch-size", 16, "--log-every", 4, "--ds-config",
        "configs/zero2.json"]


def latest(ckpt):
    done = sorted(ckpt.glob("step-*/complete.json"))
    assert done, f"no complete checkpoint in {ckpt}: {sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []}"
    return json.loads(done[-1].read_text()), done[-1].parent


TEMPLATE_ROWS = [  # (template, sbatch args, world size)
    pytest.param("single_gpu.sbatch", shape(1, 1), 1, id="single_gpu"),
    # the fake GPUs are not CUDA: 2 CPU workers
    pytest.param("multigpu.sbatch", shape(1, 1, gpus_per_node=2, cpus=2), 2, id="spawn"),
    pytest.param("multigpu_torchrun.sbatch", shape(1, 1, gpus_per_node=2, cpus=2), 2, id="torchrun"),
    pytest.param("multigpu_torchrun_deepspeed.sbatch", shape(1, 1, gpus_per_node=2, cpus=2), 2,
                 id="deepspeed-launcher"),
    pytest.param("multinode_torchrun.sbatch", shape(2, 1), 2, id="torchrun-2nodes"),
    pytest.param("multinode_deepspeed.sbatch", shape(2, 1), 2, id="deepspeed-launcher-2nodes"),
]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """test_template_runs' jobs, run together: {test name: (job, job dir)}."""
    return run_jobs(request, tmp_path_factory, template_rows("deepspeed", TEMPLATE_ROWS, *TINY), timeout=300)


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, job_dir = jobs[request.node.name]
    job.assert_ok()
    assert f"[rank0] world size {world_size} | backend gloo | device cpu | ZeRO stage 2" in job.log, job.describe()
    assert len(re.findall(r"\[rank0\] epoch \d/2 \|", job.log)) == 2, job.describe()
    progress, tag = latest(job_dir / "ckpt")
    assert progress["step"] == 2 * 256 // (16 * world_size) and progress["world_size"] == world_size
    # ZeRO-2: every rank wrote its own optimizer shard
    assert len(list(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == world_size
    # (every job of the fixture has ended: none of them may have left its hostfile-JOBID behind)
    assert not list(FOLDER.glob("hostfile-*")), "the job left its hostfile behind"
    if "--nodes=2" in sbatch_args:
        assert job.info["NodeList"] == "n[1-2]" and hosts(job.log) == {0: "n1", 1: "n2"}, job.describe()

