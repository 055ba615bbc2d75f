"""CONTRACT.md, checked over every framework folder in the repository.

The folders, the common flags, the tool folders that are out of scope and the exceptions all come from CONTRACT.md
itself: a new folder is checked the moment it appears, and an exception exists only where the contract lists it.
"""

import ast
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from forked import forked_each
from helpers import ROOT, clean_env, env_python, free_port, run, unavailable
from recipes import RECIPES

pytestmark = [pytest.mark.contract, pytest.mark.timeout(600)]

CONTRACT = (ROOT / "CONTRACT.md").read_text()


def section(number: str) -> str:
    """The text of one `## C<n> ...` section (or `## Scope`, `## Exceptions`)."""
    match = re.search(rf"^## {number}\b.*?(?=^## |\Z)", CONTRACT, re.M | re.S)
    assert match, f"CONTRACT.md has no section {number}"
    return match.group(0)


TOOL_FOLDERS = set(re.findall(r"`(\w+)/`", section("Scope")))
FOLDERS = sorted(p.name for p in ROOT.iterdir()
                 if p.is_dir() and (p / "requirements.txt").exists() and p.name not in TOOL_FOLDERS)
COMMON_FLAGS = re.findall(r"^\| `(--[\w-]+)` \|", section("C2"), re.M)
LAUNCH_SCRIPTS = re.findall(r"^\|[^|\n]+\| `(\w+\.py)` \|", section("C1"), re.M)
MODULES = re.findall(r"^\| `(\w+\.py)` \| module \|", section("C1"), re.M)  # recipe.py, cluster.py, toolkit.py
EPOCH_LINE = re.compile(re.search(r"Regular expression the tests use:\n`(.+?)`", section("C3")).group(1))
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")
EXCEPTIONS = {(folder, rule) for folder, rule in
              re.findall(r"^\| `?(\w+)/?`? \| `?([\w:.-]+)`? \|", section("Exceptions"), re.M)
              if folder != "folder"}
SMOKE = ["--epochs", "2", "--dataset-size", "16", "--batch-size", "4", "--log-every", "1"]


def import_toolkit():
    """toolkit.py imported into this process (the same file in every folder: pytorch/'s copy)."""
    sys.path.insert(0, str(ROOT / "pytorch"))
    try:
        import toolkit
    finally:
        sys.path.pop(0)
    return toolkit


def excepted(folder: str, rule: str) -> bool:
    """True when CONTRACT.md's exceptions table excuses `folder` from `rule` (e.g. C1:multigpu.py) or its whole
    rule (C1)."""
    return (folder, rule) in EXCEPTIONS or (folder, rule.split(":")[0]) in EXCEPTIONS


def recipe(folder: str, script: str, *args, env=None, timeout=240, check=True):
    """Run a recipe the way a user does: from inside the folder, with the folder's own environment."""
    return run([env_python(folder), script, *args], cwd=ROOT / folder, env=env or clean_env(),
               timeout=timeout, check=check)


def training_scripts(folder: str) -> list[Path]:
    """Every script of the folder that runs on its own (has a __main__ guard); the rest are its modules."""
    return sorted(p for p in (ROOT / folder).glob("*.py") if '__name__ == "__main__"' in p.read_text())


def test_the_contract_is_readable():
    """Guard for the parsing above: if CONTRACT.md's tables change shape, fail here rather than check nothing."""
    assert {"pytorch", "lightning"} <= set(FOLDERS), FOLDERS
    assert {"benchmarks", "slurm_templates", "tests", "tools"} <= TOOL_FOLDERS
    assert {"--epochs", "--checkpoint-dir", "--backend", "--timeout", "--timings-file"} <= set(COMMON_FLAGS)
    assert LAUNCH_SCRIPTS == ["single_gpu.py", "multigpu.py", "multigpu_torchrun.py", "multinode.py"]
    assert MODULES == ["recipe.py", "cluster.py", "toolkit.py"]
    assert EPOCH_LINE.match("[rank0] epoch 2/3 | step 32 | loss 0.1234 | acc 0.9512 | 8043 samples/s | 1.2 s")


# ------------------------------------------------------------------------------------------------ C1 files


@pytest.mark.parametrize("folder", FOLDERS)
def test_files(folder):
    path = ROOT / folder
    for name in ("README.md", "requirements.txt", *MODULES):
        assert (path / name).exists(), f"{folder}/ has no {name} (CONTRACT.md C1)"
    assert not (path / "common.py").exists(), f"{folder}/common.py: split into {', '.join(MODULES)} (CONTRACT.md C1)"
    for script in LAUNCH_SCRIPTS:
        assert (path / script).exists() or excepted(folder, f"C1:{script}"), \
            f"{folder}/{script} missing and not an exception in CONTRACT.md"
    for script in training_scripts(folder):
        templates = [*path.glob(f"{script.stem}.sbatch"), *path.glob(f"{script.stem}_*.sbatch")]
        assert templates or excepted(folder, f"C1:{script.name}"), f"{folder}/{script.name} has no sbatch template"
    assert (path / "multinode.sbatch").exists() or excepted(folder, "C8:multinode.sbatch"), \
        f"{folder}/ has no multinode.sbatch (the preemption-safe multi-node template, CONTRACT.md C8)"


TEACHING_LINES = int(re.search(r"`recipe.py` \| module \|[^|]*?(\d+) lines", section("C1")).group(1))
DIFF_LINES = int(re.search(r"changes at most (\d+) lines", section("C1")).group(1))


