"""Shared test machinery: per-folder interpreters, launching recipes as real processes, free ports.

Every recipe runs with its own folder's environment (.venvs/<folder>), exactly as a user who copied that
folder would run it. The tests themselves run in .venvs/tests.
"""

import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every recipe here starts as fresh processes (hundreds per run) that import torch and a framework. The
# environments hold no .pyc files (tools/envs.sh: uv links the wheels' files only), and with
# PYTHONDONTWRITEBYTECODE set (as on CI machines) each process would compile every module it imports again:
# seconds per process. Instead they cache it here (PYTHONPYCACHEPREFIX), not in __pycache__ folders inside the
# recipe folders that tests copy.
PYCACHE = ROOT / ".venvs" / ".pycache"
VENVS = ROOT / ".venvs"
SHIM_DIR = Path(__file__).resolve().parent / "shim"
TEARDOWN_CHECK_DIR = Path(__file__).resolve().parent / "teardown_check"
IN_CI = os.environ.get("CI", "").lower() == "true"


# The epoch line of CONTRACT.md C3, read from the contract itself (the regex is written there once).
EPOCH_LINE = re.compile(re.search(r"Regular expression the tests use:\n`\^(.+?)`",
                                  (ROOT / "CONTRACT.md").read_text()).group(1))


class EpochLine(NamedTuple):
    """One C3 epoch line, its fields parsed."""
    epoch: int
    epochs: int
    step: int
    loss: float
    metric: str
    value: float
    samples_per_s: int
    seconds: float
    line: str


def epoch_lines(out: str) -> list[EpochLine]:
    """The C3 epoch lines of a run's output (a recipe's stdout, or a Slurm job log where srun --label puts "0: "
    before each line), parsed."""
    found = []
    for m in re.finditer(r"^(?:\d+: )?(" + EPOCH_LINE.pattern.rstrip("$") + ")$", out, re.M):
        e, n, step, loss, metric, value, rate, secs = m.groups()[1:]
        found.append(EpochLine(int(e), int(n), int(step), float(loss), metric, float(value), int(rate), float(secs),
                               m.group(1)))
    return found


def assert_same_weights(a: dict, b: dict, **tol):
    """Two state dicts hold the same tensors: bit for bit without tolerances, else within them (atol, rtol of
    torch.testing.assert_close)."""
    import torch  # the tests' environment has torch; only the tests that compare weights need it

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        if tol:
            torch.testing.assert_close(a[k], b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), f"{k} differs (bit-exact comparison)"


def unavailable(reason: str):
    """Skip locally, fail in CI: in CI a missing framework or environment is a defect, never a skip."""
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def env_python(folder: str) -> Path:
    """The interpreter of <folder>'s environment, built by tools/envs.sh."""
    python = VENVS / folder / "bin" / "python"
    if not python.exists():
        unavailable(f"{python} missing: run `tools/envs.sh {folder}` (or `make envs`)")
    return python


def torchrun(folder: str) -> list[str]:
    """torchrun from <folder>'s environment (as a module, so no PATH lookup can pick another torch)."""
    return [str(env_python(folder)), "-m", "torch.distributed.run"]


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on now and that this test session has not handed out before."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def clean_env(**overrides) -> dict:
    """The test process's environment minus any launcher variables, plus overrides.

    Recipes read RANK/WORLD_SIZE/SLURM_* from the environment, so a stray variable (from a developer's
    shell or from an enclosing Slurm job) must not leak into a test's launch.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_"))
        and k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "NODE_RANK", "PYTHONPATH"}
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # bytecode cache: see PYCACHE (set by conftest.py)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def with_torchvision_shim(env: dict) -> dict:
    """Let a recipe import the CUDA-only torchvision wheel next to CPU torch (see tests/shim/README.md)."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(SHIM_DIR), env.get("PYTHONPATH", "")] if p)
    return env


def without_group(nodeid: str) -> str:
    """A test's node id without the @group that pytest-xdist's loadgroup appends."""
    return nodeid.split("@")[0]


def with_teardown_check(env: dict) -> dict:
    """Make every destroy_process_group() report the DDP models still alive (see tests/teardown_check)."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(TEARDOWN_CHECK_DIR), env.get("PYTHONPATH", "")] if p)
    return env


def teardown_checked(out: str, ranks: int) -> bool:
    """Every rank destroyed its process group with no DDP model left alive (see with_teardown_check)."""
    lines = re.findall(r"^teardown-check: (\d+) DistributedDataParallel alive", out, re.M)
    return len(lines) >= ranks and set(lines) == {"0"}


def run(cmd, *, timeout: float = 240, env: dict | None = None, cwd=ROOT, check: bool = True,
        expect_fail: bool = False) -> subprocess.CompletedProcess:
    """Run a command to completion (or kill it at `timeout`) and return its combined output.

    A hang is a test failure with the output so far, never a stuck suite.
    """
    cmd = [str(c) for c in cmd]
    env = clean_env() if env is None else env
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- output ---\n{out[-6000:]}", pytrace=False)
    if expect_fail:
        assert proc.returncode != 0, f"expected a failure, got exit 0: {' '.join(cmd)}\n{proc.stdout[-6000:]}"
    elif check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n--- output ---\n{proc.stdout[-6000:]}",
                    pytrace=False)
    sys.stdout.write(proc.stdout[-3000:])  # shown by pytest on failure / with -rP
    return proc


def torchrun_workers(agent_pid: int) -> dict[int, int]:
    """{RANK: pid} of the workers torchrun (the agent, pid agent_pid) has running now."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != agent_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v[5:] for v in environ if v.startswith(b"RANK=")]
        if rank:
            found[int(rank[0])] = int(stat.parent.name)
    return found


def run_killing_a_worker_twice(cmd, timeout: float = 240, cwd=ROOT) -> tuple[int, str, int]:
    """Run a torchrun command line (--max-restarts >= 2) and kill -9 its rank-1 worker twice: right after the first
    "snapshot saved" line, and as soon as the restarted run says "resumed from". Returns (exit code, output, kills)."""
    agent = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kills, seen = 0, []
    try:
        for line in agent.stdout:
            seen.append(line)
            if ("snapshot saved" in line and kills == 0) or ("resumed from" in line and kills == 1):
                os.kill(torchrun_workers(agent.pid)[1], signal.SIGKILL)
                kills += 1
        code = agent.wait(timeout=timeout)
    finally:
        if agent.poll() is None:  # torchrun starts its workers in sessions of their own: kill them one by one
            for pid in [*torchrun_workers(agent.pid).values(), agent.pid]:
                os.kill(pid, signal.SIGKILL)
    return code, "".join(seen), kills


class _Opaque:
    """Stands in for an object of a package this environment (.venvs/tests) does not have, pickled into a checkpoint
    beside its tensors (a config, a loss scaler): the tests read the tensors and the progress, not it."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


def pickle_without(*packages):
    """A pickle module for torch.load(pickle_module=...) that reads a checkpoint whole -- every tensor -- leaving
    the objects of `packages` opaque: NeMo's checkpoints pickle OmegaConf configs, DeepSpeed's its own objects."""
    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            return _Opaque if module.split(".")[0] in packages else super().find_class(module, name)

    return types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
