"""deepspeed/ sbatch templates submitted for real to the local two-node Slurm cluster (tests/slurm_fixtures.py), as a
user would (from inside deepspeed/, interpreter in PYTHON), plus the preemption path of multinode.sbatch:
USR1 -> every rank saves its part of the checkpoint -> exit 75 -> scontrol requeue -> the requeued job resumes.

The tests only shrink the shape on the sbatch command line (this machine has 2 cores) and pass small training
arguments; the last --checkpoint-dir on the command line wins over the template's checkpoints/$RUN. The
independent jobs (every template, the uninterrupted multinode run) run side by side, a few at a time; the
preemption test's job runs alone after them.
"""

import json
import re
from functools import partial

import pytest
from helpers import ROOT
from slurm_fixtures import module_prefix, requeued_once, shape

pytestmark = [pytest.mark.deepspeed, pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: all of `jobs`

FOLDER = ROOT / "deepspeed"
TINY = ["--epochs", 2, "--dataset-size", 256, "--batch-size", 16, "--log-every", 4, "--ds-config",
        "configs/zero2.json"]
# Preemption: 2 ranks x 16 = 32 samples per step, 3072 samples -> 96 steps (1 epoch).
LONG = ["--epochs", 1, "--dataset-size", 3072, "--batch-size", 16, "--log-every", 8, "--ds-config",
        "configs/zero2.json"]
LONG_STEPS = 96


def latest(ckpt):
    done = sorted(ckpt.glob("step-*/complete.json"))
    assert done, f"no complete checkpoint in {ckpt}: {sorted(p.name for p in ckpt.iterdir()) if ckpt.exists() else []}"
    return json.loads(done[-1].read_text()), done[-1].parent


def submit(cluster, tmp_path, template, sbatch_args, args=TINY, **kwargs):
    return cluster.recipe("deepspeed", template, tmp_path, sbatch_args, *args, **kwargs)


def hosts_of(log):
    return {int(r): h for r, h in re.findall(r"\[rank(\d+)\] host (\S+) \|", log)}


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
    """The jobs of test_template_runs' rows and of test_multinode_two_nodes (multinode.sbatch on 2 nodes x 1 task,
    not interrupted: what the preempted run must end with), submitted and waited for together (run_together):
    {test name: (job, checkpoint dir)}."""
    rows = {f"test_template_runs[{p.id}]": (*p.values[:2], TINY) for p in TEMPLATE_ROWS}
    rows["test_multinode_two_nodes"] = ("multinode.sbatch", shape(2, 1), LONG)
    dirs = {name: tmp_path_factory.mktemp("ds_job") for name in rows}
    done = slurm_cluster.run_together(
        {name: partial(slurm_cluster.submit_recipe, "deepspeed", template, dirs[name], sbatch_args, *args)
         for name, (template, sbatch_args, args) in rows.items()}, prefix=module_prefix(request), timeout=300)
    return {name: (job, dirs[name] / "ckpt") for name, job in done.items()}


@pytest.mark.parametrize("template, sbatch_args, world_size", TEMPLATE_ROWS)
def test_template_runs(jobs, request, template, sbatch_args, world_size):
    job, ckpt = jobs[request.node.name]
    job.assert_ok()
    assert f"[rank0] world size {world_size} | backend gloo | device cpu | ZeRO stage 2" in job.log, job.describe()
    assert len(re.findall(r"\[rank0\] epoch \d/2 \|", job.log)) == 2, job.describe()
    progress, tag = latest(ckpt)
    assert progress["step"] == 2 * 256 // (16 * world_size) and progress["world_size"] == world_size
    # ZeRO-2: every rank wrote its own optimizer shard
    assert len(list(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))) == world_size
    # (every job of the fixture has ended: none of them may have left its hostfile-JOBID behind)
    assert not list(FOLDER.glob("hostfile-*")), "the job left its hostfile behind"
    if "--nodes=2" in sbatch_args:
        assert job.info["NodeList"] == "n[1-2]" and hosts_of(job.log) == {0: "n1", 1: "n2"}, job.describe()


@pytest.fixture(scope="module")
def uninterrupted(jobs):
    """multinode.sbatch on 2 nodes x 1 task, not interrupted (from `jobs`): what the preempted run must end with."""
    job, ckpt = jobs["test_multinode_two_nodes"]
    return job.assert_ok(), ckpt


def test_multinode_two_nodes(uninterrupted):
    job, ckpt = uninterrupted
    assert job.info["NodeList"] == "n[1-2]" and hosts_of(job.log) == {0: "n1", 1: "n2"}, job.describe()
    assert latest(ckpt)[0]["step"] == LONG_STEPS


def test_preemption_requeue_resume(slurm_cluster, uninterrupted, tmp_path):
    """multinode.sbatch: SIGTERM to every process of the step mid-training, not to the batch shell or srun (Slurm's
    preemption with GraceTime) -> every rank saves -> exit 75 -> requeue -> the requeued run resumes and ends bit for
    bit where the uninterrupted run ended."""
    import torch

    events = {}
    # 1 node x 2 tasks (multinode.sbatch's other shape; the uninterrupted run is 2 nodes x 1): the same world
    # size, so the same arithmetic, bit for bit.
    job, ckpt = submit(slurm_cluster, tmp_path, "multinode.sbatch", shape(1, 2), args=LONG, timeout=300,
                       on_poll=slurm_cluster.preempt_at(16, epoch=1, to="steps", signal="TERM", events=events))
    _, second, _ = requeued_once(job, events, 16, LONG_STEPS, forwarded=None)
    assert "resumed from" in second and f"done: {LONG_STEPS} steps" in second, job.describe()
    (progress, tag), (_, ref_tag) = latest(ckpt), latest(uninterrupted[1])
    assert progress["step"] == LONG_STEPS
    a, b = (torch.load(t / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
            for t in (tag, ref_tag))
    for name in b:
        assert torch.equal(a[name], b[name]), f"{name} differs after preempt/requeue/resume"
