"""Fault injection for the recipes: launch a recipe the way a cluster would, hurt it at a random moment, relaunch it
the way Slurm would, and classify what came out (issue #9, item 5; `tests/soak.py` and `tests/test_soak.py` use it).

A folder's launch modes are data (MODES): how to start the step, which process is the launcher and which are the
workers, where the snapshots are and how to read the final weights. A new folder adds rows, not code.
MODES covers (for deepspeed/, nemo/, ray/ and pytorch's two "nodes"): pytorch/'s multinode.py under two torchrun
agents (multinode_torchrun.sbatch; kill-launcher = node 0's agent and its worker); deepspeed/'s four launches
(ZeRO-2; every step-* tag file read with weights_only=False); nemo/'s single_gpu.py and multigpu_torchrun.py (each
process imports NeMo for ~23 CPU-s: two rows; exp_manager's .ckpt read as test_nemo.py reads it); ray/'s
single_gpu.py (no Ray) and multigpu.py, the driver of a Ray cluster of its own (launch "ray"; multinode.py joins a
cluster another step started: test_ray.py's).

Every launch
- runs in sessions of its own (start_new_session=True) and carries a marker variable (SOAK_LAUNCH) that every
  process it starts inherits -- torchrun's workers (new sessions of their own), mp.spawn's children, DataLoader
  workers -- so "every process of the step" is found by scanning /proc, as Slurm's cgroup would find it;
- has a deadline: a launch still running past it is a hang, killed with everything it started;
- is followed by checks: every snapshot/checkpoint file in the directory loads (a half-written one is a FAIL), and
  no process of the step is left once its launcher (or every task) has exited.

The cluster's part (`run_scenario`): exit 75 -> requeue; any other non-zero exit -> relaunch, as Slurm's requeue
would, at most MAX_RELAUNCHES times; under srun one task failing ends the step (--kill-on-bad-exit: SIGTERM to the
rest, SIGKILL after KILL_WAIT), and a launcher that dies takes the rest of its step with it.
"""

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

from helpers import PYCACHE, clean_env, free_port, pickle_without

import torch

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venvs"
MARKER = "SOAK_LAUNCH"
MAX_RELAUNCHES = 3  # multinode.sbatch's MAX_RESTARTS default
KILL_WAIT = 10  # s between SIGTERM and SIGKILL when Slurm ends a step (Slurm's KillWait, default 30)
GRACE = 10  # s the rest of a step may take to exit after its launcher (or its last task) has exited
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ", re.M)
INJECTIONS = ("kill-worker", "kill-launcher", "term", "usr1")
# MISSED: the run ended before the step drawn for the injection (nothing was tested; neither pass nor fail).
OUTCOMES = ("RECOVERED", "CLEAR-ERROR", "FAIL", "MISSED")
# The moment of an injection is drawn in training progress: a step, after the first snapshot and before the end
# (the uninterrupted run's steps), hit once rank 0 has logged it. Every folder logs `| step N |` at --log-every.
STEP = re.compile(rb"\| step (\d+) \|")


def workload(epochs, dataset_size, *more, batch_size=16):
    """A run's training arguments: a snapshot after every epoch, a line per step (the injection waits for one)."""
    return ("--epochs", str(epochs), "--dataset-size", str(dataset_size), "--batch-size", str(batch_size), *more,
            "--save-every", "1", "--log-every", "1", "--timeout", "60")


# The workload: 4 epochs of 2048 samples. Process start-up (imports) dominates a launch; the 3 epochs after the first
# snapshot are where the injections land.
WORKLOAD = workload(4, 2048)


# ------------------------------------------------------------------------------------------ the modes table


def pytorch_weights(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "snapshot.pt", map_location="cpu", weights_only=True)["model"]


def lightning_weights(ckpt_dir: Path) -> dict:
    return torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def deepspeed_loads(path: Path) -> None:
    """DeepSpeed's files pickle more than tensors (the optimizer states hold DeepSpeed's own objects, which this
    environment cannot import): read whole, every tensor included, with those objects left opaque."""
    torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_without("deepspeed"))


def nemo_loads(path: Path) -> None:
    """exp_manager's .ckpt holds NeMo's config objects: read as test_nemo.py reads it (its pickle module)."""
    from test_nemo import _checkpoint_pickle

    torch.load(path, map_location="cpu", weights_only=False, pickle_module=_checkpoint_pickle)


