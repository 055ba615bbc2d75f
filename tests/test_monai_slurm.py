"""monai/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), and
the preemption path: USR1 -> snapshot -> exit 75 -> scontrol requeue -> resume -> the uninterrupted run's weights.

Templates run unmodified from monai/; the tests only shrink the shape on the sbatch command line (this machine
has 2 cores), pass the interpreter as PYTHON, and point --checkpoint-dir at a temporary folder (the last
--checkpoint-dir on the command line wins over the template's). The independent jobs (every template, the
uninterrupted two-node run) run side by side, a few at a time; the preempted job runs alone after them.
"""

import re
from functools import partial

import pytest
import torch
from helpers import ROOT, epoch_lines
from slurm_fixtures import MULTINODE_1X2, ONE_NODE, module_prefix, shape

pytestmark = [pytest.mark.monai, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "monai"
# 12 synthetic training cases of 20^3 (+ 3 validation cases); crops of 16^3.
TINY = ["--epochs", 2, "--dataset-size", 12, "--roi-size", 16, "--batch-size", 1, "--log-every", 1, "--seed", 0]


def snapshot(directory):
    path = directory / "snapshot.pt"
    assert path.exists(), f"no snapshot in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=True)


def submit(cluster, tmp_path, template, sbatch_args, **kwargs):
    return cluster.recipe("monai", template, tmp_path, sbatch_args, *TINY, "--data-dir", tmp_path / "data", **kwargs)


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
    """The jobs of test_template_runs' rows and test_multinode_on_two_nodes' (multinode.sbatch on 2 nodes x 1
    task, uninterrupted: the preemption test compares against it), submitted and waited for together
    (run_together): {test name: (job, checkpoint dir)}."""
    rows = {f"test_template_runs[{p.id}]": p.values[:2] for p in TEMPLATE_ROWS}
    rows["test_multinode_on_two_nodes"] = ("multinode.sbatch", shape(2, 1))
    dirs = {name: tmp_path_factory.mktemp("monai_job") for name in rows}
    done = slurm_cluster.run_together(
        {name: partial(slurm_cluster.submit_recipe, "monai", template, dirs[name], sbatch_args, *TINY,
                       "--data-dir", dirs[name] / "data")
         for name, (template, sbatch_args) in rows.items()}, prefix=module_prefix(request), timeout=240)
    return {name: (job, dirs[name] / "ckpt") for name, job in done.items()}


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, ckpt = jobs[request.node.name]
    check_run(job, ckpt, world_size)


@pytest.fixture(scope="module")
def two_nodes(jobs):
    """multinode.sbatch on 2 nodes x 1 task, uninterrupted (from `jobs`): the preemption test compares against it."""
    return jobs["test_multinode_on_two_nodes"]


def test_multinode_on_two_nodes(two_nodes):
    job, ckpt = two_nodes
    check_run(job, ckpt, 2)
    assert job.info["NodeList"] == "n[1-2]", job.describe()
    hosts = dict(re.findall(r"\[rank(\d)\] host (\S+) \|", job.log))
    assert hosts == {"0": "n1", "1": "n2"}, job.describe()
    assert "2 nodes (n[1-2]) x 1 tasks" in job.log, job.describe()


def test_preemption_requeue_resume(slurm_cluster, two_nodes, tmp_path):
    """SIGTERM to every process of the step, not to the batch shell or srun (Slurm's preemption with GraceTime),
    once both ranks are up: the ranks stop at the step they agree on, rank 0 saves, exit 75, the shell requeues,
    the requeued job resumes and COMPLETES with the same weights as the uninterrupted two-node run."""
    job, ckpt = submit(slurm_cluster, tmp_path, "multinode.sbatch", shape(2, 1), timeout=300,
                       on_poll=slurm_cluster.preempt_when(r"\[rank0\] host", to="steps", signal="TERM"))
    job.assert_ok()
    assert job.info["Restarts"] == "1", job.describe()
    for needle in ("preempted at step",
                   "after checkpointing; requeueing job", "run 2 (restart 1 of at most 3)", "resumed from",
                   "done: 12 steps"):
        assert needle in job.log, f"{needle!r} missing\n{job.describe()}"
    resumed, reference = snapshot(ckpt), snapshot(two_nodes[1])
    assert resumed["step"] == reference["step"] == 12
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after preempt/requeue/resume"
