"""ray/ recipes, launched for real on CPU (gloo, 2 Ray Train workers): the local cluster of multigpu.py, drivers
joining a running cluster (multinode.py), equivalence with one process, preemption -> exit 75 -> resume, a worker
killed mid-training and replaced, resumed == uninterrupted, bad input; and after every run no Ray process it
started is left.

Ray start-up costs seconds per run (worker processes importing torch and Ray Train), so the drivers of this file
share one Ray cluster (`cluster`, a head started with `ray start --block` in a process group of its own and
ended by that group); only the multigpu.py test starts its own, as users do.
"""

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, assert_same_weights, clean_env, env_python, free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

FOLDER = ROOT / "ray"
# 2048 samples: 64 steps per epoch for 2 workers x batch 16 (or 1 worker x batch 32), 192 in all: long enough
# (a few seconds) for a worker to be killed or the driver signalled mid-run.
ARGS = ["--epochs", "3", "--dataset-size", "2048", "--batch-size", "16", "--log-every", "16"]
STEPS = 192
# 1 process vs 2 workers after 10 steps: the same samples in every global batch, averaged in another order.
TOL = dict(rtol=1e-4, atol=1e-5)
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")
TOKEN = secrets.token_hex(32)


def ray_env(**overrides):
    return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0", **overrides)


class Launch:
    """A recipe started as a real process in its own session (so that every process it starts can be found by
    the session id, which is its PID), with its output read line by line."""

    def __init__(self, script, *args, env=None):
        self.cmd = [str(env_python("ray")), script, *map(str, args)]
        self.proc = subprocess.Popen(self.cmd, cwd=FOLDER, env=env or ray_env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []

    def until(self, pattern, timeout=180):
        """Read output until a line matches `pattern`; returns the match."""
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if m := re.search(pattern, line):
                return m
            if time.monotonic() > deadline:
                break
        self.kill()
        pytest.fail(f"no line matching {pattern!r}\n{self.output[-6000:]}", pytrace=False)

    def wait(self, timeout=240):
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout}s: {' '.join(self.cmd)}\n{self.output[-6000:]}", pytrace=False)
        self.lines += rest.splitlines()
        return self.proc.returncode

    def kill(self):
        kill_session(self.proc.pid)
        self.proc.wait()

    @property
    def output(self):
        return "\n".join(self.lines)

    def worker_pids(self):
        return {int(r): int(p) for r, p in re.findall(r"^\[rank(\d+)\] host \S+ \| ip \S+ \| pid (\d+)", self.output,
                                                      re.M)}