def test_toolkit_is_identical_in_every_folder():
    """toolkit.py is the same file everywhere: a fix made in one folder fails here until it reaches all."""
    copies = {f: (ROOT / f / "toolkit.py").read_bytes() for f in FOLDERS if (ROOT / f / "toolkit.py").exists()}
    assert set(copies) == set(FOLDERS), f"no toolkit.py in {sorted(set(FOLDERS) - set(copies))}"
    differ = sorted(f for f in FOLDERS if copies[f] != copies["pytorch"])
    assert not differ, f"toolkit.py differs from pytorch/toolkit.py in {differ} (CONTRACT.md C1: identical copies)"


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_lesson_comes_first(folder):
    """recipe.py (model, data, loop, snapshots) is short enough to read top to bottom; the plumbing lives in
    cluster.py behind a map; a version workaround is one tagged line; every entry script has one skeleton."""
    path = ROOT / folder
    lines = len((path / "recipe.py").read_text().splitlines())
    assert lines <= TEACHING_LINES, f"{folder}/recipe.py has {lines} lines, more than {TEACHING_LINES} (C1)"
    for module in ("cluster.py", "toolkit.py"):
        doc = ast.get_docstring(ast.parse((path / module).read_text())) or ""
        assert "Map:" in doc, f"{folder}/{module} has no map of its names at its top (C1)"
    for py in path.glob("*.py"):
        for n, line in enumerate(py.read_text().splitlines(), 1):
            if "WORKAROUND" in line:
                assert re.search(r"# WORKAROUND\([\w.-]+ [\w.<>=]+, [^)]+\): \S", line), \
                    f"{py.relative_to(ROOT)}:{n}: a workaround is `# WORKAROUND(package version, upstream): why`"
    for script in training_scripts(folder):
        tree = ast.parse(script.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "main" in defined, f"{folder}/{script.name} has no main() (C1 skeleton)"
        assert re.search(r"^    run\(main\b", script.read_text(), re.M), \
            f"{folder}/{script.name}: the entry point is `run(main)` under the __main__ guard (C1 skeleton)"


@pytest.mark.parametrize("folder", FOLDERS)
def test_single_to_multi_process_is_a_small_diff(folder):
    """`diff single_gpu.py multigpu_torchrun.py` (or multigpu.py where the framework has no torchrun) is the
    lesson: what going multi-process changes, nothing else."""
    path = ROOT / folder
    other = path / "multigpu_torchrun.py"
    other = other if other.exists() else path / "multigpu.py"
    diff = subprocess.run(["diff", path / "single_gpu.py", other], capture_output=True, text=True).stdout
    changed = [ln for ln in diff.splitlines() if ln.startswith(("<", ">"))]
    assert len(changed) <= DIFF_LINES, f"diff single_gpu.py {other.name}: {len(changed)} changed lines (C1)"


# ------------------------------------------------------------------------------------------------ C2 command line


def help_scripts(folder: str) -> list[str]:
    """The launch scripts whose --help test_help_lists_the_common_flags reads (launchers may have their own)."""
    return [s.name for s in training_scripts(folder) if s.name.startswith(("single_gpu", "multigpu", "multinode"))]


class Forked:
    """The quick checks of one folder, every command line run once, forked (tests/forked.py), in one process
    per folder: --help of every launch script (C2), the bad-input cases (C4), the scripts given GPUs they cannot use
    (C12), the launcher-less starts (C4) and the toy fingerprint (C11). Each test reads its own cases' results;
    each test's --checkpoint-dir is a directory of its own, so that "nothing written" says which test wrote."""

    def __init__(self, folder: str, tmp_path_factory):
        self.dir = tmp_path_factory.mktemp(f"forked-{folder}")
        (self.dir / "bad-input").mkdir()
        (self.dir / "bad-input" / "a-file").write_text("not a directory")
        cases = {f"help {script}": dict(script=script, args=["--help"], timeout=180) for script in help_scripts(folder)}
        for flags in BAD_FLAGS:
            if not excepted(folder, f"C2:{flags[0]}"):
                cases[f"bad {' '.join(flags)}"] = dict(script="single_gpu.py",
                                                       args=[*flags, "--checkpoint-dir", self.bad_ckpt], timeout=120)
        # A --checkpoint-dir that is a file (a traceback at the first snapshot in all eight folders, #27).
        cases["bad a-file"] = dict(script="single_gpu.py",
                                   args=["--checkpoint-dir", self.dir / "bad-input" / "a-file"], timeout=120)
        gpu_args = [*SMOKE, "--checkpoint-dir", self.gpu_ckpt]
        cases["gpus SLURM_GPUS_ON_NODE=2"] = dict(script="single_gpu.py", args=gpu_args,
                                                  env={"SLURM_GPUS_ON_NODE": "2"}, timeout=180)
        cases["gpus --backend nccl"] = dict(script=multi_process_script(folder), args=[*gpu_args, "--backend", "nccl"],
                                            timeout=180)
        for script in ("multigpu_torchrun.py", "multinode.py"):
            if (ROOT / folder / script).exists():
                cases[f"launch {script}"] = dict(script=script, args=SMOKE, timeout=180)
        if folder in toy_carriers():
            cases["toy"] = dict(code=TOY_FINGERPRINT, timeout=180)
        # The parent imports what single_gpu.py imports, then recipe.py: the framework, which a script may import
        # only once its command line is checked (nemo's scripts import NeMo late).
        self.results = forked_each(folder, cases, imports=["single_gpu.py"], preload="import recipe", timeout=540)

    @property
    def bad_ckpt(self) -> Path:
        return self.dir / "bad-input" / "ckpt"

    @property
    def gpu_ckpt(self) -> Path:
        return self.dir / "no-silent-cpu" / "ckpt"

    def __getitem__(self, name: str) -> subprocess.CompletedProcess:
        return self.results[name]


_FORKED: dict[str, Forked | BaseException] = {}


def forked(folder: str, tmp_path_factory) -> Forked:
    """The folder's Forked, run the first time a test asks for it (all of test_contract.py runs in one test process;
    a failure is kept too, and given to every test that asks, rather than run again)."""
    if folder not in _FORKED:
        try:
            _FORKED[folder] = Forked(folder, tmp_path_factory)
        except BaseException as e:  # pytest.fail's Failed is a BaseException
            _FORKED[folder] = e
    if isinstance(_FORKED[folder], BaseException):
        raise _FORKED[folder]
    return _FORKED[folder]


@pytest.mark.parametrize("folder", FOLDERS)
def test_help_lists_the_common_flags(folder, tmp_path_factory):
    """Every launch script's `--help` (C2) exits 0 by sys.exit, as argparse's does (not by training), and lists the
    common flags; multigpu.py's its --nprocs too."""
    runs = forked(folder, tmp_path_factory)
    for script in help_scripts(folder):
        proc = runs[f"help {script}"]
        assert proc.returncode == 0 and proc.exited, \
            f"{folder}/{script} --help: exit {proc.returncode}, by sys.exit: {proc.exited}\n{proc.stderr[-3000:]}"
        missing = [f for f in COMMON_FLAGS if f not in proc.stdout and not excepted(folder, f"C2:{f}")]
        assert not missing, f"{folder}/{script} --help lacks {missing}"
        if script == "multigpu.py":
            assert "--nprocs" in proc.stdout, f"{folder}/multigpu.py has no --nprocs"


# ------------------------------------------------------------------------------------------------ C4 exit codes

BAD_FLAGS = [["--epochs", "0"], ["--batch-size", "0"], ["--lr", "-1"], ["--lr", "inf"], ["--num-workers", "-1"],
             ["--log-every", "0"], ["--data", "no-such-format"], ["--save-every-steps", "0"]]


def assert_one_error_line(proc, what):
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert proc.returncode == 2, f"{what}: exit {proc.returncode}, want 2\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    assert len(errors) == 1, f"{what}: want exactly one error line on stderr, got {errors}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, f"{what}: traceback\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_bad_input_is_one_line_and_exit_2(folder, tmp_path_factory):
    runs = forked(folder, tmp_path_factory)
    for flags in BAD_FLAGS:
        if not excepted(folder, f"C2:{flags[0]}"):
            assert_one_error_line(runs[f"bad {' '.join(flags)}"], f"{folder}/single_gpu.py {' '.join(flags)}")
    assert not runs.bad_ckpt.exists(), "a rejected run must not write anything"
    proc = runs["bad a-file"]
    assert_one_error_line(proc, f"{folder}/single_gpu.py --checkpoint-dir <a file>")
    assert "a-file is a file" in proc.stderr, proc.stderr[-2000:]


def test_an_error_only_rank_0_prints_gets_out_before_the_other_ranks_leave(monkeypatch, capsys):
    """RecipeError(every_rank=False): rank 0 prints the line and exits 2 at once; a rank > 0 prints nothing and
    waits QUIET_RANKS_WAIT_S before it exits 2 -- under srun --kill-on-bad-exit a rank 1 that left first ended the
    step before rank 0's line was out (lightning's --devices mismatch job: FAILED with no line, seen in CI's
    rehearsal). time.sleep is patched: what is checked is that the wait happens, not how long it takes."""
    toolkit = import_toolkit()
    slept = []
    monkeypatch.setattr(toolkit.time, "sleep", slept.append)

    def main():
        raise toolkit.RecipeError("every rank finds this", every_rank=False)

    import signal
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}  # run() installs its own
    try:
        for rank in (0, 1):
            with pytest.raises(SystemExit) as leaving:
                toolkit.run(main, rank=rank)
            assert leaving.value.code == 2
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert err.splitlines() == ["[rank0] error: every rank finds this"], err
    assert slept == [toolkit.QUIET_RANKS_WAIT_S] and toolkit.QUIET_RANKS_WAIT_S > 0


