"""The fault soak in small (issue #9, item 5): one injection of each kind, fixed seeds, a run in every folder with
MODES rows -- each run must end RECOVERED (the uninterrupted run's weights, bit-exact) or CLEAR-ERROR, with no
unreadable snapshot and no process left. `make soak` runs the same harness (tests/faults.py) with N random draws.

The harness's own verdicts are tested first, without any recipe: weights that differ, a process left behind, a
truncated snapshot, a traceback are each a FAIL.
"""

import os
import pickle
import random
import re
import subprocess
import sys

import faults
import pytest
import torch
from helpers import env_python

pytestmark = [pytest.mark.soak, pytest.mark.timeout(600)]

# ------------------------------------------------------------------------------------------ the verdicts


def a_launch(**kw):
    return faults.Launch(**{"codes": [0], "code": 0, "seconds": 1.0, "output": "[rank0] done: 8 steps", **kw})


WEIGHTS = {"w": torch.ones(3)}


def test_equal_weights_are_recovered_and_other_weights_a_fail():
    assert faults.classify([a_launch()], {"w": torch.ones(3)}, WEIGHTS, {"rtol": 0, "atol": 0}) == ("RECOVERED", "")
    off = {"w": torch.tensor([1.0, 1.0, 1.0 + 1e-7])}
    outcome, reason = faults.classify([a_launch()], off, WEIGHTS, {"rtol": 0, "atol": 0})
    assert outcome == "FAIL" and reason.startswith("wrong weights: w"), reason
    assert faults.classify([a_launch()], None, WEIGHTS, {})[0] == "FAIL"  # exit 0 without a final snapshot


def test_one_error_line_is_a_clear_error_and_a_traceback_a_fail():
    clear = a_launch(codes=[2], code=2, output="[rank0] resumed\n[rank1] error: the data directory is empty\n")
    assert faults.classify([clear], None, WEIGHTS, {}) == ("CLEAR-ERROR", "[rank1] error: the data directory is empty")
    wall = a_launch(codes=[1], code=1, output="Traceback (most recent call last):\n  ...\nRuntimeError: boom\n")
    assert faults.classify([wall], None, WEIGHTS, {})[0] == "FAIL"
    two = a_launch(codes=[2], code=2, output="error: one\n[rank1] error: two\n")
    assert faults.classify([two], None, WEIGHTS, {})[0] == "FAIL"
    # a traceback in an earlier, killed launch is the fault itself; only the end counts (and the checks below)
    assert faults.classify([wall, a_launch()], WEIGHTS, WEIGHTS, {})[0] == "RECOVERED"


def test_a_hang_a_corrupt_snapshot_or_a_leftover_process_is_a_fail_even_with_the_right_weights():
    for bad in ({"hang": True}, {"corrupt": ["snapshot.pt: EOFError"]}, {"leftovers": ["pid 7: sleep 60"]}):
        outcome, reason = faults.classify([a_launch(**bad), a_launch()], WEIGHTS, WEIGHTS, {})
        assert outcome == "FAIL", (bad, reason)


