"""Behaviour every framework folder shares, tested once over the launch table (tests/recipes.py): a folder that
adds its row there gets these tests free.
"""

import os
import hashlib
import re
import shutil
import socket
import subprocess
import time

import pytest
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port,
                     run_killing_a_worker_twice, teardown_checked, torchrun)
from recipes import RECIPES, SRUN, shared_dir, wait_all

pytestmark = [pytest.mark.contract, pytest.mark.timeout(300)]

ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


@pytest.mark.parametrize("folder", [f for f in SRUN if not RECIPES[f].busy_port])
def test_busy_master_port_is_one_line_and_exit_2_not_a_hang(folder, tmp_path):
    """MASTER_PORT held by another program: rank 0 cannot host the rendezvous there. It must say so in one line and
    exit 2 within --timeout + 30 s (CONTRACT.md C4), and rank 1 must not wait forever either."""
    recipe, timeout = RECIPES[folder], 8
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        start = time.monotonic()
        procs = recipe.srun([*recipe.small, "--timeout", timeout, "--data-dir", tmp_path / "data"], 2,
                            busy.getsockname()[1], stderr_apart=True)
        codes, outs = wait_all(procs, timeout=150)
    seconds = time.monotonic() - start
    errors = [ln for ln in outs[0][1].splitlines() if ln.strip()]
    assert codes[0] == 2 and codes[1] != 0, (codes, outs)
    assert len(errors) == 1 and ERROR_LINE.match(errors[0]), f"rank 0's stderr is not one error line: {outs[0][1]}"
    assert any(said in errors[0] for said in recipe.busy_port_says), errors[0]
    assert seconds < timeout + 30 + 60, f"{seconds:.0f} s"  # + 60: interpreters importing a framework on a busy CI core


# ------------------------------------------------------------------------------------------ preemption (C7)


PREEMPTED = [pytest.param(folder, sig, extra, id=f"{folder}-{name}")
             for folder in sorted(f for f in SRUN if RECIPES[f].preemption)
             for name, sig, extra in RECIPES[folder].preemption.signals]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """folder -> (checkpoint dir, data dir) of one uninterrupted srun-style run of its preemption arguments, shared
    by every signal the folder is tested with (the data dir too: a folder that writes its data writes it once)."""
    runs = {}

    def run(folder):
        if folder not in runs:
            recipe, base = RECIPES[folder], tmp_path_factory.mktemp(f"{folder}-uninterrupted")
            args = [*recipe.preemption.args, "--checkpoint-dir", base / "ckpt", "--data-dir", base / "data"]
            codes, outs = wait_all(recipe.srun(args, 2, free_port()), timeout=240)
            assert codes == [0, 0], "\n".join(outs)
            assert recipe.step_of(base / "ckpt") == recipe.preemption.steps, "\n".join(outs)
            runs[folder] = base / "ckpt", base / "data"
        return runs[folder]
    return run