def two_ranks_agreeing(seconds_per_step, steps, signalled=None, start=0):
    """Two ranks, each a thread with its own PreemptionFlag and a fake clock that moves by its seconds per step,
    through steps start+1.. `steps`; their reduce_max is the max over both, a barrier each side of it (a rank that
    checks where the other does not breaks the barrier: the disagreement a real all_reduce would hang on).
    `signalled`: (rank, step) -- that rank's signal comes during that step. Returns per rank (the steps it checked
    at with the value it contributed, the step it stopped after or None)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    toolkit = import_toolkit()
    barrier, values = threading.Barrier(2, timeout=20), [None, None]

    def rank(r):
        flag, now, checks = toolkit.PreemptionFlag(), [0.0], []
        flag.clock = lambda: now[0]

        def reduce_max(value):
            checks.append((step, value))
            values[r] = value
            barrier.wait()
            slowest = max(values)
            barrier.wait()  # both have read before either writes again
            return slowest

        for step in range(start + 1, steps + 1):
            now[0] += seconds_per_step[r]
            flag.requested = flag.requested or signalled == (r, step)
            if flag.agreed(step, reduce_max):
                return checks, step
        return checks, None

    with ThreadPoolExecutor(2) as pool:
        return [f.result() for f in [pool.submit(rank, 0), pool.submit(rank, 1)]]


def checked_at(checks):
    return [step for step, _ in checks]


def test_fast_steps_are_checked_once_early_then_every_check_every_steps():
    """#27: with fast steps (every CPU test) the ranks agree at the multiples of CHECK_EVERY (10), as always, after
    one early check at the second step boundary of the process (the first with a step time). A resumed run's
    early check is its second boundary too."""
    for checks, stop in two_ranks_agreeing([0.01, 0.02], 35):
        assert checked_at(checks) == [2, 10, 20, 30] and stop is None, checks
    for checks, stop in two_ranks_agreeing([0.01, 0.02], 35, start=13):
        assert checked_at(checks) == [15, 20, 30] and stop is None, checks
    # the early check only measures: a signal before it (during step 1) stops the ranks at step 10, as always
    for checks, stop in two_ranks_agreeing([0.01, 0.02], 35, signalled=(0, 1)):
        assert checked_at(checks) == [2, 10] and stop == 10 and checks[0][1] != math.inf, checks


def test_slow_steps_are_checked_often_enough_for_slurms_warning():
    """#27: Slurm's warning comes 90 s before the end; 10 steps of an LLM (5-60 s each) outlast it and nothing is
    saved. Every check sends each rank's seconds per step; from the slowest rank's every rank derives the same
    interval, BUDGET_S // seconds (1 to CHECK_EVERY): one rank at 12 s/step -> every 2 steps on both, and a signal
    to the fast rank during step 7 stops both after step 8; 60 s/step -> every step."""
    toolkit = import_toolkit()
    assert toolkit.PreemptionFlag.BUDGET_S == 30
    (fast, fast_stop), (slow, slow_stop) = two_ranks_agreeing([0.01, 12.0], 20, signalled=(0, 7))
    assert checked_at(fast) == checked_at(slow) == [2, 4, 6, 8] and fast_stop == slow_stop == 8, (fast, slow)
    assert [v for _, v in slow[:3]] == [12.0, 12.0, 12.0] and fast[-1][1] == math.inf, (fast, slow)
    for checks, stop in two_ranks_agreeing([60.0, 0.5], 6):
        assert checked_at(checks) == [2, 3, 4, 5, 6] and stop is None, checks
    (_, stop), _ = two_ranks_agreeing([60.0, 0.5], 6, signalled=(0, 3))
    assert stop == 3


def test_a_signal_to_one_rank_dominates_any_step_time():
    """The signalled rank sends inf: the max over the ranks is inf whatever the other's step time, and both stop
    at the same check (the rank that got no signal too). (The early check, at step 2, measures only.)"""
    (first, first_stop), (second, second_stop) = two_ranks_agreeing([1e6, 0.01], 5, signalled=(1, 2))
    assert first_stop == second_stop == 3, (first, second)
    assert first == [(2, 1e6), (3, 1e6)] and second == [(2, 0.01), (3, math.inf)], (first, second)


def test_one_rank_checks_by_its_own_step_time():
    """With one rank (reduce_max None) the same rule, with no communication: 12 s per step, a signal during step 5
    -> stops after step 6 (every 2 steps), not at step 10."""
    toolkit = import_toolkit()
    flag, now = toolkit.PreemptionFlag(), [0.0]
    flag.clock = lambda: now[0]
    for step in range(1, 11):
        now[0] += 12.0
        flag.requested = flag.requested or step == 5
        if flag.agreed(step):
            break
    assert step == 6


def test_a_rank_that_saved_tells_the_job_script(tmp_path, monkeypatch):
    """Behind torchrun's or DeepSpeed's launcher, which exit 1 after a signal, the job script could not tell a
    preempted step from a crash when Slurm signalled the step alone (preemption with GraceTime: the batch shell
    gets nothing, so its trap never set `preempted`), and the job FAILED with a snapshot saved. A rank leaving with
    75 now leaves $SLURM_SUBMIT_DIR/.preempted-$SLURM_JOB_ID for the preemption block; outside sbatch, nothing."""
    toolkit = import_toolkit()
    flag = toolkit.PreemptionFlag()
    for name in ("SLURM_SUBMIT_DIR", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as restore:
        for sig in flag.SIGNALS:
            restore.callback(signal.signal, sig, signal.getsignal(sig))
        flag.saved()  # not under sbatch
        assert list(tmp_path.iterdir()) == []
        monkeypatch.setenv("SLURM_SUBMIT_DIR", str(tmp_path))
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        flag.saved()
    assert [p.name for p in tmp_path.iterdir()] == [".preempted-4242"]


def test_the_resource_tracker_outlives_the_preemption_signal():
    """Slurm signals every process of a step: multiprocessing's resource tracker, started by spawn launchers, died
    of SIGUSR1 (it ignores only SIGINT/SIGTERM) and came back with KeyError tracebacks in the log of a preempted
    lightning/multigpu.sbatch job. After toolkit's signal set-up, multiprocessing starts it with USR1 blocked (and
    only when something spawns). In a fresh process: this test process may already have a tracker."""
    code = ("import os, signal, sys, time; sys.path.insert(0, sys.argv[1]); import toolkit\n"
            "toolkit.PREEMPTION.install()\n"
            "from multiprocessing import resource_tracker\n"
            "assert resource_tracker._resource_tracker._pid is None, 'a tracker nothing asked for'\n"
            "resource_tracker.ensure_running()  # as a spawn does\n"
            "pid = resource_tracker._resource_tracker._pid\n"
            "os.kill(pid, signal.SIGUSR1); time.sleep(1)\n"
            "print(os.waitpid(pid, os.WNOHANG))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "pytorch")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "(0, 0)", f"the tracker ended (pid, status): {out}"


def test_a_rank_leaving_with_75_stays_75_when_a_late_term_comes():
    """C7 under srun --kill-on-bad-exit: the first rank to exit 75 makes srun send TERM to the others, which may be
    shutting down already; Python has then put TERM's default action (death) back, srun reported 143 instead of 75,
    and the template did not requeue a preempted job (preemption with GraceTime, seen in 3 of 4 folders under the
    local Slurm). In a fresh process: a TERM lands during the interpreter's shutdown, after main exited 75."""
    code = ("import os, subprocess, sys, time; sys.path.insert(0, sys.argv[1]); import toolkit\n"
            "class SlowTeardown:\n"
            "    def __del__(self): time.sleep(1.0)\n"
            "keep = SlowTeardown()  # a framework object torn down at exit (a process group, a thread pool)\n"
            "def main():\n"
            "    subprocess.Popen(['sh', '-c', f'sleep 0.5; kill -TERM {os.getpid()}'])\n"
            "    sys.exit(toolkit.PREEMPTED_EXIT_CODE)\n"
            "toolkit.run(main)")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "pytorch")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 75, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    """C6: a save that fails half-way (a full disk, a quota) leaves the last good file as it was and no half-written
    `.tmp` beside it (which the next save would overwrite, but which fills the disk meanwhile and confuses users)."""
    toolkit = import_toolkit()
    path = str(tmp_path / "snapshot.pt")
    toolkit.atomic_write(path, lambda f: f.write(b"good"))

    def fail_half_way(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        toolkit.atomic_write(path, fail_half_way, previous=str(tmp_path / "snapshot.prev.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.pt"]
    assert (tmp_path / "snapshot.pt").read_bytes() == b"good"


def test_the_validators_refuse_the_neighbours_of_bad_input(tmp_path):
    """toolkit's validators (C2), with the neighbours of each case the subprocess test sends: every non-finite
    number (nan, inf, -inf, 1e999 which is inf), and every path that cannot become a directory (a file, a path
    below a file, an empty path); a directory that exists or can be made passes."""
    toolkit = import_toolkit()
    from argparse import ArgumentTypeError

    for text in ("nan", "inf", "-inf", "1e999", "0", "-1e-9"):
        with pytest.raises(ArgumentTypeError, match="positive finite number"):
            toolkit.positive_float(text)
    assert toolkit.positive_float("3e-4") == 3e-4
    (tmp_path / "f").write_text("")
    for text, says in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub" / "dir", "which is a file"),
                       ("  ", "empty path")):
        with pytest.raises(ArgumentTypeError, match=says):
            toolkit.directory(str(text))
    for text in (tmp_path, tmp_path / "new" / "deeper", "relative/new"):
        assert toolkit.directory(str(text)) == str(text)


@pytest.mark.parametrize("folder", FOLDERS)
def test_launch_without_the_launchers_variables(folder, tmp_path_factory):
    """multigpu_torchrun.py and multinode.py started by plain `python`: one line saying how to launch them."""
    runs = forked(folder, tmp_path_factory)
    for script in ("multigpu_torchrun.py", "multinode.py"):
        if (ROOT / folder / script).exists():
            assert_one_error_line(runs[f"launch {script}"], f"{folder}/{script} without a launcher")


# ------------------------------------------------------------------------------------------------ C3, C5, C6


# A crash, which no signal announces: `python -c CRASH PATTERN script ARGS` runs the script as __main__ and
# SIGKILLs its own process right after it printed a line that matches PATTERN (no handler, no cleanup runs).
CRASH = """import os, re, runpy, signal, sys
pattern, sys.argv = re.compile(sys.argv[1]), sys.argv[2:]
class CrashAfter:
    def __init__(self, stream):
        self.stream = stream
    def write(self, text):
        written = self.stream.write(text)
        if pattern.search(text):
            self.stream.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return written
    def __getattr__(self, name):
        return getattr(self.stream, name)
sys.stdout = CrashAfter(sys.stdout)
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# The smoke run (C2, C3, C5, C6, and C6's --save-every-steps crash) runs in test_copy_alone_installs_and_runs below,
# from the copied folder's own environment: one series of runs checks it all (the smoke run, its resume and the
# crash test ran the same smoke run, ~300 s of CI between them, once each).
SAVED = re.compile(r"^\[rank0\] snapshot saved to .+ \(step (\d+)\)$", re.M)
PROGRESS = re.compile(r"^\[rank0\] epoch (\d) \| batch (\d)/4 \| step (\d) \| loss \S+$", re.M)


def check_smoke_run(crashed: str, resumed: str, finished: str, ckpt: Path):
    """The contract's smoke run -- 2 epochs of 4 steps, the contract's log lines, snapshots -- with a snapshot every
    3 steps as well (C2/C6 --save-every-steps, #27), crashed right after it said the step-6 snapshot was saved
    (SIGKILL: nothing runs on the way out). It saved at steps 3 and 6 by the cadence, mid-epoch, and at 4, epoch 1's
    end; run again, it resumes at step 6 and trains epoch 2's last two batches only, as after a preemption, and
    ends; run a third time, it resumes the finished run, trains 0 steps and exits 0. Before: --save-every-steps was
    unknown (exit 2). A framework that saves asynchronously (jax, nemo) may print the step-6 line after steps 7 and
    8 trained: the crashed run's progress lines then go on to step 7 or 8, and what the crash loses is counted by
    where the resumed run starts."""
    def epoch_lines(out):
        return [EPOCH_LINE.match(ln) for ln in out.splitlines()
                if ln.startswith("[rank0] epoch ") and "samples/s" in ln]

    crashed_epochs, resumed_epochs = epoch_lines(crashed), epoch_lines(resumed)
    assert all(crashed_epochs + resumed_epochs), f"epoch lines do not match CONTRACT.md C3:\n{crashed}\n{resumed}"
    assert [(m[1], m[2], m[3]) for m in crashed_epochs][:1] == [("1", "2", "4")], crashed[-3000:]
    assert [(m[1], m[2], m[3]) for m in resumed_epochs] == [("2", "2", "8")], resumed[-3000:]
    assert all(float(m[4]) == float(m[4]) for m in crashed_epochs + resumed_epochs)  # a number, not nan
    # a progress line every step (--log-every 1): steps 1.. in the crashed run, the rest (and only 7, 8) resumed
    before = [int(m[3]) for m in PROGRESS.finditer(crashed)]
    trained = [m.groups() for m in PROGRESS.finditer(resumed)]
    assert before == list(range(1, len(before) + 1)) and len(before) >= 6, f"crashed run's steps {before}\n{crashed}"
    assert trained == [("2", "3", "7"), ("2", "4", "8")], f"resumed, trained {trained}\n{resumed[-3000:]}"
    saved = SAVED.findall(crashed)
    assert saved == ["3", "4", "6"] and "done:" not in crashed, f"snapshots at {saved}\n{crashed[-3000:]}"
    assert re.search(r"^\[rank0\] resumed from .+: epoch 2, step 6$", resumed, re.M), resumed[-3000:]
    assert SAVED.findall(resumed) == ["8"], resumed[-3000:]
    assert re.search(r"^\[rank0\] done: 8 steps in [\d.]+ s$", resumed, re.M), resumed[-3000:]
    assert any(ckpt.iterdir()), "nothing written to --checkpoint-dir"
    assert re.search(r"^\[rank0\] resumed from .+: epoch 3, step 8$", finished, re.M), finished[-3000:]
    assert not [ln for ln in finished.splitlines() if EPOCH_LINE.match(ln)], "a finished run trained again"


# ------------------------------------------------------------------------------------------------ C12 devices


def multi_process_script(folder: str) -> str:
    return "multigpu_torchrun.py" if (ROOT / folder / "multigpu_torchrun.py").exists() else "multigpu.py"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_silent_cpu(folder, tmp_path_factory):
    """A job given GPUs that the framework cannot use -- this machine has none: exactly the case of a CPU wheel or
    a dead driver on a GPU node -- stops with one line naming what gave it GPUs, exit 2, before writing anything:
    single_gpu.py under Slurm's SLURM_GPUS_ON_NODE, the multi-process script asked for --backend nccl. (The
    other side, --backend gloo with GPUs given, trains: every job of the Slurm tests, on the local cluster's
    fake GPUs.)"""
    runs = forked(folder, tmp_path_factory)
    for script, says in [("single_gpu.py", "SLURM_GPUS_ON_NODE=2"), (multi_process_script(folder), "--backend nccl")]:
        proc = runs[f"gpus {says}"]
        assert_one_error_line(proc, f"{folder}/{script} given GPUs it cannot use ({says})")
        assert says in proc.stderr and "rather than training on the CPU" in proc.stderr, proc.stderr[-2000:]
    assert not runs.gpu_ckpt.exists(), "a refused run must not write anything"


def test_the_silent_cpu_seam_with_the_gpu_facts_patched_in(monkeypatch):
    """toolkit's seam on its own (C12): what counts as GPUs given, and the causes a torch folder names -- a CPU
    build, a driver torch cannot use (its warning quoted), a usable GPU (no problem) -- with torch's answers
    patched, as a GPU node with a broken install would give them."""
    toolkit = import_toolkit()
    import torch
    import warnings

    given = toolkit.gpus_given
    assert given({}) == "" and given({"SLURM_GPUS_ON_NODE": "0"}) == ""
    assert given({"CUDA_VISIBLE_DEVICES": ""}) == given({"CUDA_VISIBLE_DEVICES": "-1"}) == ""
    assert given({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == ""  # Slurm's value when gres.conf names no files
    assert given({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}) == "SLURM_GPUS_ON_NODE=4"
    assert given({"CUDA_VISIBLE_DEVICES": "GPU-6f2a"}) == "CUDA_VISIBLE_DEVICES=GPU-6f2a"

    def refused(backend, problem, environ):
        try:
            toolkit.refuse_silent_cpu(backend, lambda: problem, environ)
        except toolkit.RecipeError as e:
            return str(e)
        return ""

    gpus = {"SLURM_GPUS_ON_NODE": "8"}
    assert refused("auto", "no driver", gpus).startswith("SLURM_GPUS_ON_NODE=8, but no driver; stopping")
    assert refused("nccl", "no driver", {}).startswith("--backend nccl, but no driver")
    assert refused("gloo", "no driver", gpus) == ""  # asked for explicitly
    assert refused("auto", "no driver", {}) == ""  # a CPU machine, a CPU job
    assert refused("auto", "", gpus) == ""  # the GPUs work

    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in toolkit.torch_cuda_problem()
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def old_driver():
        warnings.warn("CUDA initialization: The NVIDIA driver on your system is too old (found version 12020).",
                      stacklevel=2)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", old_driver)
    problem = toolkit.torch_cuda_problem()
    assert "built for CUDA 13.0" in problem and "driver on your system is too old" in problem, problem
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert toolkit.torch_cuda_problem() == ""


@pytest.mark.parametrize("folder", FOLDERS)
def test_snapshots_are_loaded_to_the_cpu(folder):
    """C6: every torch.load of a folder names map_location="cpu". A snapshot loaded onto the GPU breaks resume there
    and only there: torch.set_rng_state(<a CUDA tensor>) raises "RNG state must be a torch.ByteTensor" (#22:
    monai/ and modulus/ died so on every requeue); load_state_dict copies CPU tensors onto the device anyway."""
    wrong = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                where = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("map_location")
                if where not in ("'cpu'", '"cpu"'):
                    wrong.append(f"{path.name}:{node.lineno} map_location={where}")
    assert not wrong, f"{folder}: snapshots loaded elsewhere than to the CPU: {wrong}"


# ------------------------------------------------------------------------------------------------ C8 templates


@pytest.mark.lint
@pytest.mark.parametrize("folder", FOLDERS)
def test_templates_follow_the_conventions(folder):
    templates = sorted((ROOT / folder).glob("*.sbatch"))
    assert templates, f"{folder}/ has no sbatch templates"
    run([sys.executable, ROOT / "slurm_templates" / "tools" / "sbatch_lint.py", "--strict", *templates])
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck not installed (tools/system_deps.sh installs it)")
    run(["shellcheck", *templates])
    for path in templates:
        text = path.read_text()
        where = f"{folder}/{path.name}"
        assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text, where
        assert "# EDIT" in text and "#SBATCH --output=%x-%j.out" in text, where
        for port in re.findall(r"MASTER_PORT=\S*\$\(\((.*?)\)\)", text):
            assert re.fullmatch(r"\s*15000 \+ SLURM_JOB_ID % 15000\s*", port), f"{where}: port rule is {port!r}"
        first_srun = next((m.start() for m in re.finditer(r"^\s*srun\b", text, re.M)), None)
        if first_srun is not None:
            export = text.find("export SRUN_CPUS_PER_TASK=")
            assert 0 <= export < first_srun or "srun --cpus-per-task" in text, \
                f"{where}: srun does not inherit --cpus-per-task (Slurm 22.05-23.02): export SRUN_CPUS_PER_TASK"
        assert "checkpoints/$SLURM_JOB_ID" not in text, f"{where}: a resubmitted job would start over"
        if "--checkpoint-dir" in text:
            assert 'RUN=${RUN:-$SLURM_JOB_NAME}' in text and '"checkpoints/$RUN"' in text, where
        assert "SLURM_GPUS_ON_NODE:-" not in text, f"{where}: silent fallback when the GPU count is unknown"
    multinode = ROOT / folder / "multinode.sbatch"
    if multinode.exists():
        text = multinode.read_text()
        for needle in ("#SBATCH --signal=B:USR1@", "#SBATCH --requeue", "#SBATCH --open-mode=append", "trap ",
                       "scontrol requeue", "MAX_RESTARTS", "75"):
            assert needle in text, f"{folder}/multinode.sbatch is not preemption-safe: no {needle!r} (C8)"


# Stand-ins for Slurm's commands, for running a template's own shell logic outside Slurm. The step (srun, or Ray's
# driver) is a preempted run: Slurm's USR1 reaches the batch shell, the step saves and exits 75. While the shell
# then requeues, the signal comes again, and a TERM -- as on a real cluster: slurmctld re-sends a signal whose
# RPC a busy slurmd answered late, a user runs `scancel --signal` twice, the time limit arrives.
# `scontrol show hostnames` prints the node list of a big job, 2000 nodes, one write per name (a long list
# takes several writes): a reader that stops after the first line (`| head -n 1`) kills it with SIGPIPE, and
# under `set -o pipefail` that ends the job script at its first line.
FAKE_SLURM = {
    "srun": """#!/bin/bash
trap '' USR1                                  # the step takes the forwarded signal and saves
case " $* " in *ray_node.sh*) trap 'kill -USR1 "$PPID"; exit 0' USR2 TERM; while :; do sleep 0.1; done ;; esac
source "$FAKE_SLURM_DIR/bin/preempted_step"
""",
    "python": """#!/bin/bash