def session_members(sid):
    """PIDs of the live processes whose session id is `sid` (/proc/PID/stat field 6)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def kill_session(sid):
    for pid in session_members(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_gone(pids, what, grace=30):
    """Every PID in `pids` has exited (Ray tears down asynchronously: allow it `grace` seconds)."""
    deadline = time.monotonic() + grace
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"{what}: processes still alive: {left}"


def finished(launch, want=0, timeout=240):
    code = launch.wait(timeout)
    assert code == want, f"exit {code}, want {want}: {' '.join(launch.cmd)}\n{launch.output[-6000:]}"
    return launch.output


def weights(checkpoint_dir):
    """(model state, step) of the newest snapshot (by stored step) under checkpoint_dir/train/."""
    snaps = [torch.load(p, map_location="cpu", weights_only=True)
             for p in (Path(checkpoint_dir) / "train").glob("checkpoint_*/snapshot.pt")]
    assert snaps, f"no snapshot under {checkpoint_dir}"
    newest = max(snaps, key=lambda s: s["step"])
    return newest["model"], newest["step"]


def assert_same_snapshots(a, b, steps=STEPS, **tol):
    """The newest snapshots of two runs: both after `steps`, with the same weights (bit for bit without tol)."""
    (wa, sa), (wb, sb) = weights(a), weights(b)
    assert sa == sb == steps, (sa, sb)
    assert_same_weights(wa, wb, **tol)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster shared by the drivers of this file; yields its address. Started like one node of
    multinode.sbatch (own process group, short temp dir, token, no dashboard) and ended by its process group."""
    port = free_port()
    temp_dir = f"/tmp/ray-test-{port}"
    head = subprocess.Popen(
        [str(env_python("ray")), "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}",
         f"--object-store-memory={256 * 1024**2}", "--disable-usage-stats"],
        env=ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        members = session_members(head.pid)
        kill_session(head.pid)
        head.wait()
        assert_gone(members, "the test's Ray head", grace=10)
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference: multigpu.py, its own local Ray cluster, 2 workers (the local 2-worker run)."""
    ckpt = tmp_path_factory.mktemp("straight") / "ckpt"
    launch = Launch("multigpu.py", "--nprocs", 2, *ARGS, "--checkpoint-dir", ckpt)
    out = finished(launch)
    # Every process multigpu.py started (GCS, raylet, workers, agents) is in its session: none may be left.
    assert_gone(session_members(launch.proc.pid), "multigpu.py's local Ray cluster")
    return ckpt, out, launch


def driver(cluster, ckpt, *args, workers=2):
    return Launch("multinode.py", "--address", cluster, "--workers", workers, *ARGS, "--checkpoint-dir", ckpt, *args)


# ------------------------------------------------------------------------------------------------ tests


def test_local_two_workers(straight):
    ckpt, out, launch = straight
    pids = launch.worker_pids()
    assert set(pids) == {0, 1} and len(set(pids.values())) == 2, out[-4000:]
    assert "world size 2" in out
    epochs = re.findall(r"^\[rank0\] epoch (\d)/3 \| step (\d+) \| loss \S+ \| acc \S+ \| \d+ samples/s \| [\d.]+ s$",
                        out, re.M)
    assert epochs == [("1", "64"), ("2", "128"), ("3", "192")], out[-4000:]
    assert re.search(rf"^\[rank0\] done: {STEPS} steps in [\d.]+ s$", out, re.M), out[-4000:]
    # Only the recipe's lines reach the driver's output, each with its rank (Ray's own stay in its log files).
    assert all(ln.startswith("[rank") for ln in out.splitlines() if ln.strip()), out[-4000:]
    assert weights(ckpt)[1] == STEPS
    assert len([p for p in (ckpt / "train").glob("checkpoint_*") if p.is_dir()]) == 2, "Ray keeps the newest 2"
    assert_gone(pids.values(), "multigpu.py's workers", grace=1)


@pytest.fixture(scope="module")
def preempted(cluster, tmp_path_factory):
    """A driver signalled (SIGUSR1) once it has joined the cluster, before the workers start: the stop request
    waits in the control actor, and the workers stop at the first check (step 10), rank 0 saves a snapshot and
    the driver exits 75. Returns (checkpoint dir, the snapshot of step 10 on its own, the output)."""
    ckpt = tmp_path_factory.mktemp("preempted") / "ckpt"
    launch = driver(cluster, ckpt)
    launch.until(r"^\[rank0\] cluster: ")
    launch.proc.send_signal(signal.SIGUSR1)
    out = finished(launch, want=75)
    assert_gone(launch.worker_pids().values(), "the driver's workers")
    (snapshot,) = [p for p in (ckpt / "train").glob("checkpoint_*") if p.is_dir()]
    at_step_10 = ckpt.parent / "step10"
    shutil.copytree(snapshot, at_step_10 / "train" / snapshot.name)
    return ckpt, at_step_10, out


def test_preempted_run_resumes_survives_a_killed_worker_and_equals_uninterrupted(cluster, straight, preempted):
    """Run again after the exit 75: it resumes mid-epoch from step 10. Then rank 1 is killed after the next
    snapshot (step 64): Ray (FailureConfig) starts a new worker group, which resumes from the newest snapshot. The
    run completes with the uninterrupted run's weights, bit for bit, through both interruptions."""
    ckpt, _, out = preempted
    assert re.search(r"^\[rank0\] preempted at step 10: snapshot saved", out, re.M), out[-4000:]
    again = driver(cluster, ckpt)
    again.until(r"^\[rank0\] snapshot saved to .* \(step 64\)$")
    first_group = again.worker_pids()
    os.kill(first_group[1], signal.SIGKILL)
    out = finished(again)
    assert "warning" not in out, out[-4000:]
    assert re.search(r"^\[rank0\] resumed from \S+: epoch 1, step 10$", out, re.M), out[-4000:]
    after_kill = out.split("(step 64)", 1)[1]
    resumed = re.search(r"^\[rank0\] resumed from \S+: epoch \d, step (\d+)$", after_kill, re.M)
    assert resumed and int(resumed[1]) in (64, 128), out[-4000:]  # the newest snapshot when the worker died
    assert f"done: {STEPS} steps" in after_kill.split(resumed[0], 1)[1], out[-4000:]
    assert_same_snapshots(ckpt, straight[0])
    assert_gone([*first_group.values(), *again.worker_pids().values()], "the driver's workers (both groups)")


def test_two_workers_equal_one_process(preempted, tmp_path):
    """2 Ray workers x batch 16 == one process (single_gpu.py, the loop a single Ray worker runs) x batch 32:
    the same samples in every global batch, averaged in another order. Compared at step 10 (the preempted run's
    snapshot): over hundreds of steps float rounding differences grow with training."""
    one = Launch("single_gpu.py", *ARGS, "--batch-size", 32, "--max-steps", 10, "--checkpoint-dir", tmp_path / "one")
    finished(one, timeout=120)
    assert_same_snapshots(tmp_path / "one", preempted[1], steps=10, **TOL)


# ------------------------------------------------------------------------------------------------ bad input


def assert_one_error_line(launch, timeout):
    start = time.monotonic()
    code = launch.wait(timeout)
    out = launch.output
    errors = [ln for ln in out.splitlines() if ERROR_LINE.match(ln)]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, f"exit {code}\n{out[-4000:]}"
    return errors[0], time.monotonic() - start


def test_driver_pointed_at_a_wrong_address_fails_within_the_deadline():
    """Nothing listens there: Ray would retry for minutes; the driver gives up after --timeout with one line."""
    launch = Launch("multinode.py", "--address", f"127.0.0.1:{free_port()}", "--timeout", 5, *ARGS)
    line, seconds = assert_one_error_line(launch, timeout=60)
    assert "could not join the Ray cluster" in line and seconds < 35, (line, seconds)


@pytest.mark.parametrize("script, args, needle", [
    ("multigpu.py", ["--nprocs", 4, "--dataset-size", 3], "world size is 4"),
    ("multigpu.py", ["--nprocs", 2, "--dataset-size", 16, "--batch-size", 16], "too few for one step"),
    ("single_gpu.py", ["--data", "npz", "--data-dir", "/nonexistent"], "does not exist"),
    ("single_gpu.py", ["--data", "npz", "--data-dir", "EMPTY"], "has no train.npz"),
    ("single_gpu.py", ["--data", "npz", "--data-dir", "BAD"], "want images (N, C, H, W)"),
    ("multinode.py", ["--epochs", 1], "no Ray cluster to join"),
], ids=["world-larger-than-data", "no-full-step", "missing-data-dir", "empty-data-dir", "wrong-shape", "no-address"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, script, args, needle):
    import numpy as np

    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "BAD").mkdir()
    np.savez(tmp_path / "BAD" / "train.npz", images=np.zeros((8, 28, 28), np.float32), labels=np.zeros(8, np.int64))
    args = [str(tmp_path / a) if a in ("EMPTY", "BAD") else a for a in args]
    launch = Launch(script, *args, "--checkpoint-dir", tmp_path / "ckpt")
    line, _ = assert_one_error_line(launch, timeout=60)
    assert needle in line, line
    assert not (tmp_path / "ckpt").exists(), "a rejected run must not write anything"
    assert not session_members(launch.proc.pid), "a rejected run left processes behind"


def test_npz_data_trains(tmp_path):
    """The real on-disk format the folder reads: DATA_DIR/train.npz."""
    import numpy as np

    (tmp_path / "data").mkdir()
    g = np.random.default_rng(0)
    np.savez(tmp_path / "data" / "train.npz", images=g.normal(size=(64, 3, 32, 32)).astype(np.float32),
             labels=g.integers(0, 10, 64))
    launch = Launch("single_gpu.py", "--data", "npz", "--data-dir", tmp_path / "data", "--epochs", 1,
                    "--batch-size", 16)
    assert "[rank0] done: 4 steps" in finished(launch, timeout=120)


def test_fp32_on_a_gpu_uses_tf32_and_amp_picks_by_the_gpu():
    """C10/#22 with the GPU facts patched in, in ray's own environment: a worker training fp32 on a CUDA device
    turns TF32 on (ray/ never did); --amp gives bf16 without a scaler on Ampere+ and fp16 with a GradScaler below."""
    probe = """
import torch, cluster
torch.cuda.get_device_capability = lambda device=None: CAPABILITY  # read when called: the loop's value
autocast, scaler = cluster.mixed_precision(torch.device("cuda", 0), False)
print("fp32", torch.get_float32_matmul_precision(), scaler)
for CAPABILITY in ((9, 0), (7, 0)):
    autocast, scaler = cluster.mixed_precision(torch.device("cuda", 0), True)
    print("amp", CAPABILITY[0], type(scaler).__name__)
"""
    out = subprocess.run([str(env_python("ray")), "-c", probe], cwd=ROOT / "ray",
                         env=clean_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == ["fp32 high None", "amp 9 NoneType", "amp 7 GradScaler"], out.stdout