@pytest.mark.parametrize("folder, sig, extra", PREEMPTED)
@pytest.mark.timeout(600)  # a folder's first signal also runs the shared uninterrupted run: 3 trainings
def test_preempted_srun_tasks_save_once_exit_75_and_resume_exactly(folder, sig, extra, uninterrupted, tmp_path):
    """Slurm's preemption (CONTRACT.md C7): SIGUSR1 (its warning) or SIGTERM (time limit, scancel, preemption) to
    every process of the step -- each task's process group, DataLoader workers included -- once rank 0 is training.
    Every rank finishes the step it is in, they agree on the step to stop at (mid-epoch), one snapshot holds it,
    every rank exits 75 with no traceback; the rerun resumes there and ends with the uninterrupted run's weights."""
    recipe, spec = RECIPES[folder], RECIPES[folder].preemption
    straight, data = uninterrupted(folder)
    ckpt = tmp_path / "ckpt"
    args = [*spec.args, *extra, "--checkpoint-dir", ckpt, "--data-dir", data]
    procs = recipe.srun(args, 2, free_port())
    head = []
    for line in procs[0].stdout:  # rank 0 is under way: every rank's handlers are installed
        head.append(line)
        if re.search(spec.when, line):
            break
    for p in procs:
        os.killpg(p.pid, sig)  # the task and every process it started, as Slurm signals a step
    codes, outs = wait_all(procs, timeout=240)
    outs[0] = "".join(head) + outs[0]
    everything = "\n".join(outs)
    assert codes == [75, 75], everything
    assert "Traceback" not in everything and "DataLoader worker" not in everything, everything
    if recipe.teardown_check:  # the way out with SystemExit(75) in flight frees the model before the process group
        assert all(teardown_checked(out, ranks=1) for out in outs), everything
    for rank, out in enumerate(outs):
        assert f"[rank{rank}] host" in out, out  # each rank's identity came from SLURM_PROCID
    for line in spec.expect:
        assert line in outs[0], outs[0]
    stops = re.findall(r"^\[rank0\] preempted at step (\d+): snapshot saved", outs[0], re.M)
    assert len(stops) == 1, outs[0]
    stopped_at = int(stops[0])
    assert spec.first_stop <= stopped_at < spec.steps and stopped_at % spec.steps_per_epoch, outs[0]  # mid-epoch
    assert recipe.step_of(ckpt) == stopped_at

    codes, outs = wait_all(recipe.srun(args, 2, free_port()), timeout=240)
    assert codes == [0, 0], "\n".join(outs)
    resumed = spec.resumed.format(ckpt=re.escape(str(ckpt)), step=stopped_at)
    assert re.search(rf"^\[rank0\] {resumed}", outs[0], re.M), outs[0]
    assert recipe.step_of(ckpt) == spec.steps
    assert_same_weights(recipe.weights(ckpt), recipe.weights(straight), **spec.tol)


def test_every_row_says_why_it_skips_a_behavioural_test():
    """A folder's row leaves out the srun launch or the preemption run only with the reason (and the test that
    covers it instead): a new folder cannot drop out of these tests silently."""
    for folder, recipe in RECIPES.items():
        assert recipe.no_srun or (recipe.weights and recipe.step_of), f"{folder}: no checkpoint readers"
        assert recipe.preemption or recipe.no_preemption, f"{folder}: no preemption run and no reason"
        assert not (recipe.preemption and (recipe.no_preemption or recipe.no_srun)), folder
        assert recipe.same_as_one or recipe.no_same_as_one, f"{folder}: no N ranks == one process, and no reason"


# ------------------------------------------------------------------------------------------ N ranks == one process


SAME_AS_ONE = [pytest.param(folder, launch, id=f"{folder}-{launch.run}")
               for folder in sorted(f for f in RECIPES if RECIPES[f].same_as_one)
               for launch in RECIPES[folder].same_as_one.launches]


@pytest.mark.parametrize("folder, launch", SAME_AS_ONE)
@pytest.mark.timeout(600)  # both runs, or the wait for a run the folder's own tests are starting
def test_n_ranks_end_with_the_weights_of_one_process_with_the_global_batch(folder, launch, tmp_path_factory):
    """2 ranks x batch B, launched every way the folder can, == 1 process x batch 2B: each global batch holds the same
    samples (CONTRACT.md C5), summed in another order, so the same steps end with the same weights within the folder's
    tolerance, and rank 0 alone prints the same epoch lines. The runs are the folder's shared ones (Recipe.run): its
    own tests read them too."""
    recipe, spec = RECIPES[folder], RECIPES[folder].same_as_one
    reference, ran = recipe.run(tmp_path_factory, spec.reference), recipe.run(tmp_path_factory, launch.run)
    for said in spec.reference_says:
        assert said in reference.out, reference.out[-3000:]
    for said in launch.says:
        assert said in ran.out, ran.out[-3000:]
    for rank, out in enumerate(ran.outs if launch.each_says else ()):
        assert launch.each_says.format(rank=rank) in out, out[-3000:]
    ends = [(epoch, len(spec.epoch_ends), step) for epoch, step in enumerate(spec.epoch_ends, 1)]
    mine, theirs = epoch_lines(ran.out), epoch_lines(reference.out)
    assert [(e.epoch, e.epochs, e.step) for e in theirs] == ends, reference.out[-3000:]
    assert [(e.epoch, e.epochs, e.step) for e in mine] == ends, ran.out[-3000:]  # once: rank 0's
    assert "[rank1] epoch" not in ran.out and {e.metric for e in mine + theirs} == {spec.metric}, ran.out[-3000:]
    for field, tol in launch.metrics.items():  # reduced over the ranks: one process's numbers over the same samples
        values = [getattr(e, field) for e in theirs]
        assert [getattr(e, field) for e in mine] == (pytest.approx(values, abs=tol) if tol else values)
    if recipe.runs[launch.run].teardown_check:
        assert teardown_checked(ran.out, ranks=2), f"a DDP model outlived its process group:\n{ran.out[-3000:]}"
    assert recipe.step_of(ran.ckpt) == recipe.step_of(reference.ckpt) == spec.epoch_ends[-1]
    if launch.weights:
        assert_same_weights(launch.weights(ran.ckpt), recipe.weights(reference.ckpt), **spec.tol)
    else:
        assert_same_weights(*recipe.weights_together(ran.ckpt, reference.ckpt), **spec.tol)


