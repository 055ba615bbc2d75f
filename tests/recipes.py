"""Every framework folder's launch, as data: what the behavioural tests over all folders (test_behaviour.py) and
the per-folder tests start. A new folder adds a row to RECIPES and gets those tests with no other edit.

    RECIPES[folder].srun(args, n, port)     n processes started as `srun python multinode.py` starts them
    RECIPES[folder].weights(ckpt_dir)       the trained weights a run left there, {name: tensor}
    RECIPES[folder].step_of(ckpt_dir)       the step its newest checkpoint was saved at
    RECIPES[folder].preemption              a run long enough to be signalled mid-training, and what it must say
    RECIPES[folder].run(tmp_path_factory, name)  one of its `runs`, started once per test session whichever file asks
    RECIPES[folder].same_as_one             which of those runs must end with the weights of one process
    wait_all(procs, timeout)                 their exit codes and outputs, or a test failure naming the hang

and, at its end, the parts of the GPU-facts probes (and of their tests) that several folders share.
"""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import NamedTuple

import pytest
from helpers import ROOT, clean_env, env_python, free_port, run, torchrun, with_teardown_check


# ------------------------------------------------------------------------------------------ checkpoint readers
# Each runs in the tests' environment (torch, numpy): checkpoint dir -> {name: tensor}, or the step it was saved at.


def _torch_load(path, **kw):
    import torch  # only the tests that read checkpoints need torch

    return torch.load(path, map_location="cpu", **{"weights_only": True, **kw})


def _snapshot_pt(ckpt_dir):  # pytorch, monai, modulus: snapshot.pt
    return _torch_load(Path(ckpt_dir) / "snapshot.pt")


def _last_ckpt(ckpt_dir):  # lightning: last.ckpt
    return _torch_load(Path(ckpt_dir) / "last.ckpt")


def _nemo_last(ckpt_dir):  # nemo: exp_manager's checkpoints/*-last.ckpt (read as test_nemo.py reads it)
    from test_nemo import last_checkpoint

    return last_checkpoint(Path(ckpt_dir))


def _deepspeed_tag(ckpt_dir):  # deepspeed: the newest complete step-* tag
    done = sorted(Path(ckpt_dir).glob("step-*/complete.json"))
    assert done, f"no complete checkpoint in {ckpt_dir}: {sorted(p.name for p in Path(ckpt_dir).iterdir())}"
    return done[-1].parent


def jax_checkpoints(*directories, env=None):
    """[(leaves, progress)] of the newest step of each directory, every array read back whole by
    jax/cluster.read_checkpoint in jax's venv, in one process: Orbax's files need Orbax, the test runner has no JAX."""
    import numpy as np

    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import cluster, numpy as np\n"
            "for d, out in zip(sys.argv[2::2], sys.argv[3::2]):\n"
            "    leaves, progress = cluster.read_checkpoint(d)\n"
            "    np.savez(out, progress=json.dumps(progress), **{f'leaf{i}': a for i, a in enumerate(leaves)})")
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{i}.npz" for i in range(len(directories))]
        pairs = [str(x) for pair in zip(directories, outs) for x in pair]
        subprocess.run([str(env_python("jax")), "-c", code, str(ROOT / "jax"), *pairs], check=True,
                       env=env or clean_env(), capture_output=True, timeout=300)
        for out in outs:
            with np.load(out) as z:
                found.append(([z[f"leaf{i}"] for i in range(sum(k.startswith("leaf") for k in z.files))],
                              json.loads(str(z["progress"]))))
    return found


def _jax_progress(ckpt_dir):  # the newest step's progress: a JSON file Orbax wrote, read without Orbax
    step = max(int(p.name) for p in Path(ckpt_dir).iterdir() if p.name.isdigit())
    return json.loads((Path(ckpt_dir) / str(step) / "progress" / "metadata").read_text())


def _jax_weights_of(*ckpt_dirs):
    """[{leaf<i>: tensor}] of each directory's newest step, all read in one process."""
    import torch

    return [{f"leaf{i}": torch.from_numpy(a) for i, a in enumerate(leaves)}
            for leaves, _ in jax_checkpoints(*ckpt_dirs)]


ZERO_TO_FP32 = ("import sys, torch; from cluster import import_deepspeed; from recipe import ConvNet; "
                "import_deepspeed(); "
                "from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint as get; "
                "sd = get(sys.argv[1], tag=sys.argv[2]); m = ConvNet(); "
                "print(m.load_state_dict(sd, strict=True)); torch.save(m.state_dict(), sys.argv[3])")


def _zero3_weights(ckpt_dir):
    """The whole model of a ZeRO-3 checkpoint, whose ranks saved only their shards: DeepSpeed's zero_to_fp32 (also
    copied into every checkpoint directory as a script) gathers them into one plain fp32 state dict, which must load
    into the plain model with strict=True."""
    plain = Path(ckpt_dir).parent / "plain.pt"
    loaded = run([env_python("deepspeed"), "-c", ZERO_TO_FP32, ckpt_dir, _deepspeed_tag(ckpt_dir).name, plain],
                 cwd=ROOT / "deepspeed").stdout
    assert "<All keys matched successfully>" in loaded, loaded
    return _torch_load(plain)