def ray_weights(ckpt_dir: Path) -> dict:
    """The newest snapshot (by its stored step) of Ray Train's checkpoint_* directories (Ray keeps the newest 2)."""
    snaps = [torch.load(p, map_location="cpu", weights_only=True)
             for p in (ckpt_dir / "train").glob("checkpoint_*/snapshot.pt")]
    return max(snaps, key=lambda s: s["step"])["model"]


def torch_loads(path: Path) -> None:
    """A snapshot is whole when torch.load reads it back (a truncated zip or half a pickle raises)."""
    torch.load(path, map_location="cpu", weights_only=True)


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way to launch one folder's recipe.

    launch: "python" (one process that is the whole step), "spawn" (one process that spawns the workers: it is the
    launcher), "torchrun" (torchrun's agent is the launcher, its children the workers), "srun" (one process per
    rank with srun's variables: no launcher of ours, each task is a worker), "nodes" (one torchrun agent per
    "node", --nnodes `ranks`, one worker each, a c10d rendezvous on this host: `srun torchrun` on two nodes; each
    agent is a task of the step).
    """
    folder: str
    name: str
    script: str
    launch: str
    args: tuple = ()
    ranks: int = 1
    max_restarts: int = 0  # torchrun --max-restarts
    # kill-worker is RECOVERED only through torchrun's restart within the launch: no relaunch, no traceback (where the
    # recipe meets each attempt under a key prefix of its own in the agent's store: torch 2.13's restart race)
    restarts_in_launch: bool = False
    snapshots: tuple = ("*.pt",)  # globs of the files that must load after every launch
    loads: object = torch_loads  # reads one of them back whole, or raises
    weights: object = pytorch_weights
    workload: tuple = WORKLOAD  # the training arguments (each launch adds mode.args, extra and --checkpoint-dir)
    tolerance: dict = dataclasses.field(default_factory=lambda: {"rtol": 0.0, "atol": 0.0})  # 0: bit-exact
    srun_env: tuple = ()  # extra SLURM_* variables a task needs (Lightning's SLURMEnvironment reads more)
    env: tuple = ()  # (name, value) of every launch; "{port}" in a value is the launch's free port
    group: str = ""  # modes that train identically share one reference run (default: the mode's own)

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def reference(self) -> str:
        return self.group or self.key

    @property
    def injections(self) -> tuple:
        """kill-launcher needs a launcher that is not itself the (only) worker."""
        return tuple(i for i in INJECTIONS if i != "kill-launcher" or self.launch in LAUNCHERS)


# Per-folder workloads: an uninterrupted run of ~20-40 s here, >= 3 snapshots, a line per step.
DEEPSPEED_WORKLOAD = workload(4, 512)  # 2 ranks: 16 steps per epoch; 1 process: 32
NEMO_WORKLOAD = workload(3, 256)  # 1 process: 16 steps per epoch; 2 ranks: 8
# ray: 2 workers: 96 steps per epoch; 1 process: 192. With 32 (1024 samples) an epoch took 0.5 s and a signal drawn
# in the last one found the run finished before the driver's stop request (0.2 s polls, a check every 10 steps)
RAY_WORKLOAD = workload(3, 3072)
LAUNCHERS = ("spawn", "torchrun", "nodes", "ray")  # launches with a launcher that is not itself the (only) worker
LIGHTNING_SRUN = (("SLURM_JOB_NAME", "soak"), ("SLURM_NODEID", "0"), ("SLURM_STEP_ID", "0"),
                  ("SLURM_NODELIST", "localhost"), ("SLURM_NTASKS_PER_NODE", "2"))

def recipe_weights(folder: str):
    """tests/recipes.py's reader of the folder's final weights (imported when first used: it imports pytest)."""
    def weights(ckpt_dir: Path) -> dict:
        import recipes

        return recipes.RECIPES[folder].weights(ckpt_dir)
    return weights


# monai: 8 cases of 16^3 voxels, batch 1: 8 steps per epoch on one process, 4 per rank on two; validated after epochs
# 2 and 4 (best_model.pt, checked as a snapshot). Written once to the system's temporary directory, shared by every
# launch. Resume is bit-exact (test_monai.py's test_preempted_srun_ranks_save_exit_75_and_resume_exactly), and the
# 2-rank launches end bit-exactly equal (recipes.py's same_as_one, no tolerance): one reference for them.
MONAI_WORKLOAD = workload(4, 8, "--roi-size", "16", batch_size=1)
MONAI_MODES = [
    Mode("monai", "single", "single_gpu.py", "python", workload=MONAI_WORKLOAD, weights=recipe_weights("monai")),
    Mode("monai", "spawn", "multigpu.py", "spawn", ("--nprocs", "2"), ranks=2, workload=MONAI_WORKLOAD,
         weights=recipe_weights("monai"), group="monai/ddp-2"),
    Mode("monai", "torchrun", "multigpu_torchrun.py", "torchrun", ranks=2, max_restarts=2, workload=MONAI_WORKLOAD,
         weights=recipe_weights("monai"), group="monai/ddp-2", restarts_in_launch=True),
    Mode("monai", "srun", "multinode.py", "srun", ranks=2, workload=MONAI_WORKLOAD, weights=recipe_weights("monai"),
         group="monai/ddp-2"),
]
# modulus: 256 Darcy samples, batch 16: 16 steps per epoch on one process, 8 per rank on two.
MODULUS_WORKLOAD = workload(4, 256)
MODULUS_MODES = [
    Mode("modulus", "single", "single_gpu.py", "python", workload=MODULUS_WORKLOAD, weights=recipe_weights("modulus")),
    Mode("modulus", "spawn", "multigpu.py", "spawn", ("--nprocs", "2"), ranks=2, workload=MODULUS_WORKLOAD,
         weights=recipe_weights("modulus"), group="modulus/ddp-2"),
    Mode("modulus", "torchrun", "multigpu_torchrun.py", "torchrun", ranks=2, max_restarts=2,
         workload=MODULUS_WORKLOAD, weights=recipe_weights("modulus"), group="modulus/ddp-2", restarts_in_launch=True),
    # PhysicsNeMo's DistributedManager reads the world size from SLURM_NPROCS, the address from SLURM_LAUNCH_NODE_IPADDR
    Mode("modulus", "srun", "multinode.py", "srun", ranks=2, workload=MODULUS_WORKLOAD,
         weights=recipe_weights("modulus"), group="modulus/ddp-2",
         srun_env=(("SLURM_NPROCS", "2"), ("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"), *LIGHTNING_SRUN)),
]
# jax: no multigpu_torchrun.py (JAX has no torchrun: multigpu.py spawns and coordinates its processes itself).
# 1024 samples, batch 16: 64 steps per epoch on one process, 32 on two. A snapshot is an Orbax step folder, which gets
# its name (digits only) when every process has written its part; a kill mid-save leaves <step>.orbax-checkpoint-tmp-*
# (not matched). Every named step's commit marker (_CHECKPOINT_METADATA) and progress must read back as JSON; the
# arrays of the newest step are read whole at the end (recipes.py's reader, in jax's venv). Resume is bit-exact
# (test_jax.py's test_preempted_run_saves_exits_75_and_resumes_exactly). JAX's compilation cache as in the tests.
JAX_WORKLOAD = workload(4, 1024)
JAX_STEPS = tuple(f"{'[0-9]' * n}/{name}" for n in (1, 2, 3, 4) for name in ("_CHECKPOINT_METADATA",
                                                                             "progress/metadata"))
JAX_ENV = (("JAX_COMPILATION_CACHE_DIR", "/tmp/jax-recipes-test-compilation-cache"),
           ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"))


def json_loads(path: Path) -> None:
    json.loads(path.read_text())


JAX_MODES = [
    Mode("jax", "single", "single_gpu.py", "python", workload=JAX_WORKLOAD, snapshots=JAX_STEPS, loads=json_loads,
         weights=recipe_weights("jax"), env=JAX_ENV),
    Mode("jax", "spawn", "multigpu.py", "spawn", ("--nprocs", "2"), ranks=2, workload=JAX_WORKLOAD,
         snapshots=JAX_STEPS, loads=json_loads, weights=recipe_weights("jax"), env=JAX_ENV, group="jax/2"),
    # JAX's own Slurm detection: the step's node list and tasks per node; the coordinator's port
    Mode("jax", "srun", "multinode.py", "srun", ranks=2, workload=JAX_WORKLOAD, snapshots=JAX_STEPS,
         loads=json_loads, weights=recipe_weights("jax"), group="jax/2",
         env=(*JAX_ENV, ("JAX_COORDINATOR_PORT", "{port}")),
         srun_env=(("SLURM_STEP_NODELIST", "127.0.0.1"), ("SLURM_STEP_TASKS_PER_NODE", "2"))),
]

# The tolerances are the unit tests': resume is bit-exact in every pytorch/ mode (test_pytorch.py's resume and
# preemption tests) and for Lightning's single device (test_lightning.py's resume test). pytorch/'s 2-rank modes run
# the same train() (multigpu_torchrun.py's), so they end bit-exactly equal and share a reference run.
MODES = {m.key: m for m in [
    Mode("pytorch", "single", "single_gpu.py", "python"),
    Mode("pytorch", "spawn", "multigpu.py", "spawn", ("--nprocs", "2"), ranks=2, group="pytorch/ddp-2"),
    Mode("pytorch", "torchrun", "multigpu_torchrun.py", "torchrun", ranks=2, max_restarts=2, group="pytorch/ddp-2",
         restarts_in_launch=True),
    Mode("pytorch", "srun", "multinode.py", "srun", ranks=2, group="pytorch/ddp-2"),
    Mode("lightning", "single", "single_gpu.py", "python", snapshots=("*.ckpt",), weights=lightning_weights),
    Mode("lightning", "torchrun", "multigpu_torchrun.py", "torchrun", ranks=2, snapshots=("*.ckpt",),
         weights=lightning_weights),
    # monai, modulus, jax
    *MONAI_MODES, *MODULUS_MODES, *JAX_MODES,
    # deepspeed, nemo, ray, and pytorch on two "nodes"
    # multinode_torchrun.sbatch: `srun torchrun --nnodes 2 multinode.py`, one worker per node; multinode.py under
    # torchrun runs multigpu_torchrun.py's train(), as srun's tasks do (bit-exact with them: checked 2026-12-07)
    Mode("pytorch", "nodes", "multinode.py", "nodes", ranks=2, group="pytorch/ddp-2"),
    # deepspeed/: ZeRO-2 (configs/zero2.json, the default) in every mode; every rank saves its part of a step-* tag,
    # whose files pickle more than tensors. Resume is bit-exact (test_behaviour.py's preemption row: no tolerance).
    # The 2-rank modes run the same train() (recipe.py) on the same 2 x 16 global batches.
    *(Mode("deepspeed", name, script, launch, args, ranks=ranks, max_restarts=restarts, snapshots=("step-*/*.pt",),
           loads=deepspeed_loads, weights=recipe_weights("deepspeed"), workload=DEEPSPEED_WORKLOAD,
           group="" if ranks == 1 else "deepspeed/zero2-2")
      for name, script, launch, args, ranks, restarts in [
          ("single", "single_gpu.py", "python", (), 1, 0),
          ("spawn", "multigpu.py", "spawn", ("--nprocs", "2"), 2, 0),
          ("torchrun", "multigpu_torchrun.py", "torchrun", (), 2, 2),
          ("srun", "multinode.py", "srun", (), 2, 0)]),
    # nemo/: exp_manager's checkpoints/*.ckpt; resume is bit-exact (test_nemo.py's resume tests: no tolerance).
    # Each process costs ~23 CPU-s of imports: single and torchrun only (a worker killed under torchrun's restart,
    # the agent killed); multigpu.py and multinode.py run the same train() and are in test_nemo.py/test_behaviour.py.
    Mode("nemo", "single", "single_gpu.py", "python", snapshots=("checkpoints/*.ckpt",), loads=nemo_loads,
         weights=recipe_weights("nemo"), workload=NEMO_WORKLOAD),
    Mode("nemo", "torchrun", "multigpu_torchrun.py", "torchrun", ranks=2, max_restarts=2,
         snapshots=("checkpoints/*.ckpt",), loads=nemo_loads, weights=recipe_weights("nemo"), workload=NEMO_WORKLOAD),
    # ray/: single_gpu.py has no Ray (one process); multigpu.py is the driver of a one-node Ray cluster it starts
    # itself ("ray": the driver is the launcher, the GCS, the raylet and the Ray Train workers -- children of the
    # raylet -- the rest of the step). multinode.py is left out: it joins a cluster that ray_node.sh started in
    # another step of the job, which test_ray.py signals and kills workers of. Resume is bit-exact (test_ray.py).
    Mode("ray", "single", "single_gpu.py", "python", snapshots=("train/checkpoint_*/snapshot.pt",),
         weights=ray_weights, workload=RAY_WORKLOAD),
    Mode("ray", "local", "multigpu.py", "ray", ("--nprocs", "2"), ranks=2,
         snapshots=("train/checkpoint_*/snapshot.pt",), weights=ray_weights, workload=RAY_WORKLOAD),
]}


# ------------------------------------------------------------------------------------------ processes


def base_env(**overrides) -> dict:
    """helpers.clean_env() (no launcher variables: a stray RANK or SLURM_* must not leak in), without the marker of
    an enclosing soak launch, with bytecode cached where the tests cache it (soak.py runs outside pytest too)."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(MARKER) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPYCACHEPREFIX=str(PYCACHE), **{k: str(v) for k, v in overrides.items()})
    return env