case "$1" in
  -c) exec python3 "$@" ;;
  -m) exit 0 ;;                               # ray's health-check: the head is up
  *) trap '' USR1; source "$FAKE_SLURM_DIR/bin/preempted_step" ;;   # a driver run in the batch shell itself
esac
""",
    # Slurm's USR1 once the job runs -- once the batch shell has set its trap (SigCgt in /proc), not before:
    # a loaded machine may run this step before the shell's next line. The step saves, exits 75.
    "preempted_step": """for _ in $(seq 400); do
  (( 16#$(awk '/^SigCgt/ {print $2}' "/proc/$PPID/status") & 1 << 9 )) && break; sleep 0.05
done
kill -USR1 "$PPID"; sleep 0.3; exit 75
""",
    "scontrol": """#!/bin/bash
case "$1" in
  show) for i in $(seq "${FAKE_SLURM_NODES:-2}"); do echo "n$i"; done ;;   # a write per name, as a long list
  requeue) kill -USR1 "$PPID"; kill -TERM "$PPID"; sleep 0.5; echo "$2" > "$FAKE_SLURM_DIR/requeued" ;;
  *) echo "fake scontrol: $*" >&2; exit 1 ;;
esac
""",
}
REQUEUEING_TEMPLATES = sorted(p.relative_to(ROOT) for folder in [*FOLDERS, "slurm_templates"]
                              for p in (ROOT / folder).glob("*.sbatch") if "scontrol requeue" in p.read_text())
# Run under fakes below: the templates that read a node list, and slurm_templates'. The others carry the same block
# (test_the_requeue_block_is_the_same_everywhere) and are each run with stand-ins by tests/test_templates.py.
REQUEUE_RUNS = [t for t in REQUEUEING_TEMPLATES if "show hostnames" in (ROOT / t).read_text()
                or t.parts[0] == "slurm_templates"]


@pytest.mark.parametrize("template", REQUEUE_RUNS, ids=str)
def test_requeue_survives_a_repeated_signal_and_a_long_node_list(template, tmp_path):
    """A signal that arrives again after the step has ended must not kill the batch shell before its
    `scontrol requeue` (seen in CI: ray/multinode.sbatch, JobState=FAILED ExitCode=0:10, never requeued); nor
    may a long node list end it before it starts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=bin_dir / "python", FAKE_SLURM_DIR=tmp_path,
                    SLURM_JOB_ID=4242, SLURM_JOB_NAME="requeue-test", SLURM_JOB_NODELIST="n[1-2]",
                    SLURM_NNODES=2, SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1, SLURM_CPUS_PER_TASK=1,
                    SLURM_GPUS_ON_NODE=1, RAY_NODE_IP_CMD="echo 127.0.0.1", FAKE_SLURM_NODES=2000)
    proc = run(["bash", ROOT / template, "train.py"], cwd=tmp_path, env=env, timeout=60, check=False)
    assert proc.returncode == 0 and (tmp_path / "requeued").read_text().strip() == "4242", \
        f"{template}: exit {proc.returncode} (a negative one is the signal that killed it)\n{proc.stdout[-3000:]}"


