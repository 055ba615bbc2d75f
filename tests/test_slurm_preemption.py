"""Every folder's multinode.sbatch preempted for real under the local two-node Slurm cluster (CONTRACT C7, C8), from
one table: tests/recipes.py's Recipe.slurm_preemption (a folder without a row says where its preemption under Slurm
is tested instead).

Each row's arguments run twice: straight through on 2 nodes x 1 task (every row's at once, side by side), and on
1 node x 2 tasks with SIGTERM sent to every process of the step mid-training, not to the batch shell or srun
(Slurm's preemption with GraceTime): the ranks agree on a step, save, exit 75, the template requeues the job, and
the requeued run (same id, same checkpoint directory) resumes and COMPLETES with the straight run's weights -- the
same world size on another layout, so the same arithmetic, bit for bit.
"""

import re

import pytest
from helpers import assert_same_weights, epoch_lines
from recipes import RECIPES
from slurm_fixtures import hosts, requeued_once, run_jobs, shape, template_job

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]  # the first test: every row's straight run

FOLDERS = sorted(f for f, r in RECIPES.items() if r.slurm_preemption)


def submit(folder, sbatch_args):
    return template_job(folder, "multinode.sbatch", sbatch_args, *RECIPES[folder].slurm_preemption.args)


def straight_name(folder):
    return f"test_preemption_requeue_resume[{folder}] (straight through)"


@pytest.fixture(scope="module")
def straight(slurm_cluster, tmp_path_factory, request):
    """The selected rows' runs straight through on 2 nodes x 1 task, together: {folder: (job, checkpoint dir)}."""
    selected = {item.callspec.params["folder"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    jobs = {straight_name(f): submit(f, shape(2, 1)) for f in sorted(selected)}
    done = run_jobs(request, tmp_path_factory, jobs, timeout=300)
    return {f: (job, job_dir / "ckpt") for f in selected for job, job_dir in [done[straight_name(f)]]}


@pytest.mark.parametrize("folder", [pytest.param(f, marks=getattr(pytest.mark, f)) for f in FOLDERS])
def test_preemption_requeue_resume(slurm_cluster, straight, folder, tmp_path):
    recipe, row = RECIPES[folder], RECIPES[folder].slurm_preemption
    reference, reference_ckpt = straight[folder]
    reference.assert_ok()
    assert reference.info["NodeList"] == "n[1-2]" and hosts(reference.log) in ({}, {0: "n1", 1: "n2"}), \
        reference.describe()
    epochs = int(row.args[row.args.index("--epochs") + 1])
    assert [e.epoch for e in epoch_lines(reference.log)] == list(range(1, epochs + 1)), reference.describe()
    for needle in row.says:
        assert needle in reference.log, f"{needle!r} missing\n{reference.describe()}"

    events = {}
    signal = dict(to="steps", signal="TERM", events=events)
    on_poll = (slurm_cluster.preempt_at(row.at, epoch=row.epoch, **signal) if isinstance(row.at, int)
               else slurm_cluster.preempt_when(row.at, **signal))
    job = slurm_cluster.wait(*submit(folder, shape(1, 2))(tmp_path), timeout=300, on_poll=on_poll)
    ckpt = tmp_path / "ckpt"
    _, second, stopped = requeued_once(job, events, row.at if isinstance(row.at, int) else 0, row.steps,
                                       forwarded=None)
    resumed = rf"resumed from {row.resumed.format(step=stopped)}: epoch \d+, step {stopped}\b"
    assert re.search(resumed, second), f"no line matching {resumed!r} after the requeue\n{job.describe()}"
    assert recipe.step_of(ckpt) == recipe.step_of(reference_ckpt) == row.steps
    for name in row.files:
        assert (ckpt / name).exists() and (reference_ckpt / name).exists(), name
    assert_same_weights(*recipe.weights_together(ckpt, reference_ckpt), **row.tol)


def test_every_folder_is_preempted_under_slurm_here_or_says_where():
    for folder, recipe in RECIPES.items():
        assert bool(recipe.slurm_preemption) != bool(recipe.no_slurm_preemption), folder