# ------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Preemption:
    """A preempted srun-style run (test_behaviour.py): `args` train long enough for rank 0's progress lines to pass
    `when` (a regex) well before the end; then every task's process group gets each of `signals` in turn."""
    args: tuple  # with --checkpoint-dir and --data-dir added by the test
    steps: int  # the steps of the whole run
    steps_per_epoch: int  # the stop must fall mid-epoch: the resume must skip the batches already trained
    when: str = r"\| step 20 \|"  # rank 0's line after which the signal is sent
    first_stop: int = 20  # the earliest step the ranks may stop at (the one `when` logs, or 1)
    signals: tuple = (("usr1", signal.SIGUSR1, ()),)  # (id, signal, extra arguments of the signalled run)
    tol: dict = field(default_factory=dict)  # weights vs the uninterrupted run: bit-exact unless given
    resumed: str = r"resumed from {ckpt}/snapshot\.pt: epoch 1, step {step}$"  # rank 0's line, regex
    expect: tuple = ()  # more lines (substrings) rank 0 must print in the signalled run


@dataclass(frozen=True)
class SlurmPreemption:
    """multinode.sbatch preempted for real under the local Slurm (test_slurm_preemption.py): run on 1 node x 2 tasks
    with `args`, SIGTERM to every process of the step (Slurm's preemption with GraceTime) once rank 0 has logged step
    `at` (of `epoch` when given) -> the ranks agree on a step, save, exit 75 -> the template requeues -> the
    requeued run resumes and completes all `steps`, with the weights of `args` run straight through on 2 nodes x 1
    task (bit for bit unless `tol`)."""
    args: tuple  # "{dir}": the job's own folder
    steps: int
    at: int | str  # or a regex rank 0's log must match (the stop may then be at any step)
    epoch: int | None = None
    resumed: str = r"\S+"  # what rank 0's "resumed from PATH: epoch E, step S" names (a regex; {step}: the stop)
    files: tuple = ()  # more files both runs' checkpoint directories hold at the end
    says: tuple = ()  # lines (substrings) the straight run's log holds: the template's two-node layout
    tol: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Launch:
    """One run of a folder's script as a test starts it (Recipe.run). `how`: "python" (the folder's interpreter),
    "torchrun" (torchrun's own arguments first), "deepspeed" (DeepSpeed's launcher), "nodes" (n torchrun launchers,
    --nnodes n, c10d on this host: what `srun torchrun` does on n nodes), "srun" (Recipe.srun: n tasks). In `args`
    and `env`, {ckpt} is the run's checkpoint dir, {dir} the folder its other files go to, {data} the data dir every
    run of the folder shares (a folder that writes its data writes it once), {port} a free port, {dir_from_folder}
    the run's folder relative to the recipe folder."""
    how: str
    args: tuple  # the script (in the folder, which is the working directory) and its arguments
    n: int = 2  # processes of "nodes" and "srun"
    env: dict = field(default_factory=dict)
    teardown_check: bool = False  # every destroy_process_group reports the DDP models left (helpers.teardown_checked)
    files: dict = field(default_factory=dict)  # {path in the run's folder: text} written before it starts


@dataclass(frozen=True)
class SameAs:
    """A launch of N ranks that must end where one process with the global batch does (SameAsOne)."""
    run: str  # its name in Recipe.runs
    says: tuple = ()  # substrings of its output
    each_says: str = ""  # a substring of every process's own output, {rank} its index (srun: SLURM_PROCID)
    metrics: dict = field(default_factory=dict)  # EpochLine field -> abs tolerance vs the reference's epoch lines
    weights: Callable | None = None  # its checkpoint dir -> {name: tensor}, where Recipe.weights cannot read it


@dataclass(frozen=True)
class SameAsOne:
    """N ranks with batch B each == one process with batch N x B: the same samples in every global batch, summed in
    another order. Every launch ends with the reference's weights within `tol` (bit for bit without) and the same
    epoch lines (`epoch_ends`, the folder's `metric`), printed by rank 0 alone."""
    reference: str  # its name in Recipe.runs: one process with the global batch
    launches: tuple  # of SameAs
    epoch_ends: tuple  # the step each epoch ends at, in both
    metric: str  # the epoch line's fourth field (CONTRACT.md C3)
    tol: dict = field(default_factory=dict)
    reference_says: tuple = ()  # substrings of the reference's output


class Ran(NamedTuple):
    """A finished run (Recipe.run): its folder, checkpoint dir, and every process's exit code and output."""
    dir: Path
    ckpt: Path
    codes: list
    outs: list

    @property
    def out(self):
        return "\n".join(self.outs)