def requeue_blocks() -> tuple[str, str]:
    """The two blocks every requeueing template carries word for word, as slurm_templates/requeue.sbatch has them:
    forwarding the signal to the step (from `step=$!` to `trap '' USR1 TERM`) and the decision to requeue (from
    the comment before `if [ "$rc" -eq 75 ]` to `exit "$rc"`)."""
    text = (ROOT / "slurm_templates" / "requeue.sbatch").read_text()
    forward = re.search(r"^step=\$! .*?^trap '' USR1 TERM\n", text, re.M | re.S).group(0)
    decide = re.search(r"^# 75 = checkpointed.*?^exit \"\$rc\"\n", text, re.M | re.S).group(0)
    return forward, decide


@pytest.mark.lint
@pytest.mark.parametrize("template", REQUEUEING_TEMPLATES, ids=str)
def test_the_requeue_block_is_the_same_everywhere(template):
    """Five messages for one event were five copies drifting apart: the blocks are identical now, and a fix made in
    one template fails here until it reaches all. pytorch/multinode_torchrun.sbatch decides differently (it also
    requeues a crash after new progress: torchrun's agents cannot restart across nodes) and says so."""
    forward, decide = requeue_blocks()
    text = (ROOT / template).read_text()
    assert forward in text, f"{template}: the signal-forwarding block differs from slurm_templates/requeue.sbatch's"
    assert decide in text or str(template) == "pytorch/multinode_torchrun.sbatch", \
        f"{template}: the requeue decision differs from slurm_templates/requeue.sbatch's"