def commands(mode: Mode, ckpt_dir: Path, extra: tuple, marker: str) -> list[tuple[list[str], dict]]:
    """(argv, env) of every process the step starts itself."""
    python = str(VENVS / mode.folder / "bin" / "python")
    script = str(ROOT / mode.folder / mode.script)
    args = [*mode.workload, *mode.args, *extra, "--checkpoint-dir", str(ckpt_dir)]
    port = free_port()
    env = base_env(**{MARKER: marker}, **{k: str(v).format(port=port) for k, v in mode.env})
    if mode.launch == "ray":
        return [([python, script, *args], {**env, "RAY_USAGE_STATS_ENABLED": "0"})]
    if mode.launch == "python":
        return [([python, script, *args], env)]
    if mode.launch == "spawn":
        return [([python, script, *args], {**env, "MASTER_PORT": str(port)})]
    # every torchrun template's agent passes USR1 on to its workers and lets them save (without, USR1 kills it)
    signals = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "80"]
    if mode.launch == "torchrun":
        return [([python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(mode.ranks),
                  "--max-restarts", str(mode.max_restarts), *signals, script, *args], env)]
    if mode.launch == "srun":
        return [([python, script, *args],
                 {**env, **dict(mode.srun_env), "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                  "SLURM_NTASKS": str(mode.ranks), "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
                for r in range(mode.ranks)]
    if mode.launch == "nodes":
        return [([python, "-m", "torch.distributed.run", "--nnodes", str(mode.ranks), "--nproc_per_node", "1",
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", marker,
                  "--max-restarts", str(mode.max_restarts), *signals, script, *args], env)
                for _ in range(mode.ranks)]
    raise ValueError(f"unknown launch {mode.launch!r}")


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of a live process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[3])


def step_processes(marker: str) -> dict[int, tuple[int, str]]:
    """{pid: (ppid, command line)} of every live (non-zombie) process that carries the launch's marker."""
    needle = f"{MARKER}={marker}".encode()
    found = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (d / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        st = _stat(int(d.name))
        if st and st[0] != "Z":
            found[int(d.name)] = (st[1], cmdline)
    return found


def session_processes(sids: set[int]) -> dict[int, str]:
    """Live processes in any of these sessions (the sessions the launch was started in)."""
    found = {}
    for d in Path("/proc").glob("[0-9]*"):
        st = _stat(int(d.name))
        if st and st[0] != "Z" and st[2] in sids:
            try:
                found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return found


def signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def workers(mode: Mode, procs: list[subprocess.Popen], marker: str) -> list[int]:
    """The rank processes (not the launcher, not DataLoader workers or helpers such as mp's resource tracker)."""
    if mode.launch in ("python", "srun"):
        return [p.pid for p in procs if p.poll() is None]
    if mode.launch == "ray":  # Ray Train's workers are children of the raylet, not of the driver
        return sorted(pid for pid, (_, cmd) in step_processes(marker).items() if "RayTrainWorker" in cmd)
    launchers = {p.pid for p in procs}
    return sorted(pid for pid, (ppid, cmd) in step_processes(marker).items()
                  if ppid in launchers and "resource_tracker" not in cmd and "forkserver" not in cmd)


# ------------------------------------------------------------------------------------------ one launch


@dataclasses.dataclass
class Injection:
    kind: str  # one of INJECTIONS
    step: int  # fired once rank 0 has logged this step (or a later one)
    fired_at: float | None = None  # monotonic time
    at_step: int | None = None  # the step rank 0 had logged when it fired
    target: str = ""


class Progress:
    """The newest `| step N |` in a launch's logs, read as they grow (a line is counted once it is whole)."""

    def __init__(self, logs):
        self.logs, self.offsets, self.partial = logs, [0] * len(logs), [b""] * len(logs)
        self.step = None

    def poll(self) -> int | None:
        for i, path in enumerate(self.logs):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets[i])
                    data = f.read()
            except OSError:
                continue
            self.offsets[i] += len(data)
            lines = (self.partial[i] + data).split(b"\n")
            self.partial[i] = lines.pop()
            for match in STEP.finditer(b"\n".join(lines)):
                self.step = max(self.step or 0, int(match.group(1)))
        return self.step


@dataclasses.dataclass
class Launch:
    codes: list[int]  # per process the step started (negative: killed by that signal)
    code: int  # the step's exit status as the job script sees it
    seconds: float
    output: str
    hang: bool = False
    first_snapshot: float | None = None  # seconds after start
    last_snapshot: float | None = None  # seconds after start at which the newest snapshot file was written
    first_snapshot_step: int | None = None  # the step rank 0 had logged when the first snapshot appeared
    last_step: int | None = None  # the newest step rank 0 logged
    corrupt: list[str] = dataclasses.field(default_factory=list)
    temporaries: list[str] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    killed_at_step_end: list[str] = dataclasses.field(default_factory=list)  # after a launcher died (Slurm's part)

    @property
    def tracebacks(self) -> int:
        return self.output.count("Traceback (most recent call last)")

    def summary(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "output"}
        d.update(tracebacks=self.tracebacks, error_lines=self.error_lines()[:5],
                 resumes=len(re.findall(r"^\[rank0\] resumed from ", self.output, re.M)))
        return d

    def error_lines(self) -> list[str]:
        return [ln for ln in self.output.splitlines() if ERROR_LINE.match(ln)]


def snapshot_files(mode: Mode, ckpt_dir: Path) -> list[Path]:
    return sorted({p for g in mode.snapshots for p in ckpt_dir.glob(g) if p.is_file()})


def check_snapshots(mode: Mode, ckpt_dir: Path) -> tuple[list[str], list[str]]:
    """(corrupt files, temporaries): every snapshot must load completely; a *.tmp is a save the kill interrupted,
    which the atomic rename keeps out of the resume (reported, not a failure)."""
    corrupt = []
    for path in snapshot_files(mode, ckpt_dir):
        try:
            mode.loads(path)
        except Exception as e:  # truncated zip, half a pickle, ...
            corrupt.append(f"{path.name}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}")
    temporaries = sorted(p.name for p in ckpt_dir.glob("*.tmp")) if ckpt_dir.is_dir() else []
    return corrupt, temporaries


def exit_status(code: int) -> int:
    """A shell's view of a Popen returncode: killed by signal N -> 128 + N."""
    return 128 - code if code < 0 else code


def launch(mode: Mode, ckpt_dir: Path, log_dir: Path, *, extra: tuple = (), injection: Injection | None = None,
           deadline: float = 300, rng: random.Random | None = None) -> Launch:
    """Run one step of `mode` to its end (or its deadline), injecting `injection` once rank 0 logged its step
    (after the first snapshot exists)."""
    marker = uuid.uuid4().hex
    ckpt_dir = ckpt_dir.resolve()  # the recipe runs in its folder
    log_dir.mkdir(parents=True, exist_ok=True)
    rng = rng or random.Random(0)
    logs, procs = [], []
    start, wall_start = time.monotonic(), time.time()
    for i, (argv, env) in enumerate(commands(mode, ckpt_dir, extra, marker)):
        logs.append(log_dir / f"proc{i}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(argv, cwd=ROOT / mode.folder, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    sessions = {p.pid for p in procs}
    had_snapshot = bool(snapshot_files(mode, ckpt_dir))  # a relaunch: snapshots exist from the start
    first_snapshot, hang, ending = (0.0 if had_snapshot else None), False, None
    progress, first_snapshot_step = Progress(logs), None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        step = progress.poll()
        if first_snapshot is None and snapshot_files(mode, ckpt_dir):
            first_snapshot, first_snapshot_step = now - start, step
        if injection and injection.fired_at is None and first_snapshot is not None and (step or 0) >= injection.step:
            injection.at_step = step
            inject(mode, procs, marker, injection, rng)
        if mode.launch in ("srun", "nodes") and ending is None and any(p.poll() not in (None, 0) for p in procs):
            ending = now  # srun --kill-on-bad-exit=1: a task failed, Slurm ends the step
            signal_all(step_processes(marker), signal.SIGTERM)
        if ending is not None and now - ending > KILL_WAIT:
            signal_all(step_processes(marker), signal.SIGKILL)
        if now - start > deadline:
            hang = True
            signal_all([*step_processes(marker), *session_processes(sessions)], signal.SIGKILL)
        time.sleep(0.05)
    seconds = time.monotonic() - start
    codes = [p.returncode for p in procs]
    failed = [exit_status(c) for c in codes if c != 0]
    code = exit_status(codes[0]) if mode.launch not in ("srun", "nodes") else (failed[0] if failed else 0)
    if code in (0, 75):  # a clean end: the recipe must not leave anything running
        leftovers, killed = wait_for_the_step_to_end(marker, sessions), []
    else:  # a launcher or task died: Slurm kills what is left of the step at once (its cgroup)
        leftovers, killed = [], wait_for_the_step_to_end(marker, sessions, grace=0)
    output = "".join(f"--- {log.name} ---\n{log.read_text(errors='replace')}" for log in logs)
    corrupt, temporaries = check_snapshots(mode, ckpt_dir)
    mtimes = [p.stat().st_mtime for p in snapshot_files(mode, ckpt_dir)]
    last_snapshot = max(mtimes) - wall_start if mtimes else None
    return Launch(codes, code, seconds, output, hang, first_snapshot, last_snapshot, first_snapshot_step,
                  progress.poll(), corrupt, temporaries, leftovers, killed)


def inject(mode: Mode, procs, marker: str, injection: Injection, rng: random.Random) -> None:
    injection.fired_at = time.monotonic()
    step = step_processes(marker)
    if injection.kind == "kill-worker":
        ranks = workers(mode, procs, marker)
        if ranks:
            victim = rng.choice(ranks)
            injection.target = f"pid {victim}: {step.get(victim, (0, '?'))[1][:80]}"
            signal_all([victim], signal.SIGKILL)
    elif injection.kind == "kill-launcher" and mode.launch == "nodes":
        injection.target = f"node 0's launcher pid {procs[0].pid} and its workers"
        # Slurm: the node's task is gone, so that node's slurmstepd kills what is left of it there (its cgroup);
        # srun then ends the other nodes' part of the step (launch(): --kill-on-bad-exit)
        signal_all([procs[0].pid, *(pid for pid, (ppid, _) in step.items() if ppid == procs[0].pid)], signal.SIGKILL)
    elif injection.kind == "kill-launcher":
        injection.target = f"launcher pid {procs[0].pid}"
        signal_all([procs[0].pid], signal.SIGKILL)
        # Slurm: the step's task is gone, so slurmstepd kills what is left of the step (its cgroup).
        signal_all(step_processes(marker), signal.SIGKILL)
    else:
        sig = signal.SIGTERM if injection.kind == "term" else signal.SIGUSR1
        injection.target = f"{len(step)} processes"
        signal_all(step, sig)  # Slurm signals every process of the step, DataLoader workers included


def wait_for_the_step_to_end(marker: str, sessions: set[int], grace: float | None = None) -> list[str]:
    """Give what is left of the step `grace` (default GRACE) seconds to exit; kill and return what is still there."""
    end = time.monotonic() + (GRACE if grace is None else grace)
    while True:
        left = {**session_processes(sessions), **{p: c for p, (_, c) in step_processes(marker).items()}}
        if not left or time.monotonic() >= end:
            break
        time.sleep(0.2)
    signal_all(left, signal.SIGKILL)  # what Slurm does at the end of a step
    return [f"pid {pid}: {cmd[:120]}" for pid, cmd in sorted(left.items())]


# ------------------------------------------------------------------------------------------ runs and outcomes


@dataclasses.dataclass
class Reference:
    weights: dict
    first_snapshot_step: int  # the step rank 0 had logged when the first snapshot appeared
    last_step: int  # the run's last step
    seconds: float  # how long the whole launch took

    def draw(self, rng: random.Random) -> int:
        """The step an injection waits for: after the first snapshot, and not in the last tenth of the run (a
        signal there may meet the final save, which is tested, but leaves little to resume)."""
        return rng.randint(self.first_snapshot_step + 1, max(self.first_snapshot_step + 1, int(0.9 * self.last_step)))


def reference(mode: Mode, work_dir: Path, extra: tuple = ()) -> Reference:
    """The uninterrupted run of `mode`: its final weights and when its first snapshot appeared."""
    ckpt = work_dir / "ckpt"
    result = launch(mode, ckpt, work_dir / "logs", extra=extra)
    if result.code != 0 or result.first_snapshot is None or not result.last_step:
        raise RuntimeError(f"reference run of {mode.key} failed (exit {result.code}, steps logged: "
                           f"{result.last_step}):\n{result.output[-4000:]}")
    return Reference(mode.weights(ckpt), result.first_snapshot_step or 0, result.last_step, result.seconds)


def weights_differ(weights: dict, ref: dict, tolerance: dict) -> str:
    """'' when equal within tolerance, else what differs."""
    if weights.keys() != ref.keys():
        return f"other parameters: {sorted(weights.keys() ^ ref.keys())[:4]}"
    for name in weights:
        try:
            torch.testing.assert_close(weights[name], ref[name], **tolerance)
        except AssertionError as e:
            worst = [ln.strip() for ln in str(e).splitlines() if "absolute difference" in ln]
            return f"{name}: {worst[0] if worst else str(e).strip().splitlines()[0]}"[:200]
    return ""


def classify(launches: list[Launch], final_weights, ref_weights: dict, tolerance: dict) -> tuple[str, str]:
    """(outcome, reason) of a run from its launches and the weights it ended with (None: unreadable)."""
    problems = []
    for i, result in enumerate(launches):
        if result.hang:
            problems.append(f"launch {i + 1} hung (killed at its deadline)")
        if result.corrupt:
            problems.append(f"launch {i + 1} left unreadable snapshots: {result.corrupt}")
        if result.leftovers:
            problems.append(f"launch {i + 1} left processes behind: {result.leftovers}")
    if problems:
        return "FAIL", "; ".join(problems)
    last = launches[-1]
    if last.code == 0:
        if final_weights is None:
            return "FAIL", "exit 0 but no readable final snapshot"
        differ = weights_differ(final_weights, ref_weights, tolerance)
        return ("FAIL", f"wrong weights: {differ}") if differ else ("RECOVERED", "")
    errors = last.error_lines()
    if len(errors) == 1 and last.tracebacks == 0:
        return "CLEAR-ERROR", errors[0][:200]
    return "FAIL", (f"exit {last.code} after {len(launches)} launch(es) with {len(errors)} error line(s) and "
                    f"{last.tracebacks} traceback(s)")


def restarted_in_launch(mode: Mode, launches: list[Launch]) -> tuple[str, str]:
    """A killed worker under torchrun --max-restarts: RECOVERED when the restart within the launch did it, with no
    traceback on the way; a run that needed the cluster's relaunch (a restart that failed too) is a FAIL -- on a
    real cluster that burns a requeue."""
    first = launches[0]
    if len(launches) == 1 and not first.tracebacks:
        return "RECOVERED", ""
    return "FAIL", (f"torchrun --max-restarts {mode.max_restarts} did not recover the killed worker within the "
                    f"launch: {len(launches)} launch(es), {first.tracebacks} traceback(s) in the first "
                    f"(error lines: {first.error_lines()[:2]})")


def should_relaunch(result: Launch) -> bool:
    """What the cluster does after a launch: 75 is the template's requeue, any other failure Slurm's requeue (a
    node failure, a killed step); a hang is not relaunched (the run already failed)."""
    return result.code != 0 and not result.hang


def run_scenario(mode: Mode, kind: str, ref: Reference, work_dir: Path, rng: random.Random, *,
                 extra: tuple = (), deadline: float | None = None) -> dict:
    """One injection into a fresh run of `mode`, then relaunches as the cluster would; the record of the run."""
    injection = Injection(kind, step=ref.draw(rng))
    deadline = deadline or max(240.0, 4 * ref.seconds)
    ckpt = work_dir / "ckpt"
    launches = []
    while True:
        launches.append(launch(mode, ckpt, work_dir / f"launch{len(launches) + 1}", extra=extra,
                               injection=injection if not launches else None, deadline=deadline, rng=rng))
        if not should_relaunch(launches[-1]) or len(launches) > MAX_RELAUNCHES:
            break
    end = time.monotonic()
    try:
        final = mode.weights(ckpt)
    except Exception:
        final = None
    outcome, reason = classify(launches, final, ref.weights, mode.tolerance)
    if outcome == "RECOVERED" and kind == "kill-worker" and mode.restarts_in_launch:
        outcome, reason = restarted_in_launch(mode, launches)
    if injection.fired_at is None:  # the run ended before the moment drawn: nothing was tested
        outcome, reason = "MISSED", f"not injected: the run ended before step {injection.step}"
    return {
        "folder": mode.folder, "mode": mode.name, "injection": kind, "extra": list(extra),
        "at_step": injection.at_step if injection.at_step is not None else injection.step,
        "target": injection.target,
        "launches": len(launches), "outcome": outcome, "reason": reason,
        "time_to_recover_s": round(end - injection.fired_at, 1) if injection.fired_at and outcome != "FAIL" else None,
        "launch_records": [result.summary() for result in launches],
        **({"last_output": launches[-1].output[-3000:]} if outcome != "RECOVERED" else {}),
    }