def shared_dir(tmp_path_factory, name):
    """A directory of this test session that every pytest-xdist worker sees (tests/conftest.py gives each test file
    to one worker; the workers' own temporary folders sit side by side)."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class WorldSizeChange:
    """A job resubmitted on fewer nodes (test_behaviour.py): 2 srun-style ranks stop mid-epoch at --max-steps `cut`,
    then single_gpu.py (1 process) starts on the same --checkpoint-dir -- or, with `grow`, the other way round
    (more nodes). Either it refuses before training, in one line naming `refused`, exit 2; or it resumes with
    --batch-size `resume_batch` after the same samples (rank 0 says `resumed`) and ends with the weights of an
    uninterrupted run at that shape. Both where a folder resumes only some shapes: the refusal first, then the
    shape its line asks for."""
    args: tuple  # both runs, --batch-size included
    cut: int  # the 2-rank run's --max-steps: mid-epoch
    refused: str = ""  # (a substring of) the error line, where the folder refuses these args on 1 process
    resume_batch: int = 0  # single_gpu.py's --batch-size, where the folder resumes: the 2 ranks' global batch
    resumed: str = ""  # rank 0's line then (a substring)
    tol: dict = field(default_factory=dict)  # vs the uninterrupted run: bit-exact unless given
    steps: int = 0  # instead of the uninterrupted run (one launch less): the step the resumed run ends at
    grow: bool = False  # 1 process -> 2 ranks
    # instead of training 2 ranks to `cut` (two launches less): a copy of this run's checkpoint (Recipe.runs: 2 ranks,
    # finished at step `cut`, `args` its arguments), where a refusal cannot depend on where the run stopped: the
    # folder checks the layout as it loads any checkpoint, before it asks whether anything is left to train
    copy_of: str = ""


@dataclass(frozen=True)
class Recipe:
    folder: str
    small: tuple = ()  # a few seconds of training
    env: dict = field(default_factory=dict)  # what this folder's tests set besides Slurm's variables ("{n}", "{port}")
    teardown_check: bool = False  # the folder's processes report their DDP models at destroy_process_group
    no_srun: str = ""  # why this folder has no per-rank `srun python multinode.py` launch (then srun() is unusable)
    busy_port: str = ""  # why the busy-port test does not apply, if it does not
    # what rank 0's one error line says then (any of these)
    busy_port_says: tuple = ("another process already listens on that port: choose another MASTER_PORT",)
    weights: Callable | None = None  # checkpoint dir -> {name: tensor}
    step_of: Callable | None = None  # checkpoint dir -> the step of its newest checkpoint
    preemption: Preemption | None = None
    no_preemption: str = ""  # why preemption is None: where this folder's preemption is tested instead
    slurm_preemption: SlurmPreemption | None = None
    no_slurm_preemption: str = ""  # why slurm_preemption is None: where it is tested instead
    runs: dict = field(default_factory=dict)  # name -> Launch: runs several tests read, started once per session
    same_as_one: SameAsOne | None = None
    no_same_as_one: str = ""  # why same_as_one is None: where it is tested instead
    weights_of: Callable | None = None  # (checkpoint dirs) -> [weights], read together where a read starts a process
    world_size_change: WorldSizeChange | None = None
    no_world_size_change: str = ""  # why world_size_change is None: where resuming on another world size is tested

    def weights_together(self, *ckpt_dirs):
        """[{name: tensor}] of each checkpoint dir."""
        return self.weights_of(*ckpt_dirs) if self.weights_of else [self.weights(d) for d in ckpt_dirs]

    def run(self, tmp_path_factory, name):
        """runs[name], started once per test session and kept: a run that test_behaviour.py and the folder's own
        test file both read is started by whichever asks first (their pytest-xdist workers wait on a file lock) and
        read by both, never run twice. A failed run is not kept: the next test to ask starts it again."""
        launch, runs = self.runs[name], shared_dir(tmp_path_factory, "runs")
        done = runs / f"{self.folder}-{name}.json"
        with open(runs / f"{self.folder}-{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                where = tmp_path_factory.mktemp(f"{self.folder}-{name}")
                codes, outs = self._start(launch, where, shared_dir(tmp_path_factory, f"{self.folder}-data"))
                assert codes == [0] * len(codes), "\n".join(outs)
                done.write_text(json.dumps({"dir": str(where), "codes": codes, "outs": outs}))
        kept = json.loads(done.read_text())
        return Ran(Path(kept["dir"]), Path(kept["dir"]) / "ckpt", kept["codes"], kept["outs"])

    def _start(self, launch, where, data):
        """(exit codes, outputs) of `launch` run in `where`."""
        port, folder = free_port(), ROOT / self.folder
        fill = dict(ckpt=where / "ckpt", dir=where, data=data, port=port,
                    dir_from_folder=os.path.relpath(where, folder))
        args = [str(a).format(**fill) for a in launch.args]
        own = {k: str(v).format(**fill) for k, v in launch.env.items()}
        env = with_teardown_check(clean_env(**own)) if launch.teardown_check else clean_env(**own)
        for path, text in launch.files.items():
            (where / path).parent.mkdir(parents=True, exist_ok=True)
            (where / path).write_text(text.format(**fill, folder=folder))
        if launch.how in ("python", "torchrun", "deepspeed"):
            start = {"python": [env_python(self.folder)], "torchrun": torchrun(self.folder),
                     "deepspeed": [env_python(self.folder).parent / "deepspeed"]}[launch.how]
            return [0], [run([*start, *args], env=env, cwd=folder).stdout]
        if launch.how == "srun":
            assert args[0] == "multinode.py", args  # the script srun starts (Recipe.srun)
            return wait_all(self.srun(args[1:], launch.n, port, extra_env=own), timeout=240)
        assert launch.how == "nodes", launch.how
        procs = [subprocess.Popen(
            [*map(str, torchrun(self.folder)), "--nnodes", str(launch.n), "--nproc_per_node", "1", "--node_rank",
             str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
             f"{self.folder}-nodes", *args], env=env, cwd=folder, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True) for node in range(launch.n)]
        return wait_all(procs, timeout=240)

    def srun(self, args=(), n=2, port=0, *, extra_env=None, drop=(), cwd=None, stderr_apart=False):
        """Start n processes as `srun python multinode.py` does: one task each, Slurm's variables only (no RANK),
        MASTER_ADDR/MASTER_PORT from the job script."""
        assert not self.no_srun, f"{self.folder}: {self.no_srun}"
        procs = []
        own = {k: v.format(n=n, port=port) if isinstance(v, str) else v for k, v in self.env.items()}
        for rank in range(n):
            variables = dict(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=n, SLURM_NPROCS=n, SLURM_NNODES=1,
                             SLURM_NTASKS_PER_NODE=n, SLURM_NODEID=0, SLURM_STEP_ID=0, SLURM_NODELIST="localhost",
                             SLURM_JOB_ID=4242, SLURM_JOB_NAME=f"{self.folder}-test",
                             SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            variables.update(own, **(extra_env or {}))
            env = clean_env(**{k: v for k, v in variables.items() if k not in drop})
            env = with_teardown_check(env) if self.teardown_check else env
            procs.append(subprocess.Popen(
                [str(env_python(self.folder)), "multinode.py", *map(str, args)], env=env,
                cwd=cwd or ROOT / self.folder, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stderr_apart else subprocess.STDOUT, text=True, start_new_session=True))
        return procs


SNAPSHOT_PT = dict(weights=lambda d: _snapshot_pt(d)["model"], step_of=lambda d: _snapshot_pt(d)["step"])
WORKERS = ("--num-workers", "2")
TWO = ("--standalone", "--nproc_per_node", "2")  # torchrun: 2 processes on this host
# JAX's persistent compilation cache, shared by every jax/ run of the tests: a cached step is the compiled one
JAX_CACHE = dict(
    JAX_COMPILATION_CACHE_DIR=Path(tempfile.gettempdir()) / "jax-recipes-test-compilation-cache",
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)


def to_ckpt(*args):
    return (*args, "--checkpoint-dir", "{ckpt}")


# Arguments of the shared runs: 2 epochs, each launch's global batch the same as its reference's.
PT = ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000")  # 16 steps per epoch at batch 32
LIGHTNING = ("--epochs", "2", "--dataset-size", "256", "--log-every", "2")  # 4 steps per epoch at batch 64
MONAI = ("--epochs", "2", "--dataset-size", "12", "--roi-size", "16", "--log-every", "1", "--data-dir", "{data}")
MODULUS = ("--epochs", "2", "--dataset-size", "128", "--log-every", "1")  # 8 steps per epoch at batch 16
NEMO = ("--epochs", "2", "--dataset-size", "64", "--log-every", "2")  # 4 steps per epoch at batch 16
JAX = ("--epochs", "2", "--dataset-size", "1024", "--log-every", "10")  # 32 steps per epoch at batch 32
# a config of the user's own, read with Hydra's --config-path (relative: from the script's directory, as Hydra reads
# it) and --config-name (as NeMo's examples spell it): it extends conf/config.yaml through Hydra's defaults list and
# renames the experiment, which names the files it writes
NEMO_CONF = "hydra:\n  searchpath: [file://{folder}/conf]\ndefaults: [config, _self_]\nname: mine-toy\n"
WORLD_2_ZERO = "[rank0] world size 2 | backend gloo | device cpu | ZeRO stage "
# WorldSizeChange's arguments where one size fits: 2 ranks x batch 16, 16 steps per epoch
SIZE_CHANGE = ("--epochs", "2", "--dataset-size", "512", "--batch-size", "16", "--log-every", "1000")

RECIPES = {r.folder: r for r in [
    Recipe("pytorch", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"), teardown_check=True,
           **SNAPSHOT_PT, preemption=Preemption(
               # 2 ranks x batch 16: 128 steps per epoch
               ("--epochs", "2", "--dataset-size", "4096", "--batch-size", "16", "--log-every", "10"), 256, 128,
               signals=(("usr1", signal.SIGUSR1, ()), ("term-2-workers", signal.SIGTERM, WORKERS))),
           no_slurm_preemption="test_slurm_pytorch.py: multinode.sbatch preempted through its batch shell (TERM "
                               "forwarded as USR1, in RUN's folder, then resubmitted), the torchrun templates "
                               "preempted, a node lost, a worker killed: each == the uninterrupted run",
           runs=dict(reference=Launch("python", to_ckpt("single_gpu.py", *PT, "--batch-size", "32")),
                     torchrun=Launch("torchrun", to_ckpt(*TWO, "multigpu_torchrun.py", *PT, "--batch-size", "16"),
                                     teardown_check=True),
                     spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *PT, "--batch-size", "16")),
                     nodes=Launch("nodes", to_ckpt("multinode.py", *PT, "--batch-size", "16")),
                     srun=Launch("srun", to_ckpt("multinode.py", *PT, "--batch-size", "16"))),
           same_as_one=SameAsOne(
               "reference", (SameAs("torchrun", ("[rank0] world size 2 | backend gloo",), metrics={"loss": 2e-4}),
                             SameAs("spawn", ("[rank0] world size 2",)),
                             SameAs("nodes", ("[rank0] world size 2", "[rank1] host")),  # `srun torchrun` on 2 nodes
                             SameAs("srun", each_says="[rank{rank}] host")),  # ranks from SLURM_PROCID
               (16, 32), "acc", tol=dict(rtol=1e-5, atol=1e-6)),  # float32 reduction order (DDP's buckets) only
           no_world_size_change="test_pytorch.py's test_resume_with_another_world_size (1 x 32 -> 2 x 16 == "
                                "uninterrupted, 2 x 16 -> 1 x 16, a shape refused) and test_fsdp.py's"),
    Recipe("lightning", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           weights=lambda d: _last_ckpt(d)["state_dict"], step_of=lambda d: _last_ckpt(d)["global_step"],
           no_preemption="test_lightning.py's test_preempted_mid_epoch_resumes_after_the_batches_it_trained "
                         "(single_gpu.py, USR1 and TERM, Preemption.CHECK_EVERY's step 10) stays",
           # 2 ranks x 32: 64 steps per epoch; DataLoader workers get the signal too
           slurm_preemption=SlurmPreemption(("--epochs", "3", "--dataset-size", "4096", "--batch-size", "32",
                                             "--log-every", "16", "--num-workers", "2"), 192, 96,
                                            resumed=r"\S+/preempted-step={step}\.ckpt", says=("2 nodes (n[1-2])",)),
           runs=dict(reference=Launch("python", to_ckpt("single_gpu.py", *LIGHTNING, "--batch-size", "64")),
                     torchrun=Launch("torchrun", to_ckpt(
                         "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                         "{port}", "multigpu_torchrun.py", *LIGHTNING, "--batch-size", "32"))),
           # float32 sums in another order (DDP's all-reduce, the conv kernels of batch 32 vs 64): 3e-8 measured on one
           # CPU, 1.0e-5 on an AMD EPYC (2026-12). A batch skipped or trained twice moves the weights by ~1e-3.
           same_as_one=SameAsOne("reference", (SameAs("torchrun", ("[rank0] world size 2 |",)),), (4, 8), "acc",
                                 tol=dict(rtol=1e-3, atol=1e-4), reference_says=("[rank0] world size 1 |",)),
           # Lightning's on_load_checkpoint hook (cluster.py) refuses a finished run's checkpoint as a stopped one's
           world_size_change=WorldSizeChange((*LIGHTNING, "--batch-size", "32"), 8, copy_of="torchrun",
                                             refused="was written by 2 rank(s) x batch 32, this job is 1 x 32")),
    Recipe("monai", ("--epochs", "2", "--dataset-size", "8", "--roi-size", "16", "--log-every", "1"),
           teardown_check=True, **SNAPSHOT_PT,
           no_preemption="test_monai.py's test_preempted_srun_ranks_save_exit_75_and_resume_exactly stays: it ends "
                         "bit-exact with the file's torchrun run (srun == torchrun), which this table cannot reuse",
           # 12 cases of 20^3, batch 1: 6 steps per epoch on 2 ranks. Signalled before training: the ranks stop at the
           # first check that counts it (step 10)
           slurm_preemption=SlurmPreemption(("--epochs", "2", "--dataset-size", "12", "--roi-size", "16",
                                             "--batch-size", "1", "--log-every", "1", "--seed", "0", "--data-dir",
                                             "{dir}/data"), 12, r"\[rank0\] host",
                                            files=("best_model.pt", "snapshot.prev.pt"),
                                            says=("2 nodes (n[1-2]) x 1 tasks",)),
           # 2 ranks x batch 1 under torchrun, validated every epoch: what every other 2-rank launch must reproduce, bit
           # for bit. Not one process: each rank caches its own partition of the cases (CONTRACT.md's C5 exception)
           runs=dict(torchrun=Launch("torchrun", to_ckpt(*TWO, "multigpu_torchrun.py", *MONAI, "--batch-size", "1",
                                                         "--val-every", "1"), teardown_check=True),
                     spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *MONAI, "--batch-size", "1")),
                     nodes=Launch("nodes", to_ckpt("multinode.py", *MONAI, "--batch-size", "1"))),
           same_as_one=SameAsOne("torchrun", (SameAs("spawn", ("[rank0] world size 2",)),
                                              SameAs("nodes", ("[rank0] world size 2", "[rank1] host"))),
                                 (6, 12), "dice"),
           # each rank caches a partition that depends on the world size: load_snapshot (cluster.py) refuses any
           # snapshot of another one, the finished 2 x 1 `nodes` run's (6 steps per epoch) as a stopped one
           world_size_change=WorldSizeChange((*MONAI[:-2], "--batch-size", "1"), 12, copy_of="nodes",
                                             refused="was written by 2 rank(s), this job has 1")),
    Recipe("modulus", MODULUS, teardown_check=True, **SNAPSHOT_PT,
           no_preemption="test_modulus.py's test_srun_tasks_preempted_save_exit_75_and_resume stays: it ends within "
                         "TOL of the file's single-process run (srun == 1 process), which this table cannot reuse",
           # 2 ranks x 8: 16 steps per epoch. Two nodes x 1 task: DistributedManager's SLURM method
           slurm_preemption=SlurmPreemption(("--epochs", "2", "--dataset-size", "256", "--batch-size", "8",
                                             "--log-every", "2"), 32, 6, epoch=1, resumed=r"\S+snapshot\.pt",
                                            files=("fno.mdlus",), says=("initialised from slurm",)),
           runs=dict(reference=Launch("python", to_ckpt("single_gpu.py", *MODULUS, "--batch-size", "16")),
                     torchrun=Launch("torchrun", to_ckpt(*TWO, "multigpu_torchrun.py", *MODULUS, "--batch-size", "8"),
                                     teardown_check=True),
                     spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *MODULUS, "--batch-size", "8"))),
           same_as_one=SameAsOne(
               "reference",
               # loss and validation error are reduced over both ranks: one process's numbers over all samples
               (SameAs("torchrun", ("[rank0] world size 2 (torchrun) | backend gloo | device cpu",),
                       metrics={"loss": 2e-4, "value": 2e-4}),
                SameAs("spawn", ("[rank0] world size 2 (spawned) | backend gloo",))),
               # gloo's all_reduce sums in another order than 1 process: float32 rounding, amplified a little by Adam
               (8, 16), "rel_l2", tol=dict(rtol=1e-4, atol=1e-5)),
           # 2 ranks x batch 8: 8 steps per epoch; 1 x 16 trains the same global batches. Its last step, not an
           # uninterrupted 1 x 16 run (PhysicsNeMo's import is the slowest launch here): equal within
           # test_modulus.py's TOL when checked so (rtol=1e-4, atol=1e-5, 2026-12-07); the same resume code is
           # compared with an uninterrupted run in test_pytorch.py's test_resume_with_another_world_size
           world_size_change=WorldSizeChange(("--epochs", "2", "--dataset-size", "128", "--batch-size", "8",
                                              "--log-every", "1"), 3, resume_batch=16,
                                             resumed="resuming as 1 x 16: epoch 1 after 48 samples (step 3)",
                                             steps=16)),
    Recipe("deepspeed", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           weights=lambda d: _torch_load(_deepspeed_tag(d) / "mp_rank_00_model_states.pt",
                                         weights_only=False)["module"],
           step_of=lambda d: json.loads((_deepspeed_tag(d) / "complete.json").read_text())["step"],
           # deepspeed.init_distributed may meet the busy port as a client first: then the deadline speaks
           busy_port_says=("another process already listens on that port", "did not finish within 8 s"),
           preemption=Preemption(
               # ZeRO-2, 2 ranks x batch 16: 128 steps; every rank saves its shard in a step-* tag
               ("--epochs", "1", "--dataset-size", "4096", "--batch-size", "16", "--log-every", "10",
                "--num-workers", "1", "--ds-config", ROOT / "deepspeed" / "configs" / "zero2.json"), 128, 128,
               resumed=r"resumed from {ckpt}/step-{step:08d}: epoch 1, step {step}$"),
           # ZeRO-2, 2 ranks x 16: 96 steps in 1 epoch; every rank saves its shard of the optimizer
           slurm_preemption=SlurmPreemption(("--epochs", "1", "--dataset-size", "3072", "--batch-size", "16",
                                             "--log-every", "8", "--ds-config", "configs/zero2.json"), 96, 16, epoch=1),
           runs=dict(
               reference=Launch("python", to_ckpt("single_gpu.py", *PT, "--ds-config", "configs/zero0.json",
                                                  "--batch-size", "32")),
               zero1=Launch("torchrun", to_ckpt(*TWO, "multigpu_torchrun.py", *PT, "--ds-config", "configs/zero1.json",
                                                "--batch-size", "16")),
               # DeepSpeed's launcher passes --local_rank=N and sets RANK/LOCAL_RANK/WORLD_SIZE -- and
               # CUDA_VISIBLE_DEVICES=0,1 even without CUDA, so the CPU is asked for with --backend gloo (C12)
               zero2_launcher=Launch("deepspeed", to_ckpt(
                   "--num_gpus", "2", "--master_port", "{port}", "multigpu_torchrun.py", *PT, "--ds-config",
                   "configs/zero2.json", "--batch-size", "16", "--backend", "gloo")),
               # ZeRO-3 that partitions on CPU (zero3_cpu_test.json: stage3_param_persistence_threshold 0)
               zero3_spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *PT, "--ds-config",
                                                    "configs/zero3_cpu_test.json", "--batch-size", "16",
                                                    "--memory-report"))),
           # DeepSpeed's flat buckets, gloo's all-reduce and ZeRO's reduce-scatter sum in other orders: last bits only
           same_as_one=SameAsOne("reference", (SameAs("zero1", (WORLD_2_ZERO + "1",)),
                                               SameAs("zero2_launcher", (WORLD_2_ZERO + "2",)),
                                               SameAs("zero3_spawn", (WORLD_2_ZERO + "3",), weights=_zero3_weights)),
                                 (16, 32), "acc", tol=dict(rtol=1e-4, atol=1e-5)),
           no_world_size_change="test_deepspeed.py: ZeRO-1 2 -> 1 (SGD refused, AdamW through a universal "
                                "checkpoint) and ZeRO-1, -2, -3 1 x 16 -> 2 x 8 -> 1 x 16 == uninterrupted"),
    Recipe("nemo", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           weights=lambda d: _nemo_last(d)["state_dict"], step_of=lambda d: _nemo_last(d)["global_step"],
           no_preemption="test_nemo.py's test_preemption_checkpoints_exits_75_and_the_rerun_resumes "
                         "(single_gpu.py, exp_manager's *-last.ckpt) stays",
           # 2 ranks x 8: 256 steps in 1 epoch (seconds: the signal sent at step 40 lands tens of steps later, still
           # mid-epoch); exp_manager's *-last.ckpt, the .nemo only at the real end
           slurm_preemption=SlurmPreemption(("--epochs", "1", "--dataset-size", "4096", "--batch-size", "8",
                                             "--log-every", "10", "--num-workers", "1"), 256, 40,
                                            resumed=r"\S+-last\.ckpt", files=("checkpoints/nemo-toy.nemo",),
                                            says=("2 nodes (n[1-2])",)),
           runs=dict(reference=Launch("python", to_ckpt("single_gpu.py", *NEMO, "--batch-size", "16", "--config-path",
                                                        "{dir_from_folder}/conf", "--config-name=mine"),
                                      files={"conf/mine.yaml": NEMO_CONF}),
                     torchrun=Launch("torchrun", to_ckpt(*TWO, "multigpu_torchrun.py", *NEMO, "--batch-size", "8")),
                     spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *NEMO, "--batch-size", "8",
                                                    "--timings-file", "{dir}/timings.json"),
                                  env={"MASTER_PORT": "{port}"}),
                     srun=Launch("srun", to_ckpt("multinode.py", *NEMO, "--batch-size", "8"))),
           # float32 summation order only
           same_as_one=SameAsOne("reference", tuple(SameAs(name, ("[rank0] world size 2 |",))
                                                    for name in ("torchrun", "spawn", "srun")),
                                 (4, 8), "acc", tol=dict(atol=1e-6, rtol=0)),
           # Lightning's on_load_checkpoint hook (cluster.py) refuses a finished run's checkpoint as a stopped one's
           world_size_change=WorldSizeChange((*NEMO, "--batch-size", "8"), 8, copy_of="srun",
                                             refused="was written by 2 rank(s) x batch 8, this job is 1 x 8")),
    Recipe("jax", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           # JAX's own Slurm detection: the step's node list and tasks per node; the coordinator's port
           env=dict(SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="{n}", JAX_COORDINATOR_PORT="{port}",
                    **JAX_CACHE),
           weights=lambda d: _jax_weights_of(d)[0], step_of=lambda d: _jax_progress(d)["step"],
           busy_port="test_jax.py's test_coordinator_port_in_use (JAX_* launch); this row passes it too (~17 s of CI)",
           no_preemption="test_jax.py's test_preempted_run_saves_exits_75_and_resumes_exactly (SIGTERM to "
                         "multigpu.py, which forwards it; multinode.py resumes) stays",
           # 2 processes x 16: 64 steps per epoch
           slurm_preemption=SlurmPreemption(("--epochs", "2", "--dataset-size", "2048", "--batch-size", "16",
                                             "--log-every", "8"), 128, 16, epoch=1,
                                            says=("[rank0] processes 2 | devices 2",)),
           runs=dict(reference=Launch("python", to_ckpt("single_gpu.py", *JAX, "--batch-size", "32"), env=JAX_CACHE),
                     spawn=Launch("python", to_ckpt("multigpu.py", "--nprocs", "2", *JAX, "--batch-size", "16"),
                                  env=JAX_CACHE)),
           # the same samples in every global batch, summed in another order (per-device partial sums, then an
           # all-reduce): |difference| <= 1e-6 measured after 64 steps; the tolerance leaves room for other CPUs.
           # The epoch metrics are over the global batch: the single process's numbers
           same_as_one=SameAsOne("reference", (SameAs("spawn", ("[rank0] processes 2 | devices 2 (1 per process, cpu)",
                                                                "[rank1] host"), metrics={"loss": 0}),),
                                 (32, 64), "acc", tol=dict(rtol=1e-4, atol=1e-5)),
           weights_of=_jax_weights_of,
           # 1 process x batch 16 -> 2 processes: x 16 (a global batch of 32) is refused by both (which leave
           # together: JAX aborts a process whose coordinator left first), x 8 resumes and ends at step 64. Its
           # weights equal an uninterrupted 2 x 8 run's because 2 x 8 == 1 x 16 step by step and a resume is exact:
           # test_jax.py's test_spawned_processes_equal_one_process_with_the_global_batch and
           # test_preempted_run_saves_exits_75_and_resumes_exactly (a comparison here costs two JAX launches more)
           world_size_change=WorldSizeChange(SIZE_CHANGE, 5, refused="at a global batch of 16, this job's is 32",
                                             resume_batch=8, resumed="epoch 1, step 5", steps=64, grow=True)),
    Recipe("ray", no_srun="one driver starts every worker itself (ray.train): covered by test_ray.py",
           no_preemption="test_ray.py",
           no_slurm_preemption="test_ray_slurm.py: a Ray cluster inside the job (two jobs at once), SIGTERM to every "
                               "process -> the driver saves -> requeue -> resume",
           no_same_as_one="test_ray.py's test_two_workers_equal_one_process stays: its 2 workers are the preempted "
                          "run's step-10 snapshot, on the file's own Ray cluster, which this table cannot reuse",
           no_world_size_change="test_ray.py's test_two_workers_equal_one_process (2 workers x 16 -> 1 x 16)"),
]}
SRUN = sorted(f for f, r in RECIPES.items() if not r.no_srun)


def scripts_not_run(folder, test_file, leave_out=()):
    """The scripts of `folder` that neither its test file nor its runs here name (a guard: a new script gets a test)."""
    scripts = {p.name for p in (ROOT / folder).glob("*.py")} - {"recipe.py", "cluster.py", "toolkit.py", *leave_out}
    named = Path(test_file).read_text() + " ".join(str(a) for r in RECIPES[folder].runs.values() for a in r.args)
    return {s for s in scripts if s not in named}


def wait_all(procs, timeout=180):
    """(exit codes, outputs) of every process; a process still running after `timeout` s is a failure: every task
    and whatever it started (its process group: the tasks start in sessions of their own) is killed, and the
    failure shows every task's output. A hang must never stall the suite. With stderr kept apart an output is
    (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outs.append(out if err is None else (out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # a task that already exited
                os.killpg(p.pid, signal.SIGKILL)
        rest = "\n".join(f"--- task {r} ---\n{str(p.communicate()[0])[-3000:]}" for r, p in enumerate(procs))
        pytest.fail(f"processes still running after {timeout}s: {[p.args for p in procs]}\n{rest}", pytrace=False)
    return [p.returncode for p in procs], outs


# ------------------------------------------------------------------------------------------ GPU probes' shared parts
# A folder's GPU seams are checked on this CPU machine by one probe process in its environment, CUDA's answers patched
# into the recipe's own code (GPU_PROBE, GPU_FACTS in test_<folder>.py). modulus/ and monai/ share these parts of it.

PROBE_CHECKS = r'''
results = {}

def check(fn):
    try:
        results[fn.__name__] = fn()
    except BaseException as e:
        results[fn.__name__] = {"raised": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return fn
'''

NO_SILENT_CPU_CHECK = r'''@check
def given_gpus_that_torch_cannot_use():
    """C12 in parse_args, where every script starts: one RecipeError, or None where training goes on."""
    def parse(argv, env, problem="torch 2.13.0+cpu is a CPU-only build"):
        with mock.patch.object(sys, "argv", ["single_gpu.py", *argv]), mock.patch.dict(os.environ, env), \
                mock.patch.object(toolkit, "torch_cuda_problem", lambda: problem):
            for name in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
                if name not in env:
                    os.environ.pop(name, None)
            try:
                cluster.parse_args("probe")
            except toolkit.RecipeError as e:
                return str(e)
    return {"slurm": parse([], {"SLURM_GPUS_ON_NODE": "2"}), "nccl": parse(["--backend", "nccl"], {}),
            "visible": parse([], {"CUDA_VISIBLE_DEVICES": "0,1"}),
            "gloo": parse(["--backend", "gloo"], {"SLURM_GPUS_ON_NODE": "2"}),
            "usable": parse([], {"SLURM_GPUS_ON_NODE": "2"}, problem=""), "cpu_job": parse([], {})}
'''

TF32_CHECK = r'''@check
def tf32_for_fp32_on_cuda():
    """fp32 (no --amp) on a GPU: matmuls and convolutions in TF32 (C10), torch's global setting left readable."""
    before = torch.get_float32_matmul_precision()
    cluster.mixed_precision(torch.device("cuda", 0), False)
    return [before, torch.get_float32_matmul_precision()]
'''


def assert_no_silent_cpu(found):
    """What NO_SILENT_CPU_CHECK found: given GPUs it cannot use (Slurm's, --backend nccl, CUDA_VISIBLE_DEVICES), the
    recipe refuses in one line that names what gave them; on purpose (--backend gloo), usable, or none, it trains."""
    assert found["slurm"].startswith("SLURM_GPUS_ON_NODE=2, but torch 2.13.0+cpu is a CPU-only build"), found
    assert "rather than training on the CPU" in found["slurm"]
    assert found["nccl"].startswith("--backend nccl, but"), found
    assert found["visible"].startswith("CUDA_VISIBLE_DEVICES=0,1, but"), found
    assert found["gloo"] is None and found["usable"] is None and found["cpu_job"] is None, found


# lightning/ and nemo/ (both on Lightning) print what their seams answer with CUDA patched in as JSON lines (GPU_FACTS
# in test_<folder>.py); the same checks of the same Lightning integration read them.

LIGHTNING_FACT_CHECK = r'''def check(name):
    def wrap(f):
        try:
            result = f()
        except BaseException as e:
            result = f"{type(e).__name__}: {e}"
        print(json.dumps({name: result}, default=str), flush=True)
    return wrap
'''


def assert_lightning_root_device_is_the_bound_gpu(gpu_facts):
    """Lightning's root device is the GPU init_distributed bound the process group to."""
    assert gpu_facts["root_one_visible"] == "cuda:0"
    assert gpu_facts["root_four_visible"] == "cuda:3"


def assert_tf32_for_fp32_on_the_gpu_only(gpu_facts):
    """TF32 for fp32 on a GPU, readable by Lightning, no warning; nothing under --amp or on the CPU."""
    assert gpu_facts["tf32_cuda_fp32"] == ["high", "tf32", "tf32", []]
    assert gpu_facts["tf32_cuda_bf16"][0] == "highest"
    assert gpu_facts["tf32_cpu_fp32"][0] == "highest"