# ------------------------------------------------------------------------------------------------ C9, C11


@pytest.mark.lint
@pytest.mark.parametrize("folder", FOLDERS)
def test_requirements_are_pinned(folder):
    pins = {}
    for line in (ROOT / folder / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[\w.\[\],-]+==[\w.+-]+", line), f"{folder}/requirements.txt: {line!r} is not pinned"
            name, version = line.split("==")
            pins[name.split("[")[0].lower()] = version
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pins.get("torch") == torch_pin or excepted(folder, "C9:torch"), \
        f"{folder}/requirements.txt must pin torch=={torch_pin} (constraints.txt)"


@pytest.mark.lint
@pytest.mark.parametrize("folder", FOLDERS)
def test_no_imports_from_sibling_folders(folder):
    """Imports name the standard library, an installed package or a module of the folder itself; nothing
    reaches into another folder (no sys.path edits, no module that only a sibling folder has)."""
    own = {p.stem for p in (ROOT / folder).glob("*.py")}
    sibling_only = {p.stem for f in [*FOLDERS, *TOOL_FOLDERS] if f != folder for p in (ROOT / f).glob("*.py")} - own
    for path in (ROOT / folder).glob("*.py"):
        text = path.read_text()
        assert not re.search(r"sys\.path\.(insert|append|extend)|PYTHONPATH", text), f"{path}: sys.path tricks"
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                top = name.split(".")[0]
                assert top not in sibling_only or top in sys.stdlib_module_names, \
                    f"{path.relative_to(ROOT)} imports {name!r}, a module of another folder"


TOY_FINGERPRINT = """
import hashlib, json, torch, recipe as common
torch.manual_seed(0)
weights = common.ConvNet().state_dict()
data = common.synthetic_dataset(64)
h = hashlib.sha256()
for k, v in weights.items():
    h.update(k.encode()); h.update(v.numpy().tobytes())
for t in data.tensors:
    h.update(t.numpy().tobytes())
print(json.dumps(h.hexdigest()))
"""


def toy_carriers() -> list[str]:
    """The folders whose recipe.py carries the shared toy workload (ConvNet, synthetic_dataset)."""
    return [f for f in FOLDERS if not excepted(f, "C11") and re.search(
        r"^class ConvNet\b.*^def synthetic_dataset\b", (ROOT / f / "recipe.py").read_text(), re.M | re.S)]


def test_the_shared_toy_workload_is_identical_wherever_it_is_carried(tmp_path_factory):
    carriers = toy_carriers()
    assert {"pytorch", "lightning"} <= set(carriers)
    toys = {f: forked(f, tmp_path_factory)["toy"] for f in carriers}
    for f, proc in toys.items():
        assert proc.returncode == 0, f"{f}: the toy fingerprint exited {proc.returncode}\n{proc.stderr[-3000:]}"
    prints = {f: json.loads(proc.stdout.strip().splitlines()[-1]) for f, proc in toys.items()}
    assert len(set(prints.values())) == 1, f"the toy model or data differ between folders: {prints}"


# ------------------------------------------------------------------------------------------------ C9 GPU builds

# Where GPU jobs run: Linux on x86_64, and on aarch64 (Grace Hopper / Grace Blackwell nodes, glibc 2.34 and newer).
GPU_PLATFORMS = ("x86_64-manylinux_2_28", "aarch64-manylinux_2_34")
REQUIREMENT_FOLDERS = sorted(p.parent.name for p in ROOT.glob("*/requirements.txt"))


@pytest.mark.parametrize("folder", REQUIREMENT_FOLDERS)
def test_requirements_resolve_to_a_cuda_build_on_a_gpu_cluster(folder, tmp_path):
    """C9: what `pip install -r requirements.txt` gives on a GPU node, resolved against PyPI alone (not this
    machine's mirrors or its CPU torch) for each GPU platform: it resolves, torch is the pinned CUDA build (NCCL
    among its dependencies), and a GPU extra named in the file (`# pip install "jax[cuda13]==…"`) brings the
    framework's CUDA plugin at the framework's own version."""
    uv = ROOT / ".venvs" / ".uv" / "bin" / "uv"
    if not uv.exists():
        unavailable(f"{uv} missing: tools/envs.sh installs it (ENVS_INSTALLER=uv, the default)")
    requirements = ROOT / folder / "requirements.txt"
    files = [requirements]
    extra = re.search(r'^# .*pip install "(\w+\[cuda\d+\]==[\w.]+)"', requirements.read_text(), re.M)
    if extra:
        (tmp_path / "gpu.txt").write_text(extra.group(1) + "\n")
        files.append(tmp_path / "gpu.txt")
    torch_pin = (ROOT / "constraints.txt").read_text().split("torch==")[1].split()[0]
    resolving = {platform: subprocess.Popen(  # both platforms at once: mostly waiting on PyPI
        [uv, "pip", "compile", *files, "--python-version", "3.11", "--python-platform", platform, "--index-url",
         "https://pypi.org/simple", "--no-header", "--no-annotate", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
        for platform in GPU_PLATFORMS}
    for platform, proc in resolving.items():
        proc.stdout, proc.stderr = proc.communicate(timeout=300)
        if proc.returncode != 0 and re.search(r"[Cc]onnect|dns error|Could not fetch|network", proc.stderr):
            unavailable(f"PyPI not reachable: {proc.stderr.strip()[-300:]}")
        assert proc.returncode == 0, f"{folder}/requirements.txt does not resolve on {platform}:\n{proc.stderr}"
        pins = dict(line.split("==", 1) for line in proc.stdout.split() if "==" in line)
        if re.search(r"^torch==", requirements.read_text(), re.M):
            assert pins.get("torch") == torch_pin, f"{folder} on {platform}: torch {pins.get('torch')}"
            nccl = [name for name in pins if name.startswith("nvidia-nccl")]
            assert nccl, f"{folder} on {platform}: torch {torch_pin} resolved without NCCL (not a CUDA build)"
        if extra:
            framework, cuda = re.match(r"(\w+)\[(cuda\d+)\]", extra.group(1)).groups()
            plugin = f"{framework}-{cuda}-plugin"
            assert pins.get(plugin) == pins[f"{framework}lib"] == pins[framework], \
                f"{folder} on {platform}: {plugin} {pins.get(plugin)} for {framework} {pins[framework]}"


# ------------------------------------------------------------------------------------------------ copy alone


@pytest.mark.parametrize("folder", FOLDERS)
def test_copy_alone_installs_and_runs(folder, tmp_path):
    """What the README tells a user: copy the folder, make a venv, install its requirements.txt, run; the run is
    the contract's smoke run with --save-every-steps 3, crashed after its step-6 snapshot, resumed to its end and
    run once more (check_smoke_run: C2, C3, C5, C6). The install uses tools/envs.sh's installer (uv, given pip's
    indexes; pip where uv cannot be had): the same pinned requirements, and seconds instead of minutes per folder,
    which CI's time budget needs."""
    copy = tmp_path / folder
    shutil.copytree(ROOT / folder, copy, ignore=shutil.ignore_patterns("__pycache__", "checkpoints", "*.out"))
    venv = tmp_path / "venv"
    python = os.environ.get("PYTHON", "python3")
    run([python, "-m", "venv", venv], timeout=120)
    # requirements.txt and nothing else: no constraints file, no extra index.
    run([ROOT / "tools" / "envs.sh", "--install-into", venv, copy / "requirements.txt"], timeout=900)
    # ... and its smoke run, three times: crashed (CRASH: SIGKILL right after the step-6 snapshot line), resumed to
    # its end, then resumed finished.
    ckpt = tmp_path / "ckpt"
    args = ["single_gpu.py", *SMOKE, "--save-every-steps", "3", "--checkpoint-dir", ckpt]
    crash = run([venv / "bin" / "python", "-c", CRASH, r"snapshot saved to .+ \(step 6\)", *args], cwd=copy,
                timeout=300, check=False)
    assert crash.returncode == -signal.SIGKILL, f"exit {crash.returncode}, not the crash\n{crash.stdout[-3000:]}"
    resumed, finished = (run([venv / "bin" / "python", *args], cwd=copy, timeout=300).stdout for _ in range(2))
    check_smoke_run(crash.stdout, resumed, finished, ckpt)
    installed = run([venv / "bin" / "python", "-c", "import importlib.metadata as m; print(m.version('torch'))"],
                    cwd=copy, check=False).stdout.strip()
    assert "+cu" not in installed, f"a CUDA build of torch was installed on a CPU machine: {installed}"



# ------------------------------------------------------------------------------------------------ C13 hangs

HANG_TIMEOUT = 5  # --timeout of the hang test: short, so that the run is cheap; the bound is --timeout + 60 s


@pytest.mark.parametrize("folder", [pytest.param(f, marks=pytest.mark.xfail(
    strict=True, reason=f"CONTRACT.md exceptions: {f} C13")) if excepted(f, "C13") else f
    for f in FOLDERS if not RECIPES[f].no_srun])
def test_a_hang_ends_with_evidence_and_one_line_naming_the_silent_rank(folder, tmp_path):
    """C13 (#23): rank 1 of a 2-rank srun-style run is stopped (SIGSTOP: alive, not answering) after its second
    step. Rank 0's next collective runs out its --timeout; it must then exit non-zero within --timeout + 60 s with
    one error line and no traceback, saying that rank 1 stopped answering (not that a process died), and leave its
    stack in <checkpoint-dir>/debug/<job id>/. Before: a line that said "a process or node of the job died"
    (pytorch, lightning), a traceback (monai, modulus, nemo), an abort (jax), no end (deepspeed). A folder without
    an srun-style launch (ray: one driver starts every worker) has its own:
    tests/test_ray.py::test_a_stopped_worker_ends_the_run_with_its_stacks_and_one_line."""
    recipe, ckpt = RECIPES[folder], tmp_path / "ckpt"
    args = [*recipe.small, "--epochs", "100", "--log-every", "1", "--timeout", HANG_TIMEOUT,
            "--checkpoint-dir", ckpt, "--data-dir", tmp_path / "data"]
    procs = recipe.srun(args, 2, free_port())
    out = ""
    try:
        for line in procs[0].stdout:
            out += line
            if re.search(r"\| step 2 \|", line):
                os.killpg(procs[1].pid, signal.SIGSTOP)
                break
        try:
            out += procs[0].communicate(timeout=HANG_TIMEOUT + 60)[0]
        except subprocess.TimeoutExpired:
            pytest.fail(f"{folder}: rank 0 still running {HANG_TIMEOUT} + 60 s after rank 1 stopped\n{out[-3000:]}",
                        pytrace=False)
    finally:
        for p in procs:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            p.wait()
    errors = [ln for ln in out.splitlines() if ERROR_LINE.match(ln)]
    assert procs[0].returncode not in (0, None) and "Traceback" not in out, f"exit {procs[0].returncode}\n{out[-4000:]}"
    assert len(errors) == 1, f"want one error line, got {errors}\n{out[-3000:]}"
    assert "rank 1 stopped answering" in errors[0] and "died" not in errors[0], errors[0]
    assert f"within --timeout {HANG_TIMEOUT} s" in errors[0], errors[0]
    stack = (ckpt / "debug" / "4242" / "rank0.stack.txt").read_text()  # the job id recipes.srun sets
    assert stack.startswith("rank 0 of 2, "), stack[:200]  # the job's size: fr_report.py names the ranks without one
    assert "where it waited:" in stack and "every thread now:" in stack, stack[-2000:]


def test_a_timeout_is_told_apart_from_a_death_and_the_silent_ranks_are_named(monkeypatch):
    """C13's seam on its own: a wait that ran out its deadline (gloo, NCCL's watchdog) is a hang; a peer whose
    connections closed died (its own line stays). Through the store, the ranks that did not time out with this one
    are named; a store that does not answer (it lived in the stopped process) names nobody -- and returns; a store
    whose process is gone (a broken pipe: rank 1 woken by srun after rank 0 exited) names nobody, without a traceback
    (once, in CI, the asking thread's traceback reached the job's log)."""
    toolkit = import_toolkit()
    assert toolkit.timed_out(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"))
    assert toolkit.timed_out(RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)"))
    assert not toolkit.timed_out(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:1234: Connection reset by peer"))
    assert not toolkit.timed_out(RuntimeError("Connection closed by peer [127.0.0.1]:41234"))
    # DDP's other buckets in flight, once gloo closed the connection of the one that timed out (seen: lightning)
    pair_closed = "Application timeout caused pair closure"
    assert toolkit.timed_out(RuntimeError(pair_closed)) and toolkit.GLOO_ERROR.search(pair_closed)

    import threading
    from types import SimpleNamespace

    class Store:  # the rendezvous store as torch's TCPStore answers: set, check, set_timeout
        def __init__(self, posted, answers=True):
            self.posted, self.answers = set(posted), answers

        def set_timeout(self, timeout):
            pass

        def set(self, key, value):
            if not self.answers:
                threading.Event().wait()  # the server's process is stopped: no reply, ever
            self.posted.add(key)

        def check(self, keys):
            return set(keys) <= self.posted

    def said(store, world_size=4):
        fake = SimpleNamespace(distributed_c10d=SimpleNamespace(_get_default_store=lambda: store))
        return toolkit.HANG._who_did_not_arrive(fake, 0, world_size, 0.2)

    assert said(Store({"timed-out/2"})).startswith("ranks 1,3 stopped answering")
    assert said(Store(set()), 2).startswith("rank 1 stopped answering")
    assert said(Store({"timed-out/1", "timed-out/2", "timed-out/3"})).startswith("every rank timed out")
    assert "cannot be named" in said(Store(set(), answers=False))

    class Gone(Store):
        def check(self, keys):
            raise RuntimeError("Broken pipe")  # what torch.distributed.DistNetworkError is

    unhandled = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    assert "cannot be named" in said(Gone({"timed-out/1"})) and not unhandled, unhandled


def test_a_rank_stuck_alive_writes_its_own_stack(tmp_path):
    """C13: the rank that hangs, when it is alive (stuck in Python: a deadlocked DataLoader, a slow filesystem),
    dumps every thread's stack into debug/<job id>/rank<N>.stalled.txt once no step boundary came for --timeout --
    the others time out in their collective meanwhile and exit. A process of a 2-task job, stepped once, then
    stuck in a function for 3 x its --timeout of 1 s: the file names that function. In a fresh process: the
    watcher is a thread that lives as long as its process."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import toolkit\n"
            "toolkit.HANG.remember(sys.argv[2], 1)\n"
            "toolkit.PREEMPTION.agreed(3)  # a step boundary: the watcher starts\n"
            "def a_rank_stuck_in_python():\n"
            "    time.sleep(3)\n"
            "a_rank_stuck_in_python()\n")
    env = clean_env(SLURM_NTASKS=2, SLURM_PROCID=1, SLURM_JOB_ID=4242)
    subprocess.run([sys.executable, "-c", code, str(ROOT / "pytorch"), str(tmp_path)], env=env, timeout=60,
                   check=True)
    stalled = (tmp_path / "debug" / "4242" / "rank1.stalled.txt").read_text()
    assert stalled.startswith("rank 1 of 2, "), stalled[:200]
    assert "no step since step 3" in stalled and "a_rank_stuck_in_python" in stalled, stalled