def test_a_truncated_snapshot_is_found(tmp_path):
    torch.save({"model": WEIGHTS}, tmp_path / "snapshot.prev.pt")
    data = (tmp_path / "snapshot.prev.pt").read_bytes()
    (tmp_path / "snapshot.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "snapshot.pt.tmp").write_bytes(data[:10])
    corrupt, temporaries = faults.check_snapshots(faults.MODES["pytorch/single"], tmp_path)
    assert [c.split(":")[0] for c in corrupt] == ["snapshot.pt"] and temporaries == ["snapshot.pt.tmp"]


def test_deepspeeds_files_are_read_whole_without_deepspeed(monkeypatch, tmp_path):
    """Its optimizer states pickle DeepSpeed's own objects, which the tests' environment cannot import: read back
    with those left opaque (every tensor read); half such a file is still unreadable."""
    import types

    fake = types.ModuleType("deepspeed")  # this environment has none: a stand-in, gone before the file is read
    fake.Scaler = type("Scaler", (), {"__module__": "deepspeed"})
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    torch.save({"optimizer": WEIGHTS, "scaler": fake.Scaler()}, tmp_path / "optim_states.pt")
    monkeypatch.delitem(sys.modules, "deepspeed")
    # ModuleNotFoundError; AttributeError where the repository's deepspeed/ folder is importable as a namespace
    # package (pytest started from the repository's root, as CI starts it)
    with pytest.raises((ModuleNotFoundError, AttributeError)):
        torch.load(tmp_path / "optim_states.pt", weights_only=False)
    faults.deepspeed_loads(tmp_path / "optim_states.pt")
    data = (tmp_path / "optim_states.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises((RuntimeError, EOFError, pickle.UnpicklingError)):  # a truncated zip, half a pickle
        faults.deepspeed_loads(tmp_path / "half.pt")


def test_an_orbax_step_is_checked_once_named_and_its_half_written_folder_is_not(tmp_path):
    """jax/: a step folder gets its name (digits) when every process has written its part; until then Orbax writes
    into <step>.orbax-checkpoint-tmp-*, which a kill may leave half written (and the next start removes)."""
    for folder, text in (("64", "{}"), ("128", "{\"step\": 12"), ("192.orbax-checkpoint-tmp-1765140000", "{")):
        (tmp_path / folder / "progress").mkdir(parents=True)
        (tmp_path / folder / "_CHECKPOINT_METADATA").write_text(text)
        (tmp_path / folder / "progress" / "metadata").write_text("{}")
    mode = faults.MODES["jax/single"]
    assert {str(p.relative_to(tmp_path)) for p in faults.snapshot_files(mode, tmp_path)} == {
        "64/_CHECKPOINT_METADATA", "64/progress/metadata", "128/_CHECKPOINT_METADATA", "128/progress/metadata"}
    corrupt, _ = faults.check_snapshots(mode, tmp_path)
    assert [c.split(":")[0] for c in corrupt] == ["_CHECKPOINT_METADATA"], corrupt


def test_every_folder_with_modes_has_a_scenario():
    """The CI sample touches every folder the soak covers."""
    assert {key.split("/")[0] for key, *_ in SCENARIOS} == {m.folder for m in faults.MODES.values()}


def test_a_process_the_step_left_behind_is_found_and_killed(monkeypatch):
    """A step whose main process exits while a child it started in a session of its own lives on: found by the
    launch's marker variable, reported, and killed."""
    monkeypatch.setattr(faults, "GRACE", 1)
    marker = "test-leftover"
    child = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], " \
            "start_new_session=True)"
    main = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, faults.MARKER: marker},
                            start_new_session=True)
    assert main.wait(timeout=60) == 0
    leftovers = faults.wait_for_the_step_to_end(marker, {main.pid})
    assert len(leftovers) == 1 and "time.sleep(120)" in leftovers[0], leftovers
    assert faults.wait_for_the_step_to_end(marker, {main.pid}) == []  # killed by the first call


def test_the_moment_is_a_step_of_training_not_a_time(monkeypatch, tmp_path):
    """The injection waits for rank 0's line of the step drawn -- however fast or slow this launch runs compared with
    its reference (once, in CI, a moment drawn in wall time landed after a fast run had ended: MISSED) -- and hits the
    run under way: a stand-in that logs 40 steps, saves at step 10 and stops at its next step when signalled."""
    run = ("import pathlib, signal, sys, time\n"
           "stop = []\n"
           "signal.signal(signal.SIGTERM, lambda *_: stop.append(1))\n"
           "for step in range(1, 41):\n"
           "    time.sleep(0.05)\n"
           "    if stop:\n"
           "        print(f'stopped before step {step}', flush=True); sys.exit(75)\n"
           "    print(f'[rank0] epoch 1 | batch {step}/40 | step {step} | loss 1.0', flush=True)\n"
           "    if step == 10:\n"
           "        pathlib.Path(sys.argv[1], 'snapshot.snap').write_text('10')\n")
    monkeypatch.setattr(faults, "commands", lambda mode, ckpt, extra, marker: [
        ([sys.executable, "-c", run, str(ckpt)], {**faults.base_env(), faults.MARKER: marker})])
    (tmp_path / "ckpt").mkdir()
    mode = faults.Mode("pytorch", "stand-in", "-", "python", snapshots=("*.snap",), loads=lambda path: None)
    ref = faults.Reference({}, first_snapshot_step=10, last_step=40, seconds=2.0)
    drawn = {ref.draw(random.Random(seed)) for seed in range(200)}
    assert min(drawn) == 11 and max(drawn) == 36, sorted(drawn)  # after the first snapshot, before the last tenth
    injection = faults.Injection("term", step=25)
    result = faults.launch(mode, tmp_path / "ckpt", tmp_path / "logs", injection=injection, deadline=60)
    assert injection.fired_at is not None and injection.at_step >= 25, injection
    stopped = int(re.search(r"stopped before step (\d+)", result.output).group(1))
    assert result.code == 75 and 25 < stopped <= 40, result
    assert result.first_snapshot_step >= 10 and result.last_step == stopped - 1, result


