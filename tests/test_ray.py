"""ray/ recipes, launched for real on CPU (gloo, 2 Ray Train workers): the local cluster of multigpu.py, drivers
joining a running cluster (multinode.py), equivalence with one process, preemption by SIGTERM to every process
(the driver's and Ray's, as Slurm sends it) -> exit 75 -> resume, a worker killed mid-training and replaced,
a worker stopped mid-training -> its peer's stacks and one line (C13), resumed == uninterrupted, bad input;
ray_node.sh's signals, ports and kept logs with a stand-in for Ray; and after every run no Ray process it started
is left.

Ray start-up costs seconds per run (worker processes importing torch and Ray Train), so the drivers of this file
share one Ray cluster (`cluster`: ray_node.sh --head, started as multinode.sbatch starts it, ended by SIGUSR2 as
the job ends it); only the multigpu.py test starts its own, as users do."""

import contextlib
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from forked import forked_each
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


def free_block(size=256):
    """The first port of `size` consecutive ports nobody listens on (ray_node.sh's RAY_PORT_BASE), in the range
    multinode.sbatch takes them from (20000-32767)."""
    while True:
        base = random.randrange(20000, 32768 - size)
        try:
            for port in range(base, base + size):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def descendants(pid):
    """`pid` and every live process below it (by parent PID)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return [p for p in found if alive(p)]


def command(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def term_everything(*roots):
    """SIGTERM to every process of a Slurm step, as slurmstepd sends it on GraceTime preemption (and on scancel
    --signal=TERM): every process below each root (a setsid'd `ray start` included), Ray's own (GCS, raylet,
    workers) too."""
    for pid in {p for root in roots for p in descendants(root)}:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class Head:
    """ray_node.sh --head, started as multinode.sbatch's srun starts it on the first node (the Slurm variables it
    reads, a block of free ports); stopped by SIGUSR2, the job script's teardown."""

    def __init__(self, tmp):
        self.port = base = free_block()  # the GCS port is the block's first, as in multinode.sbatch
        self.log, self.logs_dir = tmp / "ray_node.out", tmp / "ray-logs"
        env = ray_env(PYTHON=env_python("ray"), RAY_PORT_BASE=base, SLURM_JOB_ID=f"test{self.port}",
                      SLURMD_NODENAME="n1", SLURM_CPUS_PER_TASK=2, RAY_NODE_IP_CMD="echo 127.0.0.1",
                      RAY_LOGS_DIR=self.logs_dir)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ["bash", "./ray_node.sh", "--head", f"--port={self.port}", "--include-dashboard=false",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={base + 7}"],
                cwd=FOLDER, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.temp_dir = Path(f"/tmp/ray-test{self.port}-n1")
        self.address = f"127.0.0.1:{self.port}"

    def ray_processes(self):
        """{pid: command line} of the GCS and the raylet of this head."""
        return {p: command(p) for p in descendants(self.proc.pid)
                if re.search(r"/(gcs_server|raylet) ", command(p))}

    def stop(self):
        members = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGUSR2)
        code = self.proc.wait(timeout=60)
        assert_gone(members, "the test's Ray head", grace=10)
        return code


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster shared by the drivers of this file: ray_node.sh --head, as multinode.sbatch starts
    it (own process group, short temp dir, token, ports from the job's block); yields it. Ended as the job ends
    it (SIGUSR2): nothing of it may be left, its temp dir neither."""
    head = Head(tmp_path_factory.mktemp("head"))
    try:
        yield head
    finally:
        code = head.stop()
        assert code == 0 and not head.temp_dir.exists(), f"exit {code}\n{head.log.read_text()[-3000:]}"
        assert not head.logs_dir.exists(), "Ray's logs kept, but nothing failed"


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
    return Launch("multinode.py", "--address", cluster.address, "--workers", workers, *ARGS, "--checkpoint-dir", ckpt,
                  *args)


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
    """Slurm's SIGTERM to every process of the job's steps (GraceTime preemption, scancel --signal=TERM): to the
    driver and to every Ray process of the node, ray_node.sh's included -- once the driver has joined, before the
    workers start (the stop request waits in the control actor), and again once both workers run. Ray must
    survive it (ray_node.sh starts Ray with SIGTERM blocked and does not stop it): the workers stop at the first
    check (step 10), rank 0 saves a snapshot, the driver exits 75, and the cluster serves the next run (below).
    Returns (checkpoint dir, the snapshot of step 10 on its own, the output)."""
    ckpt = tmp_path_factory.mktemp("preempted") / "ckpt"
    launch = driver(cluster, ckpt)
    launch.until(r"^\[rank0\] cluster: ")
    ray_processes = cluster.ray_processes()
    term_everything(launch.proc.pid, cluster.proc.pid)
    launch.until(r"^\[rank1\] host ")
    term_everything(launch.proc.pid, cluster.proc.pid)
    out = finished(launch, want=75)
    assert_gone(launch.worker_pids().values(), "the driver's workers")
    (snapshot,) = [p for p in (ckpt / "train").glob("checkpoint_*") if p.is_dir()]
    at_step_10 = ckpt.parent / "step10"
    shutil.copytree(snapshot, at_step_10 / "train" / snapshot.name)
    assert len(ray_processes) == 2 and cluster.ray_processes() == ray_processes, \
        f"the GCS and raylet did not survive the SIGTERM: {ray_processes}\n{cluster.log.read_text()[-3000:]}"
    assert cluster.proc.poll() is None and "got TERM" in cluster.log.read_text(), cluster.log.read_text()[-3000:]
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
    snapshot): over hundreds of steps float rounding differences grow with training. Then that snapshot resumed by
    one process x batch 16 continues after the samples the workers trained on."""
    one = Launch("single_gpu.py", *ARGS, "--batch-size", 32, "--max-steps", 10, "--checkpoint-dir", tmp_path / "one")
    finished(one, timeout=120)
    assert_same_snapshots(tmp_path / "one", preempted[1], steps=10, **TOL)
    # The 2 workers' snapshot resumed by one process at their own batch, 16 (a job resubmitted on fewer GPUs,
    # CONTRACT.md C6): after the same 320 samples, at step 20 of twice the steps per epoch, the cosine schedule
    # stretched over them. (Before: 10 batches of 16 skipped, 160 samples trained twice, the old schedule.)
    fewer = tmp_path / "fewer"
    shutil.copytree(preempted[1], fewer)
    out = finished(Launch("single_gpu.py", *ARGS, "--max-steps", 21, "--checkpoint-dir", fewer), timeout=120)
    assert "snapshot written by 2 worker(s) x batch 16, resuming as 1 x 16: epoch 1 after 320 samples (step 20)" \
        in out and "done: 21 steps" in out, out[-4000:]
    snaps = [torch.load(p, weights_only=True) for p in (fewer / "train").glob("checkpoint_*/snapshot.pt")]
    (newest,) = [snap for snap in snaps if snap["step"] == 21]
    assert newest["scheduler"]["T_max"] == STEPS * 2  # 3 epochs of 128 steps


def test_local_cluster_signalled_as_slurm_signals_a_step_saves_and_exits_75(tmp_path):
    """multigpu.py under `srun` (multigpu.sbatch): Slurm's USR1, then TERM, go to every process of the step -- the
    driver and the Ray cluster it started (GCS, raylet, the Train workers). Ray's processes must outlive them (the
    soak, 2026-12-07: they died of them, the driver crashed with ActorUnavailableError tracebacks and exit 1); the
    driver passes the stop on, rank 0 saves, exit 75, one line, nothing of the step left."""
    launch = Launch("multigpu.py", "--nprocs", 2, *ARGS, "--checkpoint-dir", tmp_path / "ckpt")
    launch.until(r"^\[rank0\] epoch 1 \| batch \d+/\d+ \| step 16 \|")
    members = session_members(launch.proc.pid)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        for pid in session_members(launch.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    out = finished(launch, want=75)
    assert re.search(r"^\[rank0\] preempted at step \d+: ", out, re.M) and "Traceback" not in out, out[-4000:]
    assert_gone(members, "multigpu.py's local Ray cluster")
    assert weights(tmp_path / "ckpt")[1] < STEPS


HANG_TIMEOUT = 10  # --timeout of the hang test; the bound is --timeout + 60 s (C13)


def test_a_stopped_worker_ends_the_run_with_its_stacks_and_one_line(tmp_path):
    """C13 (#23) for Ray Train: rank 1 of multigpu.py's 2 workers is stopped (SIGSTOP: alive, not answering) after
    step 2. Rank 0's next collective runs out --timeout: it writes its stacks into <checkpoint-dir>/debug/local/
    (rank0.stack.txt, and rank0.stalled.txt from its watcher) and raises its one line (cluster.WorkerHang); with
    no retry left (--max-failures 0) Ray Train ends the worker group, the stopped worker too, and the driver prints
    that line -- one error line, no traceback, naming rank 1 as stopped answering (not died) -- and exits 1 within
    --timeout + 60 s, leaving no Ray process behind. Ray's own health check does not act first: it marks a worker
    dead after 10 minutes without an answer. Before: Ray's error wall (a WorkerGroupError traceback with gloo's
    timeout), no stack file."""
    ckpt = tmp_path / "ckpt"
    launch = Launch("multigpu.py", "--nprocs", 2, "--epochs", 100, "--dataset-size", 2048, "--batch-size", 16,
                    "--log-every", 1, "--timeout", HANG_TIMEOUT, "--max-failures", 0, "--checkpoint-dir", ckpt)
    stopped = None
    try:
        launch.until(r"^\[rank0\] epoch 1 \| batch \d+/\d+ \| step 2 \|")
        if 1 not in launch.worker_pids():  # (the ranks' lines reach the driver in any order)
            launch.until(r"^\[rank1\] host ")
        stopped = launch.worker_pids()[1]
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        code = launch.wait(HANG_TIMEOUT + 60)
        seconds = time.monotonic() - start
        assert_gone(session_members(launch.proc.pid), "multigpu.py's local Ray cluster, the stopped worker included")
    finally:
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, sig)
        if launch.proc.poll() is None:
            launch.kill()
    out = launch.output
    errors = [ln for ln in out.splitlines() if ERROR_LINE.match(ln)]
    assert code == 1 and len(errors) == 1 and "Traceback" not in out, f"exit {code}\n{out[-4000:]}"
    assert errors[0].startswith("[rank0] error: ") and "rank 1 stopped answering" in errors[0], errors[0]
    assert f"within --timeout {HANG_TIMEOUT} s" in errors[0] and "died" not in errors[0], errors[0]
    assert seconds < HANG_TIMEOUT + 60, seconds
    stack = (ckpt / "debug" / "local" / "rank0.stack.txt").read_text()
    assert stack.startswith("rank 0 of 2, ") and "where it waited:" in stack and "every thread now:" in stack, stack
    # The worker's watcher thread runs too: no step for --timeout (its collective, then the wait for rank 1's word).
    assert (ckpt / "debug" / "local" / "rank0.stalled.txt").read_text().startswith("rank 0 of 2, ")


# A stand-in for Ray under ray_node.sh (PYTHON): `-c` runs Python (ray_node.sh's SIGTERM shield), `-m ray...
# start` is a process that sleeps, as `ray start --block` does, after printing whether SIGTERM is blocked in it
# and its arguments.
STUB_PYTHON = """#!/bin/bash
case "$1" in
  -c) [ "$2" = "import grpc" ] && exit 0; exec python3 "$@" ;;   # (as if Ray Client were installed)
  -m) echo "SigBlk $(awk '/^SigBlk/ {print $2}' /proc/$$/status) $*"; exec sleep 600 ;;
esac
"""


def test_ray_node_keeps_ray_on_sigterm_tells_the_batch_shell_stops_on_usr2_and_keeps_a_failed_jobs_logs(tmp_path):
    """ray_node.sh as multinode.sbatch starts the head, without Ray (a stand-in sleeps in its place), under a
    SIGTERM to every process of its step: Ray's processes start with SIGTERM blocked and are not stopped; the
    head passes the signal on to the batch shell (RAY_NOTIFY_PID: under GraceTime preemption Slurm signals the
    steps, not the batch shell); SIGUSR2 (the job's teardown) then ends the group, keeps the node's Ray logs in
    the run folder since the job failed (the batch shell's FAILED file), and removes the node's temp dir. Also: the
    address is what the node's name resolves to, and the ports cover a worker per CPU of the template."""
    sbatch = (FOLDER / "multinode.sbatch").read_text()
    cpus = int(re.search(r"^#SBATCH --cpus-per-task=(\d+)", sbatch, re.M)[1])
    (tmp_path / "python").write_text(STUB_PYTHON)
    (tmp_path / "python").chmod(0o755)
    told, logs = tmp_path / "told", tmp_path / "ray-logs"
    logs.mkdir()
    (logs / "FAILED").touch()
    temp_dir = Path(f"/tmp/ray-t{os.getpid()}-localhost")
    shell = subprocess.Popen(["bash", "-c", f"trap 'echo TERM > {told}; exit 0' TERM; while :; do sleep 0.1; done"])
    env = clean_env(PYTHON=tmp_path / "python", RAY_PORT_BASE=20000, SLURM_JOB_ID=f"t{os.getpid()}",
                    SLURMD_NODENAME="localhost", SLURM_CPUS_PER_TASK=cpus, RAY_NOTIFY_PID=shell.pid, RAY_LOGS_DIR=logs)
    node = subprocess.Popen(["bash", "./ray_node.sh", "--head", "--port=20000"], cwd=FOLDER, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []  # "ray node ...", the stand-in's line, a loopback warning: in any order
        while not (any(ln.startswith("ray node") for ln in lines) and any(ln.startswith("SigBlk") for ln in lines)):
            lines.append(node.stdout.readline())
            assert lines[-1], f"ray_node.sh ended: {lines}"
        assert any(ln.startswith("ray node localhost (127.0.0.1): ") for ln in lines), lines
        (stub,) = [ln.split() for ln in lines if ln.startswith("SigBlk")]
        assert int(stub[1], 16) & 1 << (signal.SIGTERM - 1), stub
        options = dict(re.findall(r"--([\w-]+)=(\d+)", " ".join(stub)))
        ports = {int(v) for k, v in options.items() if k.endswith("port")}
        assert "ray-client-server-port" in options and len(ports) == 10, options
        assert min(ports) >= 20000 and max(ports) <= 20000 + 255, options
        assert int(options["max-worker-port"]) - int(options["min-worker-port"]) + 1 >= cpus + 16, options
        for _ in range(500):  # polled, not timed: the stand-in prints its line just before it execs sleep
            ray = [p for p in descendants(node.pid) if command(p).startswith("sleep 600")]
            if ray:
                break
            time.sleep(0.02)
        assert len(ray) == 1, lines
        term_everything(node.pid)
        assert shell.wait(timeout=10) == 0 and told.read_text() == "TERM\n"
        assert alive(ray[0]) and node.poll() is None, "SIGTERM stopped Ray before the driver could save"
        (temp_dir / "session_latest" / "logs").mkdir(parents=True)  # (Ray makes them; the stand-in does not)
        (temp_dir / "session_latest" / "logs" / "worker-1.err").write_text("Traceback\n")
        node.send_signal(signal.SIGUSR2)
        rest, _ = node.communicate(timeout=10)
        assert node.returncode == 0 and "got TERM" in rest and "stopped" in rest, rest
        assert_gone(ray, "the node's Ray", grace=5)
        assert (logs / "localhost" / "worker-1.err").read_text() == "Traceback\n" and not temp_dir.exists(), rest
    finally:
        shell.kill()
        for pid in descendants(node.pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_multinode_template_ports_and_address():
    """multinode.sbatch's port block lies outside Ray's defaults (GCS 6379, client server 10001, workers
    10002-19999) and below the ephemeral range for every job id; the node address is by default what the Slurm
    node name resolves to."""
    sbatch = (FOLDER / "multinode.sbatch").read_text()
    formula = re.search(r"^export RAY_PORT_BASE=\$\(\((.*)\)\)$", sbatch, re.M)[1]
    bases = subprocess.run(["bash", "-c", f"for SLURM_JOB_ID in $(seq 1000 1100); do echo $(({formula})); done"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(bases) == 101 and all(20000 <= int(b) and int(b) + 255 < 32768 for b in bases), formula
    default = re.search(r"^export RAY_NODE_IP_CMD=.*$", sbatch, re.M)[0]
    ip = subprocess.run(["bash", "-c", f'{default}\neval "$RAY_NODE_IP_CMD"'], capture_output=True, text=True,
                        env=clean_env(SLURMD_NODENAME="localhost"), check=True).stdout
    assert ip == "127.0.0.1\n", (default, ip)


# ------------------------------------------------------------------------------------------------ bad input
# ... and the other launches of this folder that start no Ray cluster of their own: forked from one process


# Run forked as a script (test_fp32_on_a_gpu_uses_tf32_and_amp_picks_by_the_gpu): C10/#22, GPU facts patched in
TF32_PROBE = """
import torch, cluster
torch.cuda.get_device_capability = lambda device=None: CAPABILITY  # read when called: the loop's value
autocast, scaler = cluster.mixed_precision(torch.device("cuda", 0), False)
print("fp32", torch.get_float32_matmul_precision(), scaler)
for CAPABILITY in ((9, 0), (7, 0)):
    autocast, scaler = cluster.mixed_precision(torch.device("cuda", 0), True)
    print("amp", CAPABILITY[0], type(scaler).__name__)
"""

BAD_INPUT = {
    "world-larger-than-data": ("multigpu.py", ["--nprocs", 4, "--dataset-size", 3], "world size is 4"),
    "no-full-step": ("multigpu.py", ["--nprocs", 2, "--dataset-size", 16, "--batch-size", 16], "too few for one step"),
    "missing-data-dir": ("single_gpu.py", ["--data", "npz", "--data-dir", "/nonexistent"], "does not exist"),
    "empty-data-dir": ("single_gpu.py", ["--data", "npz", "--data-dir", "EMPTY"], "has no train.npz"),
    "wrong-shape": ("single_gpu.py", ["--data", "npz", "--data-dir", "BAD"], "want images (N, C, H, W)"),
    "no-address": ("multinode.py", ["--epochs", 1], "no Ray cluster to join"),
}


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
    """{case: Forked} of the launches of this section, forked from one process (tests/forked.py), each in its own
    session (as Launch starts it: what it leaves behind is found by the session id) and its own tmp dir:
    the bad command lines (BAD_INPUT, each with its own --checkpoint-dir), the driver pointed at a wrong address,
    the npz training run and the GPU-facts probe."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("forked")
    (tmp / "EMPTY").mkdir()
    (tmp / "BAD").mkdir()
    np.savez(tmp / "BAD" / "train.npz", images=np.zeros((8, 28, 28), np.float32), labels=np.zeros(8, np.int64))
    cases = {}
    for case, (script, args, _) in BAD_INPUT.items():
        args = [str(tmp / a) if a in ("EMPTY", "BAD") else a for a in args]
        cases[case] = dict(script=script, args=[*args, "--checkpoint-dir", tmp / case / "ckpt"], timeout=60)
    cases["wrong-address"] = dict(script="multinode.py",
                                  args=["--address", f"127.0.0.1:{free_port()}", "--timeout", 5, *ARGS], timeout=60)
    (tmp / "data").mkdir()
    g = np.random.default_rng(0)
    np.savez(tmp / "data" / "train.npz", images=g.normal(size=(64, 3, 32, 32)).astype(np.float32),
             labels=g.integers(0, 10, 64))
    cases["npz"] = dict(script="single_gpu.py",
                        args=["--data", "npz", "--data-dir", tmp / "data", "--epochs", 1, "--batch-size", 16],
                        timeout=120)
    (tmp / "tf32_probe.py").write_text(TF32_PROBE)
    cases["tf32"] = dict(script=str(tmp / "tf32_probe.py"), timeout=120)  # not the folder's: its imports not preloaded
    return {"tmp": tmp, **forked_each("ray", cases, env=ray_env(), setsid=True, timeout=600)}


def the_error_line(ran):
    """A forked launch (Forked) that had to fail did: exit 2, one error line, no traceback; that line."""
    errors = [ln for ln in ran.output.splitlines() if ERROR_LINE.match(ln)]
    assert ran.returncode == 2 and len(errors) == 1 and "Traceback" not in ran.output, \
        f"exit {ran.returncode}\n{ran.output[-4000:]}"
    return errors[0]


def test_driver_pointed_at_a_wrong_address_fails_within_the_deadline(forked):
    """Nothing listens there: Ray would retry for minutes; the driver gives up after --timeout with one line."""
    ran = forked["wrong-address"]
    line = the_error_line(ran)
    assert "could not join the Ray cluster" in line and ran.seconds < 35, (line, ran.seconds)


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(forked, case):
    ran = forked[case]
    line = the_error_line(ran)
    assert BAD_INPUT[case][-1] in line, line
    assert not (forked["tmp"] / case / "ckpt").exists(), "a rejected run must not write anything"
    assert not ran.left, "a rejected run left processes behind"


def test_npz_data_trains(forked):
    """The real on-disk format the folder reads: DATA_DIR/train.npz."""
    ran = forked["npz"]
    assert ran.returncode == 0, f"exit {ran.returncode}\n{ran.output[-4000:]}"
    assert "[rank0] done: 4 steps" in ran.output


def test_fp32_on_a_gpu_uses_tf32_and_amp_picks_by_the_gpu(forked):
    """C10/#22 with the GPU facts patched in, in ray's own environment: a worker training fp32 on a CUDA device
    turns TF32 on (ray/ never did); --amp gives bf16 without a scaler on Ampere+ and fp16 with a GradScaler below."""
    ran = forked["tf32"]
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split("\n")[:3] == ["fp32 high None", "amp 9 NoneType", "amp 7 GradScaler"], ran.output
