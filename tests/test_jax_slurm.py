"""jax/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), from
inside jax/ as a user would, interpreter in PYTHON; and the preemption path of multinode.sbatch: USR1 ->
snapshot -> exit 75 -> scontrol requeue -> resume -> the weights of an uninterrupted run.

The tests only shrink the shape on the sbatch command line (this machine has 2 cores) and pass small training
arguments; a later --checkpoint-dir overrides the template's own. The independent jobs (every template, the
preemption test's reference run) run side by side, a few at a time; the preempted job runs alone after them.
"""

import re
from functools import partial

import numpy as np
import pytest
from helpers import ROOT
from recipes import jax_checkpoints
from slurm_fixtures import module_prefix, requeued_once, shape

pytestmark = [pytest.mark.jax, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "jax"
TINY = ["--epochs", 2, "--dataset-size", 512, "--batch-size", 16, "--log-every", 8]
# Preemption: 2 processes x 16 = 32 samples per step, 2048 samples -> 64 steps per epoch, 128 in all.
LONG = ["--epochs", 2, "--dataset-size", 2048, "--batch-size", 16, "--log-every", 8]
LONG_STEPS = 128


def snapshot(directory):
    assert any(p.name.isdigit() for p in directory.iterdir()), \
        f"no checkpoint in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return jax_checkpoints(directory)[0]


def submit(cluster, tmp_path, template, sbatch_args, args=TINY, **kwargs):
    return cluster.recipe("jax", template, tmp_path, sbatch_args, *args, **kwargs)


def hosts(log):
    """{rank: host} from the `[rankR] host H |` line every process of multinode.py/multigpu.py prints."""
    return {int(r): h for r, h in re.findall(r"\[rank(\d+)\] host (\S+) \|", log)}


TEMPLATE_ROWS = [  # (template, sbatch args, processes, {rank: host} expected; {} no host lines; None any)
    pytest.param("single_gpu.sbatch", shape(1, 1), 1, {}, id="single_gpu"),
    pytest.param("multigpu.sbatch", shape(1, 1, gpus_per_node=2), 2, None, id="multigpu"),  # one task, 2 processes
    pytest.param("multinode.sbatch", shape(1, 2), 2, None, id="multinode-1x2"),
    pytest.param("multinode_pernode.sbatch", shape(2, 1, gpus_per_node=2), 2, {0: "n1", 1: "n2"}, id="pernode-2x1"),
]  # multinode 2x1: the preemption test
REFERENCE = "test_preemption_requeue_resume (reference)"


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of test_template_runs' rows and the preemption test's uninterrupted reference run (multinode.sbatch
    on 2 nodes), submitted and waited for together (run_together): {name: (job, checkpoint dir)}."""
    rows = {f"test_template_runs[{p.id}]": (*p.values[:2], TINY) for p in TEMPLATE_ROWS}
    rows[REFERENCE] = ("multinode.sbatch", shape(2, 1), LONG)
    dirs = {name: tmp_path_factory.mktemp("jax_job") for name in rows}
    done = slurm_cluster.run_together(
        {name: partial(slurm_cluster.submit_recipe, "jax", template, dirs[name], sbatch_args, *args)
         for name, (template, sbatch_args, args) in rows.items()}, prefix=module_prefix(request), timeout=240)
    return {name: (job, dirs[name] / "ckpt") for name, job in done.items()}


@pytest.mark.parametrize("template, sbatch_args, processes, ranks", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, processes, ranks):
    job, ckpt = jobs[request.node.name]
    job.assert_ok()
    assert f"[rank0] processes {processes} | devices {processes}" in job.log, job.describe()
    assert len(re.findall(r"\[rank0\] epoch \d+/2 \|", job.log)) == 2, job.describe()
    leaves, meta = snapshot(ckpt)
    assert (meta["step"], meta["world_size"]) == (2 * 512 // (16 * processes), processes), job.describe()
    if ranks is not None:
        seen = hosts(job.log)
        assert (seen == ranks) if ranks else not seen, job.describe()
    if processes == 2 and ranks is None:  # both on the node the job got
        assert set(hosts(job.log)) == {0, 1} and len(set(hosts(job.log).values())) == 1, job.describe()


def test_preemption_requeue_resume(slurm_cluster, jobs, tmp_path):
    """multinode.sbatch on 2 nodes, run once straight through (in `jobs`, beside the templates), then again with
    SIGTERM to every process of the step mid-epoch 1, not to the batch shell or srun (Slurm's preemption with
    GraceTime) -> snapshot, exit 75 -> scontrol requeue -> the requeued job (same id, same checkpoint directory)
    resumes -> COMPLETED, bit for bit the weights of the straight run."""
    reference, reference_ckpt = jobs[REFERENCE]
    reference.assert_ok()
    assert hosts(reference.log) == {0: "n1", 1: "n2"}, reference.describe()  # one process per node
    assert "[rank0] processes 2 | devices 2" in reference.log, reference.describe()
    events = {}
    job, ckpt = submit(slurm_cluster, tmp_path / "preempted", "multinode.sbatch", shape(2, 1), args=LONG,
                       timeout=300, on_poll=slurm_cluster.preempt_at(16, epoch=1, to="steps", signal="TERM",
                                                                        events=events))
    _, second, _ = requeued_once(job, events, 16, LONG_STEPS, forwarded=None)
    assert "resumed from" in second and f"done: {LONG_STEPS} steps" in second, job.describe()
    (resumed, meta), (straight, _) = snapshot(ckpt), snapshot(reference_ckpt)
    assert meta["step"] == LONG_STEPS
    for i, (a, b) in enumerate(zip(resumed, straight)):
        np.testing.assert_array_equal(a, b, err_msg=f"leaf {i} differs after preempt/requeue/resume")