def test_torchrun_is_launched_with_the_templates_signal_flags(tmp_path):
    """The agents of the soak take signals as the templates' agents do (`srun torchrun ... --signals-to-handle ...
    --shutdown-timeout 80`): without the flags USR1 kills an agent, which no job script lets happen."""
    for key, template in (("pytorch/torchrun", "multigpu_torchrun.sbatch"),
                          ("pytorch/nodes", "multinode_torchrun.sbatch")):
        text = (faults.ROOT / "pytorch" / template).read_text()
        wanted = re.search(r"(--signals-to-handle \S+ --shutdown-timeout \d+)", text).group(1).split()
        for argv, _ in faults.commands(faults.MODES[key], tmp_path, (), "m"):
            at = argv.index("--signals-to-handle") if "--signals-to-handle" in argv else len(argv)
            assert argv[at:at + 4] == wanted, (key, argv)


def test_the_plan_covers_every_pair_before_repeating():
    import soak  # the CLI, next to this file

    modes = list(faults.MODES.values())
    pairs = {(m.key, i) for m in modes for i in m.injections}
    drawn = soak.plan(modes, faults.INJECTIONS, len(pairs), seed=1)
    assert {(m.key, i) for m, i, _ in drawn} == pairs
    assert soak.plan(modes, faults.INJECTIONS, 5, seed=1) == drawn[:5]  # the seed fixes the draws


# ------------------------------------------------------------------------------------------ the small soak

# (mode, injection, extra flags, seed): each kind once, every folder, DataLoader workers where signals reach them.
SCENARIOS = [
    ("pytorch/torchrun", "kill-worker", (), 11),  # torchrun --max-restarts 2 restarts the workers in the launch
    ("pytorch/spawn", "kill-launcher", (), 12),  # the step dies with its launcher; relaunched, resumes
    ("pytorch/srun", "term", ("--num-workers", "2"), 13),  # scancel / time limit: exit 75, requeue, resume
    ("lightning/single", "usr1", ("--num-workers", "2"), 14),  # Slurm's warning signal to every process
    # monai, modulus, jax
    ("monai/single", "term", ("--num-workers", "2"), 21),  # test_monai.py signals srun ranks, never DataLoader workers
    ("modulus/single", "usr1", ("--num-workers", "2"), 22),  # test_modulus.py signals srun tasks, never loader workers
    ("jax/single", "usr1", ("--num-workers", "2"), 23),  # a signal while the loader's threads prefetch
    # deepspeed, nemo, ray: paths their own tests do not take, in the cheapest mode that takes them
    # deepspeed/torchrun kill-worker (ranks restarted by torchrun) took 243 s here under load: in `make soak` only
    ("deepspeed/single", "kill-worker", ("--num-workers", "2"), 15),  # SIGKILL at any step: the newest whole tag
    ("nemo/single", "kill-worker", ("--num-workers", "2"), 16),  # SIGKILL at any step (a save too); no worker left
    ("ray/single", "usr1", ("--num-workers", "2"), 17),  # single_gpu.py (no Ray) preempted: exit 75, resume
]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted run per reference group (pytorch's 2-rank modes train identically), computed once."""
    cache = {}

    def get(mode):
        if mode.reference not in cache:
            env_python(mode.folder)  # a missing environment: skip locally, fail in CI
            cache[mode.reference] = faults.reference(mode, tmp_path_factory.mktemp("reference"))
        return cache[mode.reference]
    return get


@pytest.mark.parametrize("key, kind, extra, seed", SCENARIOS, ids=[f"{k}-{i}" for k, i, _, _ in SCENARIOS])
def test_injected_run_recovers_or_fails_clearly(references, tmp_path, key, kind, extra, seed):
    mode = faults.MODES[key]
    record = faults.run_scenario(mode, kind, references(mode), tmp_path, random.Random(seed), extra=extra)
    launches = record["launch_records"]
    detail = f"{record}\n--- output of the last launch ---\n{record.get('last_output', '')[-4000:]}"
    assert record["outcome"] in ("RECOVERED", "CLEAR-ERROR"), detail
    assert not any(lr["corrupt"] or lr["leftovers"] or lr["hang"] for lr in launches), detail
    if record["outcome"] == "RECOVERED":
        assert record["time_to_recover_s"] is not None, detail
    # the fault hit a run under way: it stopped (a signal: exit 75 at a step boundary) or restarted from a snapshot
    if kind in ("term", "usr1"):
        assert launches[0]["code"] != 0 and launches[1]["resumes"] == 1, detail
    else:
        assert sum(lr["resumes"] for lr in launches) >= 1, detail
