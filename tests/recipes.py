"""Every framework folder's launch, as data: what the behavioural tests over all folders (test_behaviour.py) and
the per-folder tests start. A new folder adds a row to RECIPES and gets those tests with no other edit.

    RECIPES[folder].srun(args, n, port)     n processes started as `srun python multinode.py` starts them
    RECIPES[folder].weights(ckpt_dir)       the trained weights a run left there, {name: tensor}
    RECIPES[folder].step_of(ckpt_dir)       the step its newest checkpoint was saved at
    RECIPES[folder].preemption              a run long enough to be signalled mid-training, and what it must say
    wait_all(procs, timeout)                 their exit codes and outputs, or a test failure naming the hang
"""

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import pytest
from helpers import ROOT, clean_env, env_python, with_teardown_check


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


def _jax_weights(ckpt_dir):
    import torch

    leaves, _ = jax_checkpoints(ckpt_dir)[0]
    return {f"leaf{i}": torch.from_numpy(a) for i, a in enumerate(leaves)}


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
    world_size_change: WorldSizeChange | None = None
    no_world_size_change: str = ""  # why world_size_change is None: where resuming on another world size is tested

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
# WorldSizeChange's arguments where one size fits: 2 ranks x batch 16, 16 steps per epoch
SIZE_CHANGE = ("--epochs", "2", "--dataset-size", "512", "--batch-size", "16", "--log-every", "1000")

RECIPES = {r.folder: r for r in [
    Recipe("pytorch", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"), teardown_check=True,
           **SNAPSHOT_PT, preemption=Preemption(
               # 2 ranks x batch 16: 128 steps per epoch
               ("--epochs", "2", "--dataset-size", "4096", "--batch-size", "16", "--log-every", "10"), 256, 128,
               signals=(("usr1", signal.SIGUSR1, ()), ("term-2-workers", signal.SIGTERM, WORKERS))),
           no_world_size_change="test_pytorch.py's test_resume_with_another_world_size (1 x 32 -> 2 x 16 == "
                                "uninterrupted, 2 x 16 -> 1 x 16, a shape refused) and test_fsdp.py's"),
    Recipe("lightning", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           weights=lambda d: _last_ckpt(d)["state_dict"], step_of=lambda d: _last_ckpt(d)["global_step"],
           no_preemption="test_lightning.py's test_preempted_mid_epoch_resumes_after_the_batches_it_trained "
                         "(single_gpu.py, USR1 and TERM, Preemption.CHECK_EVERY's step 10) stays",
           world_size_change=WorldSizeChange(SIZE_CHANGE, 5, refused="was written by 2 rank(s) x batch 16, this "
                                                                      "job is 1 x 16")),
    Recipe("monai", ("--epochs", "2", "--dataset-size", "8", "--roi-size", "16", "--log-every", "1"),
           teardown_check=True, **SNAPSHOT_PT,
           no_preemption="test_monai.py's test_preempted_srun_ranks_save_exit_75_and_resume_exactly stays: it ends "
                         "bit-exact with the file's torchrun run (srun == torchrun), which this table cannot reuse",
           # 2 ranks x batch 2: 2 steps per epoch; each rank caches a partition that depends on the world size
           world_size_change=WorldSizeChange(("--epochs", "2", "--dataset-size", "8", "--roi-size", "16",
                                              "--log-every", "1"), 1, refused="was written by 2 rank(s), this job "
                                                                              "has 1")),
    Recipe("modulus", ("--epochs", "2", "--dataset-size", "128", "--log-every", "1"), teardown_check=True,
           **SNAPSHOT_PT,
           no_preemption="test_modulus.py's test_srun_tasks_preempted_save_exit_75_and_resume stays: it ends within "
                         "TOL of the file's single-process run (srun == 1 process), which this table cannot reuse",
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
           no_world_size_change="test_deepspeed.py: ZeRO-1 2 -> 1 (SGD refused, AdamW through a universal "
                                "checkpoint) and ZeRO-3 1 x 16 -> 2 x 8 -> 1 x 16 == uninterrupted"),
    Recipe("nemo", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           weights=lambda d: _nemo_last(d)["state_dict"], step_of=lambda d: _nemo_last(d)["global_step"],
           no_preemption="test_nemo.py's test_preemption_checkpoints_exits_75_and_the_rerun_resumes "
                         "(single_gpu.py, exp_manager's *-last.ckpt) stays",
           world_size_change=WorldSizeChange(SIZE_CHANGE, 5, refused="was written by 2 rank(s) x batch 16, this "
                                                                      "job is 1 x 16")),
    Recipe("jax", ("--epochs", "2", "--dataset-size", "512", "--log-every", "1000"),
           # JAX's own Slurm detection: the step's node list and tasks per node; the coordinator's port
           env=dict(SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="{n}", JAX_COORDINATOR_PORT="{port}",
                    JAX_COMPILATION_CACHE_DIR=Path(tempfile.gettempdir()) / "jax-recipes-test-compilation-cache",
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0),
           weights=_jax_weights, step_of=lambda d: _jax_progress(d)["step"],
           busy_port="test_jax.py's test_coordinator_port_in_use (JAX_* launch); this row passes it too (~17 s of CI)",
           no_preemption="test_jax.py's test_preempted_run_saves_exits_75_and_resumes_exactly (SIGTERM to "
                         "multigpu.py, which forwards it; multinode.py resumes) stays",
           # 1 process x batch 16 -> 2 processes: x 16 (a global batch of 32) is refused by both (which leave
           # together: JAX aborts a process whose coordinator left first), x 8 resumes and ends at step 64. Its
           # weights equal an uninterrupted 2 x 8 run's because 2 x 8 == 1 x 16 step by step and a resume is exact:
           # test_jax.py's test_spawned_processes_equal_one_process_with_the_global_batch and
           # test_preempted_run_saves_exits_75_and_resumes_exactly (a comparison here costs two JAX launches more)
           world_size_change=WorldSizeChange(SIZE_CHANGE, 5, refused="at a global batch of 16, this job's is 32",
                                             resume_batch=8, resumed="epoch 1, step 5", steps=64, grow=True)),
    Recipe("ray", no_srun="one driver starts every worker itself (ray.train): covered by test_ray.py",
           no_preemption="test_ray.py",
           no_world_size_change="test_ray.py's test_two_workers_equal_one_process (2 workers x 16 -> 1 x 16)"),
]}
SRUN = sorted(f for f, r in RECIPES.items() if not r.no_srun)


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