# ------------------------------------------------------------------------------------------ another world size (C6)


def launch(recipe, args, ranks):
    """single_gpu.py (1 process) or 2 srun-style ranks, run to their end: (exit codes, rank 0's stdout, rank 0's
    stderr, everything). The row's own settings (a compilation cache) go with single_gpu.py, not the variables that
    describe an srun step."""
    if ranks == 2:
        codes, outs = wait_all(recipe.srun(args, 2, free_port(), stderr_apart=True), timeout=240)
        return codes, *outs[0], "\n".join(out + err for out, err in outs)
    own = {k: str(v) for k, v in recipe.env.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    proc = subprocess.run([str(env_python(recipe.folder)), "single_gpu.py", *map(str, args)], env=clean_env(**own),
                          cwd=ROOT / recipe.folder, capture_output=True, text=True, timeout=240)
    return [proc.returncode], proc.stdout, proc.stderr, proc.stdout + proc.stderr


def files_of(directory):
    """{path: (size, mtime, sha256)} of every file under `directory` but the logs (*.log, *.txt: NeMo's exp_manager
    moves the last run's into run_<n>/ as it starts)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns,
                                            hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix not in (".log", ".txt")}


@pytest.mark.parametrize("folder", sorted(f for f in SRUN if RECIPES[f].world_size_change))
def test_resume_on_another_world_size_continues_or_refuses_in_one_line(folder, tmp_path, tmp_path_factory):
    """A job resubmitted on fewer nodes resumes a checkpoint of 2 ranks with 1, or on more nodes one of 1 with 2
    (CONTRACT.md C6). Either it refuses before training anything -- one error line that says what to do, exit 2
    from every rank, the checkpoint untouched (every file in it as it was, logs aside) -- or it continues after the
    samples it trained on and ends with the weights of an uninterrupted run at the new size (or, where the row says
    why, at its last step). Never a traceback, never samples skipped or trained twice (before: skipped or repeated
    in silence, or the epoch restarted with a warning). The checkpoint to refuse may be a copy of a finished 2-rank
    run the folder's other tests read (WorldSizeChange.copy_of)."""
    recipe, spec = RECIPES[folder], RECIPES[folder].world_size_change
    before, after = (1, 2) if spec.grow else (2, 1)
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    args = [*spec.args, "--checkpoint-dir", ckpt, "--data-dir", data]
    if spec.copy_of:
        shutil.copytree(recipe.run(tmp_path_factory, spec.copy_of).ckpt, ckpt)  # its mtimes too
        assert recipe.step_of(ckpt) == spec.cut
    else:
        codes, _, _, everything = launch(recipe, [*args, "--max-steps", spec.cut], before)
        assert set(codes) == {0} and recipe.step_of(ckpt) == spec.cut, everything
    if spec.refused:
        kept = files_of(ckpt)
        codes, out, err, everything = launch(recipe, args, after)
        errors = [ln for ln in err.splitlines() if ERROR_LINE.match(ln)]  # as the contract counts (C4)
        assert set(codes) == {2} and len(errors) == 1 and "Traceback" not in everything, (codes, everything)
        assert spec.refused in errors[0] and "--checkpoint-dir" in errors[0], errors[0]
        # refused before anything trained or saved: every file of the checkpoint as it was
        now = files_of(ckpt)
        assert {path: now.get(path) for path in kept} == kept, everything
        assert recipe.step_of(ckpt) == spec.cut, everything
    if spec.resume_batch:
        resized = [*spec.args, "--batch-size", spec.resume_batch, "--data-dir", data]  # the later flag wins
        codes, out, _, everything = launch(recipe, [*resized, "--checkpoint-dir", ckpt], after)
        assert set(codes) == {0} and spec.resumed in out and "Traceback" not in everything, (codes, everything)
        if spec.steps:
            assert recipe.step_of(ckpt) == spec.steps, everything
            return
        straight = tmp_path / "straight"
        codes, _, _, everything = launch(recipe, [*resized, "--checkpoint-dir", straight], after)
        assert set(codes) == {0}, everything
        assert recipe.step_of(ckpt) == recipe.step_of(straight)
        assert_same_weights(recipe.weights(ckpt), recipe.weights(straight), **spec.tol)


def test_every_row_says_how_it_meets_another_world_size():
    for folder, recipe in RECIPES.items():
        assert recipe.world_size_change or recipe.no_world_size_change, f"{folder}: no world-size change, no reason"
        spec = recipe.world_size_change
        assert not spec or (spec.refused or spec.resume_batch) and (not spec.resume_batch or spec.resumed), folder
        assert not (spec and spec.copy_of and spec.resume_batch), f"{folder}: a finished run leaves nothing to resume"


# ------------------------------------------------------------------------------------------ torchrun --max-restarts


# The folders whose `torchrun` run (Recipe.runs) restarts here. pytorch/ and lightning/ have this test in their own
# files (test_pytorch.py, test_lightning.py: the same key prefix, cluster.rendezvous_store); nemo/ has the prefix too
# but ~23 CPU-s of imports per process (3 attempts x 2 workers); deepspeed/'s torchrun run is another (zero1).
RESTARTED = ["monai", "modulus"]


@pytest.mark.parametrize("folder", RESTARTED)
@pytest.mark.timeout(600)  # the folder's uninterrupted torchrun run too, when no test of the session has started it
def test_torchrun_restarts_a_killed_worker_within_the_launch(folder, tmp_path, tmp_path_factory):
    """A worker killed (kill -9) after the first snapshot, and again as soon as the restarted attempt resumed:
    torchrun --max-restarts 2 restarts the worker group twice within the one launch -- exit 0, resumed twice, no
    traceback, no relaunch needed -- and the run ends with the weights of the folder's uninterrupted torchrun run.
    Found by the fault soak (monai/torchrun, modulus/torchrun kill-worker): torch 2.13's agent store kept the dead
    attempt's keys, and a restarted worker read a dead worker's address from them (modulus: gloo's connectFullMesh,
    "Connection refused"; monai: the rendezvous deadline); the Slurm-style relaunch then recovered. Fixed by
    toolkit.attempt_store: a key prefix per attempt."""
    recipe = RECIPES[folder]
    straight = recipe.run(tmp_path_factory, "torchrun")
    fill = dict(ckpt=tmp_path / "ckpt", dir=tmp_path, data=shared_dir(tmp_path_factory, f"{folder}-data"),
                port=free_port(), dir_from_folder=os.path.relpath(tmp_path, ROOT / folder))
    args = [str(a).format(**fill) for a in recipe.runs["torchrun"].args]
    code, out, kills = run_killing_a_worker_twice([*torchrun(folder), "--max-restarts", "2", *args],
                                                  cwd=ROOT / folder)
    assert kills == 2 and code == 0, out[-6000:]
    assert len(re.findall(r"^\[rank0\] resumed from ", out, re.M)) == 2, out[-6000:]
    assert "Traceback" not in out and "connectFullMesh" not in out and "did not finish" not in out, out[-6000:]
    assert_same_weights(recipe.weights(fill["ckpt"]), recipe.weights(straight.ckpt))
