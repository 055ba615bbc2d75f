#!/usr/bin/env python3
"""Prove the CUDA paths of every framework folder on a GPU machine, in one command (issue #22): `make gpu-check`.

    python3 tools/gpu_check.py                      # every check, results in runs/gpu-check/
    python3 tools/gpu_check.py --list               # the checks and their commands, nothing run (works without CUDA)
    python3 tools/gpu_check.py --only pytorch/      # the checks whose name contains the substring
    srun --gpus-per-node=8 make gpu-check           # on a Slurm GPU node

Standard library only. On a machine with 1..N CUDA GPUs it runs, for every folder whose framework imports there,
small real runs of the recipes (N = the visible GPUs, at most 8; every training run passes --backend nccl, so a
framework that cannot use the GPU fails in one line (CONTRACT.md C12) instead of training on the CPU):

    <folder>/single          single_gpu.py, fp32, --timings-file (the step time in the table)
    <folder>/single-amp      single_gpu.py --amp
    <folder>/resume          single_gpu.py --max-steps K, then the same command again (it resumes); the final
                             weights are compared with <folder>/single's (rerun here if that check did not pass),
                             read from the folder's snapshot format as tests/recipes.py reads it, within
                             TOL (atol 1e-4, rtol 1e-3: cuDNN's convolutions are not bit-reproducible on GPUs)
    <folder>/usr1            single_gpu.py; SIGUSR1 once the first progress line appears: exit 75 and a snapshot
    <folder>/torchrun        multigpu_torchrun.py under torchrun, N ranks, --backend nccl (not jax/, ray/)
    <folder>/spawn           multigpu.py --nprocs N (mp.spawn, Lightning's, Ray's or the plain-Python spawner)
    <folder>/srun            multinode.py as N processes with Slurm's variables, as tests/recipes.py starts them
                             (not ray/: its driver starts the workers)
    pytorch/fsdp-amp-resume  fsdp.py --amp under torchrun, N ranks: straight, then cut + resume; weights (DCP,
                             converted with dcp_to_torch_save) within TOL_AMP (atol 2e-3, rtol 1e-2)
    deepspeed/zero1|2|3      multigpu_torchrun.py --ds-config configs/zero<S>.json, N ranks
    deepspeed/gpu-zero2|3    the same with configs/gpu/zero<S>.json (GPU-tuned: overlap_comm on)
    deepspeed/gpt-zero3-memory  --model gpt --gpt-params 125M --amp --memory-report under configs/gpu/zero3.json, N
                             ranks (the GPT built inside deepspeed.zero.Init): the report's line must say param bytes
                             = 2 x (params / N + params held whole) within 2 %, about 1/N of the model
    monai/gpu-cache-resume   single_gpu.py --gpu-cache (ThreadDataLoader, cache on the device): cut + resumed ==
                             straight within TOL; monai/gpu-cache-torchrun-resume the same under torchrun, N ranks
    nemo/megatron-pp2-resume megatron_parallel.py --pipeline-model-parallel-size 2 as 2 srun-style tasks (N >= 2,
                             else SKIP): Megatron-Core's pipeline schedule, DDP and dist_checkpointing (CUDA-only);
                             cut at step 10 + resumed == straight (20 steps) within TOL, read as torch DCP
    nemo/megatron-pp2-usr1   the same, SIGUSR1 to rank 0 after the first step line: exit 75 and a checkpoint
    tools/doctor-nccl|gloo   slurm_templates/tools/doctor.py under torchrun, N ranks
    tools/allreduce-1G       slurm_templates/tools/allreduce_bench.py under torchrun, N ranks, 1 GiB messages
    tools/flight-recorder-nccl  tools/gpu_fr_probe.py under torchrun, N >= 2 ranks (else SKIP), with the templates'
                             TORCH_FR_BUFFER_SIZE, TORCH_NCCL_DUMP_ON_TIMEOUT=1, TORCH_FR_DUMP_TEMP_FILE: rank 1 skips
                             an all_reduce, NCCL's watchdog times out (10 s) and every rank dumps; the job fails by
                             design (any exit code passes, a hang does not), slurm_templates/tools/fr_report.py on the
                             dumps must read N of them and name rank 1, alone, as behind

MONAI's --amp is monai/single-amp; JAX on the GPU platform is jax/single (its --backend nccl refuses anything but
JAX's gpu platform). Each folder runs with .venvs/<folder>/bin/python where that exists, else $GPU_CHECK_PYTHON,
else this machine's python3. A folder whose framework does not import there is SKIP with the reason, never a
failure of this script. Each check has a timeout (--timeout-check, 90 s) and the whole a deadline
(--timeout-total, 480 s: about 8 minutes on one H100); checks left when it passes are SKIP.

Results: a table on stdout and in <out>/GPU_RESULTS.md (+ <out>/gpu_results.json): check, PASS/FAIL/SKIP, wall
seconds, median step time (from --timings-file, where the check writes one), peak GPU memory (nvidia-smi polled
every 0.5 s: memory.used of the busiest GPU, any process's) and, for a failure, the last lines printed. The
header names the card, driver, CUDA and each environment's framework versions. Commit the file as
GPU_RESULTS.md at the repository root.

Exit codes: 0 every check run passed (SKIPs allowed), 1 a check failed, 2 bad command line, 4 no CUDA GPU here
(no nvidia-smi, or torch.cuda.is_available() false in the pytorch environment): then it prints exactly one line,
`gpu-check: no CUDA GPU here (<why>): nothing to check`.

Bringing the frameworks to a GPU machine without a package registry: the machine has the driver, a CUDA build
of torch, lightning, jax (CUDA), flax, optax, orbax and torchvision. For the others, on a machine with internet
and the same Python version and platform:

    pip download -d wheels/ -r <folder>/requirements.txt     # or: pip wheel -w wheels/ -r <folder>/requirements.txt

then copy wheels/ over and, on the GPU machine, install the folder's requirements *without torch* (ours pin the
CPU torch of CI) into a venv that keeps the machine's CUDA torch:

    python3 -m venv --system-site-packages .venvs/<folder>
    grep -vE '^(torch|torchvision)==' <folder>/requirements.txt > /tmp/req.txt
    .venvs/<folder>/bin/pip install --no-index --find-links wheels/ -r /tmp/req.txt

Frameworks not brought so are SKIPs.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
EXIT_FAILED, EXIT_NO_GPU = 1, 4
MAX_GPUS = 8
TOL = dict(atol=1e-4, rtol=1e-3)  # fp32 weights, straight vs cut + resumed, on GPUs
TOL_AMP = dict(atol=2e-3, rtol=1e-2)  # the same under bf16/fp16 autocast
# C3's progress line, wherever a launcher puts it; nemo/megatron_parallel.py's step line (its last stage prints it)
PROGRESS = re.compile(r"\[rank0\] epoch \d+ \| batch |\[rank\d+\] step \d+ \| lm loss ")
LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "NODE_RANK", "PYTHONPATH"}


@dataclass(frozen=True)
class Folder:
    """How one framework folder is checked."""
    modules: tuple  # what must import for its checks to run
    dists: tuple  # the distributions whose versions the header names
    small: tuple  # a few seconds of training: 2 epochs
    cut: int  # --max-steps of the cut run of <folder>/resume (mid-epoch of `small` at one process)
    long: tuple  # long enough to be signalled after the first progress line (<folder>/usr1)
    snapshot: str  # how its checkpoint directory is read (see _read_weights)
    torchrun: bool = True
    srun: bool = True
    srun_env: dict = field(default_factory=dict)  # besides Slurm's variables ({n}, {port} filled in)


SMALL = ("--epochs", "2", "--dataset-size", "512", "--batch-size", "16", "--log-every", "8")
LONG = ("--epochs", "2", "--dataset-size", "4096", "--batch-size", "16", "--log-every", "1")
FOLDERS = {
    "pytorch": Folder(("torch",), ("torch",), SMALL, 20, LONG, "snapshot_pt"),
    "lightning": Folder(("torch", "lightning"), ("torch", "lightning"), SMALL, 20, LONG, "lightning"),
    "monai": Folder(("torch", "monai"), ("torch", "monai"),
                    ("--epochs", "2", "--dataset-size", "16", "--roi-size", "16", "--batch-size", "2", "--log-every",
                     "2"), 5,
                    ("--epochs", "2", "--dataset-size", "128", "--roi-size", "16", "--batch-size", "2", "--log-every",
                     "1"), "snapshot_pt"),
    "modulus": Folder(("torch", "physicsnemo"), ("torch", "nvidia-physicsnemo"),
                      ("--epochs", "2", "--dataset-size", "128", "--batch-size", "8", "--log-every", "4"), 10,
                      ("--epochs", "2", "--dataset-size", "2048", "--batch-size", "8", "--log-every", "1"),
                      "snapshot_pt"),
    "nemo": Folder(("torch", "nemo", "lightning"), ("torch", "nemo-toolkit", "lightning"), SMALL, 20, LONG, "nemo"),
    "ray": Folder(("torch", "ray.train"), ("torch", "ray"), SMALL, 20, LONG, "ray", torchrun=False, srun=False),
    "deepspeed": Folder(("torch", "deepspeed"), ("torch", "deepspeed"), SMALL, 20, LONG, "deepspeed"),
    "jax": Folder(("jax", "optax"), ("jax", "jaxlib", "optax"), SMALL, 20, LONG, "jax", torchrun=False,
                  srun_env=dict(SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE="{n}",
                                JAX_COORDINATOR_PORT="{port}")),
}


# ------------------------------------------------------------------------------------------ the checks, as data


@dataclass
class Launch:
    """One launch: `procs` command lines started together (several: srun-style tasks, each with its env), in cwd."""
    procs: list  # [(argv, extra env)]
    cwd: Path
    expect: int | None = 0  # None: any exit (a job meant to fail: the check passes on what it left), not a timeout
    usr1: bool = False  # SIGUSR1 to the first process once the first progress line appears
    reuse: str = ""  # skipped when the check of this name passed earlier in this run (it made the same files)


@dataclass
class Check:
    name: str
    folder: str  # whose environment runs it ("pytorch" for the tools)
    launches: list
    verify: tuple = ()  # ("same", snapshot kind, dir a, dir b, tol), ("snapshot", kind, dir), ("memory", n) or
    # ("flight-recorder", dump dir, n, the rank behind): see verify()
    timings: Path | None = None
    fresh: tuple = ()  # directories emptied before it runs (besides every --checkpoint-dir)
    skip: str = ""  # why it cannot run at this number of GPUs: SKIP with that reason


def python_of(folder: str) -> str:
    """The folder's environment if built, else $GPU_CHECK_PYTHON, else this machine's python3."""
    venv = ROOT / ".venvs" / folder / "bin" / "python"
    if venv.exists():
        return str(venv)
    return os.environ.get("GPU_CHECK_PYTHON") or shutil.which("python3") or sys.executable


def slurm_env(rank: int, n: int, folder: str) -> dict:
    """What srun gives task `rank` of n on one node (as tests/recipes.py's Recipe.srun), plus the job script's
    MASTER_ADDR/MASTER_PORT and the GPUs Slurm would report. "{port}" is filled in at launch."""
    env = dict(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=n, SLURM_NPROCS=n, SLURM_NNODES=1,
               SLURM_NTASKS_PER_NODE=n, SLURM_NODEID=0, SLURM_STEP_ID=0, SLURM_NODELIST="localhost",
               SLURM_JOB_ID=4242, SLURM_JOB_NAME=f"{folder}-gpu-check", SLURM_LAUNCH_NODE_IPADDR="127.0.0.1",
               SLURM_GPUS_ON_NODE=n, MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
    env.update({k: v.replace("{n}", str(n)) for k, v in FOLDERS[folder].srun_env.items()})
    return {k: str(v) for k, v in env.items()}


def plan(n: int, out: Path) -> list[Check]:
    """Every check of every folder, at n GPUs, its files under out/work/."""
    work = out / "work"
    checks = []

    def d(name, what="ckpt"):
        return work / name.replace("/", "-") / what

    for folder, f in FOLDERS.items():
        py, here = python_of(folder), ROOT / folder
        torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
        gpu = ("--backend", "nccl")

        def single(*args, ckpt, timings=None, expect=0, usr1=False, reuse="", py=py, here=here, gpu=gpu):
            argv = [py, "single_gpu.py", *args, *gpu, "--checkpoint-dir", str(ckpt)]
            argv += ["--timings-file", str(timings)] if timings else []
            return Launch([(argv, {})], here, expect, usr1, reuse)

        name = f"{folder}/single"
        straight = d(name)
        checks.append(Check(name, folder, [single(*f.small, ckpt=straight, timings=d(name, "timings.json"))],
                            ("snapshot", f.snapshot, straight), d(name, "timings.json")))
        name = f"{folder}/single-amp"
        checks.append(Check(name, folder, [single(*f.small, "--amp", ckpt=d(name), timings=d(name, "timings.json"))],
                            ("snapshot", f.snapshot, d(name)), d(name, "timings.json")))
        name = f"{folder}/resume"
        checks.append(Check(name, folder, [
            single(*f.small, ckpt=straight, reuse=f"{folder}/single"),
            single(*f.small, "--max-steps", str(f.cut), ckpt=d(name)),
            single(*f.small, ckpt=d(name))], ("same", f.snapshot, straight, d(name), TOL)))
        name = f"{folder}/usr1"
        checks.append(Check(name, folder, [single(*f.long, ckpt=d(name), expect=75, usr1=True)],
                            ("snapshot", f.snapshot, d(name))))
        if f.torchrun:
            name = f"{folder}/torchrun"
            argv = [*torchrun, "multigpu_torchrun.py", *f.small, *gpu, "--checkpoint-dir", str(d(name)),
                    "--timings-file", str(d(name, "timings.json"))]
            checks.append(Check(name, folder, [Launch([(argv, {})], here)], ("snapshot", f.snapshot, d(name)),
                                d(name, "timings.json")))
        name = f"{folder}/spawn"
        argv = [py, "multigpu.py", "--nprocs", str(n), *f.small, *gpu, "--checkpoint-dir", str(d(name)),
                "--timings-file", str(d(name, "timings.json"))]
        checks.append(Check(name, folder, [Launch([(argv, {})], here)], ("snapshot", f.snapshot, d(name)),
                            d(name, "timings.json")))
        if f.srun:
            name = f"{folder}/srun"
            argv = [py, "multinode.py", *f.small, *gpu, "--checkpoint-dir", str(d(name)),
                    "--timings-file", str(d(name, "timings.json"))]
            checks.append(Check(name, folder, [Launch([(argv, slurm_env(r, n, folder)) for r in range(n)], here)],
                                ("snapshot", f.snapshot, d(name)), d(name, "timings.json")))
        if folder == "pytorch":
            name = "pytorch/fsdp-amp-resume"
            fsdp = [*torchrun, "fsdp.py", *SMALL, "--amp", *gpu]
            per_epoch = 512 // n // 16  # SMALL's steps per epoch at n ranks; the cut falls mid-epoch 2 if it can
            cut = per_epoch + per_epoch // 2 if per_epoch > 1 else 1
            checks.append(Check(name, folder, [
                Launch([([*fsdp, "--checkpoint-dir", str(d(name, "straight")), "--timings-file",
                          str(d(name, "timings.json"))], {})], here),
                Launch([([*fsdp, "--max-steps", str(cut), "--checkpoint-dir", str(d(name))], {})], here),
                Launch([([*fsdp, "--checkpoint-dir", str(d(name))], {})], here)],
                ("same", "fsdp", d(name, "straight"), d(name), TOL_AMP), d(name, "timings.json")))
            checks += tool_checks(n, work)  # right after pytorch/: the first things a cluster admin wants to see
        if folder == "nemo":
            checks += megatron_checks(n, d, py, here)
        if folder == "monai":
            checks += gpu_cache_checks(n, d, single, torchrun, here, gpu)
        if folder == "deepspeed":
            # configs/ is tuned for the CPU tests; configs/gpu/ (overlap_comm on: reduction and, at stage 3, the
            # next parameters' gathers on a side stream) is what nothing but a GPU runs.
            for config in ("zero1", "zero2", "zero3", "gpu/zero2", "gpu/zero3"):
                name = f"deepspeed/{config.replace('/', '-')}"
                argv = [*torchrun, "multigpu_torchrun.py", *SMALL, *gpu, "--ds-config",
                        str(here / "configs" / f"{config}.json"), "--checkpoint-dir", str(d(name)),
                        "--timings-file", str(d(name, "timings.json"))]
                checks.append(Check(name, folder, [Launch([(argv, {})], here)], ("snapshot", "deepspeed", d(name)),
                                    d(name, "timings.json")))
            # The GPT built inside deepspeed.zero.Init under gpu/zero3.json: each rank holds 1/N of it. 125M: every
            # attention and MLP weight is far above the config's persistence threshold (1e5 elements, kept whole).
            name = "deepspeed/gpt-zero3-memory"
            argv = [*torchrun, "multigpu_torchrun.py", "--model", "gpt", "--gpt-params", "125M", "--amp",
                    "--memory-report", "--max-steps", "2", "--dataset-size", "256", "--batch-size", "4",
                    "--log-every", "1", *gpu, "--ds-config", str(here / "configs" / "gpu" / "zero3.json")]
            checks.append(Check(name, folder, [Launch([(argv, {})], here)], ("memory", n)))
    return checks


def gpu_cache_checks(n: int, d, single, torchrun: list, here: Path, gpu: tuple) -> list[Check]:
    """monai --gpu-cache (the cases cached in GPU memory, augmented there by a ThreadDataLoader): cut + resumed ==
    straight within TOL, in one process and under torchrun at N ranks."""
    f, checks = FOLDERS["monai"], []
    name = "monai/gpu-cache-resume"
    checks.append(Check(name, "monai", [
        single(*f.small, "--gpu-cache", ckpt=d(name, "straight")),
        single(*f.small, "--gpu-cache", "--max-steps", str(f.cut), ckpt=d(name)),
        single(*f.small, "--gpu-cache", ckpt=d(name))], ("same", f.snapshot, d(name, "straight"), d(name), TOL)))
    name = "monai/gpu-cache-torchrun-resume"
    per_epoch = 16 // n // 2  # f.small's steps per epoch at n ranks (each rank its partition of 16 cases, batch 2)
    cut = per_epoch + per_epoch // 2 if per_epoch > 1 else 1  # mid-epoch 2 where there is one
    run = [*torchrun, "multigpu_torchrun.py", *f.small, "--gpu-cache", *gpu]
    checks.append(Check(name, "monai", [
        Launch([([*run, "--checkpoint-dir", str(d(name, "straight"))], {})], here),
        Launch([([*run, "--max-steps", str(cut), "--checkpoint-dir", str(d(name))], {})], here),
        Launch([([*run, "--checkpoint-dir", str(d(name))], {})], here)],
        ("same", f.snapshot, d(name, "straight"), d(name), TOL)))
    return checks


def megatron_checks(n: int, d, py: str, here: Path) -> list[Check]:
    """nemo/megatron_parallel.py at pipeline 2 (two stages, one GPU each, srun-style tasks): Megatron-Core's
    schedule, DistributedDataParallel and dist_checkpointing, all CUDA-only. Cut at step 10 + resumed == straight
    within TOL; SIGUSR1 to rank 0 -> every rank saves at the agreed step and exits 75."""
    skip = "" if n >= 2 else f"needs 2 GPUs or more (a pipeline stage per GPU), {n} here"

    def pp2(*args, ckpt, expect=0, usr1=False):
        argv = [py, "megatron_parallel.py", "--pipeline-model-parallel-size", "2", *args, "--backend", "nccl",
                "--checkpoint-dir", str(ckpt)]
        return Launch([(argv, slurm_env(r, 2, "nemo")) for r in range(2)], here, expect, usr1)

    name = "nemo/megatron-pp2-resume"
    resume = Check(name, "nemo", [pp2("--steps", "20", ckpt=d(name, "straight")), pp2("--steps", "10", ckpt=d(name)),
                                  pp2("--steps", "20", ckpt=d(name))],
                   ("same", "megatron", d(name, "straight"), d(name), TOL), skip=skip)
    name = "nemo/megatron-pp2-usr1"
    usr1 = Check(name, "nemo", [pp2("--steps", "1000", ckpt=d(name), expect=75, usr1=True)],
                 ("snapshot", "megatron", d(name)), skip=skip)
    return [resume, usr1]


def tool_checks(n: int, work: Path) -> list[Check]:
    """The doctor (nccl and gloo), the all-reduce bench at 1 GiB and the Flight Recorder on an NCCL timeout, under
    torchrun with the pytorch environment."""
    py, tools = python_of("pytorch"), ROOT / "slurm_templates" / "tools"
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    checks = []
    for backend in ("nccl", "gloo"):
        argv = [*torchrun, "doctor.py", "--backend", backend, "--timeout", "60"]
        checks.append(Check(f"tools/doctor-{backend}", "pytorch", [Launch([(argv, {})], tools)]))
    argv = [*torchrun, "allreduce_bench.py", "--backend", "nccl", "--min-bytes", "1G", "--max-bytes", "1G",
            "--iters", "5", "--warmup", "2", "--timeout", "120", "--json", str(work / "allreduce-1G.json")]
    checks.append(Check("tools/allreduce-1G", "pytorch", [Launch([(argv, {})], tools)]))
    # A hang on purpose (tools/gpu_fr_probe.py: rank 1 skips an all_reduce): NCCL's watchdog times out after 10 s and
    # every rank dumps its Flight Recorder where the templates' three variables say; fr_report.py must then name
    # rank 1. The job fails by design (the watchdog aborts the ranks that wait): any exit code, never a timeout.
    dumps = work / "tools-flight-recorder" / "debug"
    env = dict(TORCH_FR_BUFFER_SIZE="2000", TORCH_NCCL_DUMP_ON_TIMEOUT="1",
               TORCH_FR_DUMP_TEMP_FILE=f"{dumps}/nccl_trace_rank_",  # as the multi-node templates export them
               TORCH_NCCL_WAIT_TIMEOUT_DUMP_MILSEC="5000")  # the watchdog aborts 4x this after the dump: 60 s -> 20 s
    argv = [*torchrun, "gpu_fr_probe.py", "--backend", "nccl", "--timeout", "10", "--wait", "45"]
    checks.append(Check("tools/flight-recorder-nccl", "pytorch", [Launch([(argv, env)], TOOLS, expect=None)],
                        ("flight-recorder", dumps, n, 1), fresh=(dumps,),
                        skip="" if n >= 2 else f"needs 2 GPUs or more (NCCL runs one rank per GPU), {n} here"))
    return checks


def describe(check: Check) -> str:
    """The check's commands, as one could type them (--list)."""
    lines = [f"    skipped: {check.skip}"] if check.skip else []
    for launch in check.launches:
        rel = launch.cwd.relative_to(ROOT)
        for argv, env in launch.procs:
            prefix = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith(("SLURM_PROCID", "SLURM_NTASKS",
                                                                                    "MASTER_", "TORCH_")))
            extra = f" (then SIGUSR1 after the first progress line; expect exit {launch.expect})" if launch.usr1 \
                else (" (any exit code: it is meant to fail)" if launch.expect is None else
                      f" (expect exit {launch.expect})" if launch.expect else "")
            lines.append(f"    cd {rel} && {prefix + ' ' if prefix else ''}{' '.join(map(str, argv))}{extra}")
    what = check.verify[0] if check.verify else None
    if what == "same":
        _, kind, a, b, tol = check.verify
        lines.append(f"    then: weights ({kind}) of {a} == {b} within atol {tol['atol']}, rtol {tol['rtol']}")
    elif what == "memory":
        lines.append(f"    then: its 'memory per rank' line says stage 3, world {check.verify[1]}, param bytes "
                     f"2 x (params / {check.verify[1]} + params held whole) within {MEMORY_REL:.0%}, about 1/N")
    elif what == "flight-recorder":
        _, dumps, n, behind = check.verify
        lines.append(f"    then: slurm_templates/tools/fr_report.py {dumps} reads {n} rank dumps and names rank "
                     f"{behind}, and only it, as behind")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ weights (child side)
# These run inside a folder's environment (torch or numpy there), started as
#   <python> -c "import sys; sys.path.insert(0, TOOLS); import gpu_check; gpu_check.child_main()" ARGS
# so that this file stays standard library only.


def _as_float(x):
    if hasattr(x, "detach"):  # torch
        return x.detach().float().cpu()
    import numpy as np

    return np.asarray(x, dtype=np.float64)


def compare_state_dicts(a: dict, b: dict, atol: float, rtol: float) -> tuple[bool, str]:
    """(same within |a - b| <= atol + rtol * |b| everywhere, a one-line account). Tensors (torch) or arrays."""
    if a.keys() != b.keys():
        return False, f"different keys: {sorted(set(a) ^ set(b))[:5]}"
    worst, worst_key = 0.0, None
    for k in a:
        x, y = _as_float(a[k]), _as_float(b[k])
        if tuple(x.shape) != tuple(y.shape):
            return False, f"{k}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.numel() if hasattr(x, "numel") else x.size:
            diff = abs(x - y)
            if not bool((diff <= atol + rtol * abs(y)).all()):
                return False, f"{k}: max |diff| {float(diff.max()):.3g} > atol {atol} + rtol {rtol} * |b|"
            if float(diff.max()) > worst:
                worst, worst_key = float(diff.max()), k
    where = f" at {worst_key}" if worst_key else ""
    return True, f"{len(a)} tensors within atol {atol}, rtol {rtol} (max |diff| {worst:.3g}{where})"


def _read_weights(kind: str, ckpt: Path) -> tuple[dict, int]:
    """(weights, step) of the newest checkpoint in ckpt, per folder format (as tests/recipes.py reads them)."""
    if kind == "jax":  # Orbax's CheckpointManager: the folder's own reader, in jax's environment (as tests/recipes.py)
        sys.path.insert(0, str(ROOT / "jax"))
        import cluster

        leaves, progress = cluster.read_checkpoint(ckpt)  # the newest step, every array whole, on the CPU
        return {f"leaf{i}": a for i, a in enumerate(leaves)}, progress["step"]
    import torch

    def load(path, weights_only=False):
        return torch.load(path, map_location="cpu", weights_only=weights_only)

    if kind == "snapshot_pt":
        s = load(ckpt / "snapshot.pt", weights_only=True)
        return s["model"], s["step"]
    if kind == "lightning":
        s = load(ckpt / "last.ckpt")
        return s["state_dict"], s["global_step"]
    if kind == "nemo":
        found = sorted((ckpt / "checkpoints").glob("*last.ckpt"))
        if len(found) != 1:
            raise RuntimeError(f"want one *last.ckpt in {ckpt}/checkpoints, got {[p.name for p in found]}")
        s = load(found[0])
        return s["state_dict"], s["global_step"]
    if kind == "ray":
        snaps = [load(p, weights_only=True) for p in (ckpt / "train").glob("checkpoint_*/snapshot.pt")]
        if not snaps:
            raise RuntimeError(f"no snapshot under {ckpt}/train")
        s = max(snaps, key=lambda s: s["step"])
        return s["model"], s["step"]
    if kind == "deepspeed":
        done = sorted(ckpt.glob("step-*/complete.json"))
        if not done:
            raise RuntimeError(f"no complete step-* tag in {ckpt}")
        return load(done[-1].parent / "mp_rank_00_model_states.pt")["module"], json.loads(done[-1].read_text())["step"]
    if kind == "megatron":  # dist_checkpointing (torch_dist): a torch.distributed.checkpoint per iter_<step>/
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        step = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
        full = ckpt / f"iter_{step:07d}-full.pt"
        if not full.exists():
            dcp_to_torch_save(ckpt / f"iter_{step:07d}", full)
        # the tensors: each layer's _extra_state is a pickled object ([None] in the local spec), not a weight
        return {k: v for k, v in load(full).items() if isinstance(v, torch.Tensor)}, step
    if kind == "fsdp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        tag = (ckpt / "latest").read_text().strip()
        full = ckpt / f"{tag}-full.pt"
        if not full.exists():
            dcp_to_torch_save(ckpt / tag, full)
        return load(full)["model"], int(tag.split("-")[-1])
    raise ValueError(f"unknown snapshot kind {kind}")


def child_main(argv=None) -> None:
    """snapshot KIND DIR -> {"step": S}; same KIND A B ATOL RTOL -> {"ok": bool, "detail": ...}: one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "snapshot":
        weights, step = _read_weights(argv[1], Path(argv[2]))
        print(json.dumps({"ok": bool(weights), "detail": f"snapshot at step {step}", "step": step}))
    else:
        kind, a, b, atol, rtol = argv[1], Path(argv[2]), Path(argv[3]), float(argv[4]), float(argv[5])
        (wa, sa), (wb, sb) = _read_weights(kind, a), _read_weights(kind, b)
        ok, detail = compare_state_dicts(wa, wb, atol, rtol)
        if sa != sb:
            ok, detail = False, f"steps differ: {sa} vs {sb}"
        print(json.dumps({"ok": ok, "detail": detail}))


# ------------------------------------------------------------------------------------------ running


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_")) and k not in LAUNCHER_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "4"))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GpuMemory:
    """Peak memory.used (MiB) of the busiest GPU while the `with` lasts, polled from nvidia-smi."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                used = [int(x) for x in out.split()]
                if used:
                    self.peak = max(self.peak or 0, max(used))
            self._stop.wait(0.5)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()


def launch(spec: Launch, timeout: float) -> tuple[int | None, str]:
    """Run one launch to its end (all its processes), or kill every process group at `timeout`. Returns
    (the exit code: the first non-zero one, None on timeout, and the combined output)."""
    port = str(free_port())
    procs, outputs = [], []
    for argv, env in spec.procs:
        env = {k: v.replace("{port}", port) for k, v in env.items()}
        procs.append(subprocess.Popen([str(a) for a in argv], cwd=spec.cwd, env=clean_env(env), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True))
        outputs.append([])
    progress = threading.Event()

    def read(i, p):
        for line in p.stdout:
            outputs[i].append(line)
            if PROGRESS.search(line):
                progress.set()

    readers = [threading.Thread(target=read, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    deadline, signalled, timed_out = time.monotonic() + timeout, False, False
    while any(p.poll() is None for p in procs):
        if spec.usr1 and not signalled and progress.is_set():
            procs[0].send_signal(signal.SIGUSR1)
            signalled = True
        if time.monotonic() > deadline:
            timed_out = True
            break
        time.sleep(0.05)
    for p in procs:  # leftovers (a hung rank, a Ray process): every process group this launch started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait()
    for t in readers:
        t.join(timeout=5)
    text = "".join(outputs[0]) if len(procs) == 1 else "".join(
        f"[task {i}] {line}" for i, out in enumerate(outputs) for line in out)
    if spec.usr1 and not signalled:
        text += "\ngpu-check: no progress line appeared: SIGUSR1 never sent\n"
        return (None if timed_out else -1), text
    if timed_out:
        return None, text + f"\ngpu-check: killed after {timeout:.0f} s\n"
    codes = [p.returncode for p in procs]
    if spec.expect is None:  # any exit will do: the first process's code, for the record
        return codes[0], text
    return next((c for c in codes if c != spec.expect), spec.expect), text


def step_time_ms(timings: Path | None):
    """Median time between step ends of a --timings-file (the first step, compilation and warm-up, left out)."""
    with contextlib.suppress(Exception):
        times = json.loads(Path(timings).read_text())["step_end_times"]
        gaps = [b - a for a, b in zip(times[1:], times[2:])]
        return round(statistics.median(gaps) * 1e3, 2) if gaps else None
    return None


def tail(text: str, n: int = 15) -> list[str]:
    return [line for line in text.rstrip().splitlines()][-n:]


def run_check(check: Check, timeout: float, passed: set) -> dict:
    """PASS/FAIL of one check, with its wall time, step time, peak GPU memory and (on failure) the last lines."""
    result = dict(check=check.name, result="PASS", wall_s=0.0, step_ms=None, peak_mib=None, detail="", tail=[])
    start = time.monotonic()
    if check.timings:
        with contextlib.suppress(FileNotFoundError):
            Path(check.timings).unlink()
    with GpuMemory() as memory:
        todo = [spec for spec in check.launches if not (spec.reuse and spec.reuse in passed)]
        ckpts = {Path(argv[argv.index("--checkpoint-dir") + 1]) for spec in todo for argv, _ in spec.procs
                 if "--checkpoint-dir" in argv}
        for ckpt in ckpts | {Path(p) for p in check.fresh}:  # fresh directories (a resume reuses its own, later)
            shutil.rmtree(ckpt, ignore_errors=True)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
        out = ""
        for spec in todo:
            left = timeout - (time.monotonic() - start)
            code, out = launch(spec, max(1.0, left))
            if code is None or (spec.expect is not None and code != spec.expect):
                result.update(result="FAIL", detail="timed out" if code is None else f"exit {code}, want "
                              f"{spec.expect}", tail=tail(out))
                break
        else:
            if check.verify:
                ok, detail, out = verify(check, out)
                result.update(detail=detail)
                if not ok:
                    result.update(result="FAIL", tail=tail(out))
    result.update(wall_s=round(time.monotonic() - start, 1), peak_mib=memory.peak, step_ms=step_time_ms(check.timings))
    return result


def verify(check: Check, out: str = "") -> tuple[bool, str, str]:
    """(passed, a one-line account, the text to show on failure) of what the check left: `out` is what its last
    launch printed."""
    if check.verify[0] == "memory":
        return (*zero3_memory(out, check.verify[1]), out)
    if check.verify[0] == "flight-recorder":
        ok, detail, report = flight_recorder(*check.verify[1:])
        return ok, detail, out + report  # on failure the job's last lines, then the report's
    what, kind, *rest = check.verify
    args = ["snapshot", kind, str(rest[0])] if what == "snapshot" else [
        "same", kind, str(rest[0]), str(rest[1]), str(rest[2]["atol"]), str(rest[2]["rtol"])]
    code = f"import sys; sys.path.insert(0, {str(TOOLS)!r}); import gpu_check; gpu_check.child_main()"
    env = clean_env({"JAX_PLATFORMS": "cpu"} if kind == "jax" else {})  # JAX reads on the CPU: no GPU memory taken
    try:
        proc = subprocess.run([python_of(check.folder), "-c", code, *args], capture_output=True, text=True,
                              timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return False, "reading the checkpoints timed out", ""
    with contextlib.suppress(Exception):
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        return answer["ok"], answer["detail"], proc.stdout + proc.stderr
    return False, "could not read the checkpoints", proc.stdout + proc.stderr


MEMORY = re.compile(r"memory per rank \| stage (\d) \| world (\d+) \| params (\d+) \| param bytes (\d+) \| .* \| "
                    r"params held whole (\d+)$", re.M)  # deepspeed/cluster.py's report_memory, rank 0
MEMORY_REL = 0.02  # DeepSpeed pads each rank's partition to an alignment (as tests/test_deepspeed.py allows)


def zero3_memory(out: str, n: int, bytes_per_param: int = 2) -> tuple[bool, str]:
    """ZeRO-3 at n ranks: each rank holds its 1/n shard of every parameter (16-bit under --amp) plus the parameters
    kept whole (stage3_param_persistence_threshold); with those few, about 1/n of the model."""
    found = MEMORY.search(out)
    if not found:
        return False, "no 'memory per rank' line (--memory-report)"
    stage, world, psi, param_bytes, whole = map(int, found.groups())
    if (stage, world) != (3, n):
        return False, f"stage {stage}, world {world}: want stage 3, world {n}"
    share = bytes_per_param * psi / n
    want = share + bytes_per_param * whole
    if abs(param_bytes - want) > MEMORY_REL * want:
        return False, (f"param bytes {param_bytes}, want 2 x ({psi} / {n} + {whole} held whole) = {want:.0f} "
                       f"within {MEMORY_REL:.0%}")
    if param_bytes > (1 + 2 * MEMORY_REL) * share:
        return False, f"param bytes {param_bytes}: {param_bytes / share:.2f} x 2 x {psi} / {n}, not about 1/{n}"
    return True, (f"param bytes {param_bytes} = {param_bytes / (bytes_per_param * psi):.4f} of 2 x {psi} "
                  f"(1/{n} = {1 / n:.4f}; {whole} held whole)")


def flight_recorder(dumps: Path, n: int, behind: int) -> tuple[bool, str, str]:
    """slurm_templates/tools/fr_report.py (standard library) on the dumps: all n ranks wrote one, and the report
    names `behind` as the one rank behind."""
    script = ROOT / "slurm_templates" / "tools" / "fr_report.py"
    try:
        proc = subprocess.run([sys.executable, str(script), str(dumps), "--torchfrtrace", "off"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False, "fr_report.py timed out", ""
    text = proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    named = [line for line in lines if re.match(r"rank \d+ is behind ", line)]
    if proc.returncode != 0 or not lines:
        return False, f"fr_report.py exit {proc.returncode}: {' '.join(tail(text, 1))}", text
    if not lines[0].startswith(f"{n} rank dumps in "):
        return False, f"want {n} rank dumps: {lines[0]}", text
    if [line.split()[1] for line in named] != [str(behind)]:
        return False, f"want rank {behind} (only) named as behind, got: {' / '.join(named) or lines[-1]}", text
    return True, named[0], text


# ------------------------------------------------------------------------------------------ probes


PROBE = """
import importlib, importlib.metadata as md, json, sys
mods, dists = sys.argv[1].split(","), sys.argv[2].split(",")
info = {"python": sys.version.split()[0], "versions": {}}
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as e:
        print(json.dumps({"missing": f"import {m}: {type(e).__name__}: {e}"[:300]})); sys.exit(0)
for d in dists:
    try:
        info["versions"][d] = md.version(d)
    except Exception:
        info["versions"][d] = "?"
if "torch" in mods:
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = torch.cuda.device_count()
if "jax" in mods:
    import jax
    info["jax_backend"] = jax.default_backend()
print(json.dumps(info))
"""


def probe(folder: str) -> dict:
    """{"missing": why} or {"versions": ..., "torch_cuda": ..., ...} of the folder's environment."""
    f = FOLDERS[folder]
    try:
        proc = subprocess.run([python_of(folder), "-c", PROBE, ",".join(f.modules), ",".join(f.dists)],
                              capture_output=True, text=True, timeout=120, env=clean_env({}))
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - any failure to probe is a SKIP with its reason
        return {"missing": f"{python_of(folder)} could not be probed: {type(e).__name__}: {e}"[:300]}


def no_gpu_reason() -> str | None:
    """Why there is no CUDA GPU to check here, or None."""
    if not shutil.which("nvidia-smi"):
        return "no nvidia-smi"
    py = python_of("pytorch")
    try:
        proc = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                              text=True, timeout=120, env=clean_env({}))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{py}: {type(e).__name__}"
    if proc.returncode != 0:
        return f"torch does not import in {py}"
    if proc.stdout.strip() != "True":
        return f"torch.cuda.is_available() is False in {py}"
    return None


def gpu_count() -> int:
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
        return len(out.split())
    return 0


def machine() -> dict:
    """Card, driver and CUDA, from nvidia-smi."""
    info = {"host": socket.gethostname(), "date": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds")}
    with contextlib.suppress(Exception):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
        cards = [line.split(", ") for line in out.strip().splitlines()]
        info["cards"] = [f"{c[0]} ({c[2]})" for c in cards]
        info["driver"] = cards[0][1]
        banner = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        m = re.search(r"CUDA Version:\s*([\d.]+)", banner)
        info["cuda"] = m.group(1) if m else "?"
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    return info


# ------------------------------------------------------------------------------------------ the report


def cell(value) -> str:
    return "" if value is None else str(value).replace("|", "\\|")


def format_markdown(header: dict, results: list[dict]) -> str:
    """GPU_RESULTS.md: the machine and versions, the table, then each failure's last lines."""
    cards = header.get("cards") or ["?"]
    lines = ["# GPU check (`make gpu-check`, tools/gpu_check.py)", "",
             f"- machine: {header.get('host', '?')}, {len(cards)} x {cards[0]}",
             f"- driver {header.get('driver', '?')}, CUDA {header.get('cuda', '?')} (nvidia-smi)",
             f"- date {header.get('date', '?')}, commit {header.get('commit', '?')}, GPUs used {header.get('n', '?')}"]
    for folder, info in header.get("envs", {}).items():
        if "missing" in info:
            lines.append(f"- {folder}: not checked ({info['missing']})")
        else:
            versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
            extra = []
            if info.get("torch_cuda"):
                extra.append(f"torch CUDA {info['torch_cuda']}")
            if info.get("jax_backend"):
                extra.append(f"jax backend {info['jax_backend']}")
            lines.append(f"- {folder}: {versions}{' (' + ', '.join(extra) + ')' if extra else ''}, "
                         f"python {info.get('python', '?')}")
    counts = {r: sum(x["result"] == r for x in results) for r in ("PASS", "FAIL", "SKIP")}
    lines += ["", f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP", "",
              "| check | result | wall s | step ms | peak GPU MiB | detail |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {cell(r['check'])} | {r['result']} | {cell(r.get('wall_s'))} | {cell(r.get('step_ms'))} | "
                     f"{cell(r.get('peak_mib'))} | {cell(r.get('detail'))} |")
    failed = [r for r in results if r["result"] == "FAIL"]
    for r in failed:
        lines += ["", f"## {r['check']}: last lines", "", "```", *r.get("tail", []), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run only the checks whose name contains this substring")
    p.add_argument("--list", action="store_true", help="print the checks and their commands; run nothing")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="results and work files")
    p.add_argument("--timeout-total", type=float, default=480, help="global deadline, seconds")
    p.add_argument("--timeout-check", type=float, default=90, help="deadline of one check, seconds")
    p.add_argument("--gpus", type=int, default=None,
                   help=f"ranks of the multi-GPU checks (default: the visible GPUs, at most {MAX_GPUS}; 2 for "
                        "--list without GPUs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    if args.list:
        n = args.gpus or min(gpu_count(), MAX_GPUS) or 2
        for check in plan(n, out):
            if not args.only or args.only in check.name:
                print(f"{check.name}\n{describe(check)}")
        return 0
    started = time.monotonic()
    why = no_gpu_reason()
    if why:
        print(f"gpu-check: no CUDA GPU here ({why}): nothing to check")
        return EXIT_NO_GPU
    n = args.gpus or min(gpu_count(), MAX_GPUS)
    header = {**machine(), "n": n, "envs": {}}
    checks = [c for c in plan(n, out) if not args.only or args.only in c.name]
    for folder in dict.fromkeys(c.folder for c in checks):
        header["envs"][folder] = probe(folder)
        info = header["envs"][folder]
        if "missing" not in info and folder != "jax" and not info.get("cuda_available"):
            info["missing"] = f"torch.cuda.is_available() is False in {python_of(folder)}"
    results, passed = [], set()
    for check in checks:
        left = args.timeout_total - (time.monotonic() - started)
        missing = header["envs"][check.folder].get("missing") or check.skip
        if missing:
            result = dict(check=check.name, result="SKIP", detail=missing)
        elif left < 10:
            result = dict(check=check.name, result="SKIP", detail=f"--timeout-total {args.timeout_total:.0f} s reached")
        else:
            result = run_check(check, min(args.timeout_check, left), passed)
        if result["result"] == "PASS":
            passed.add(check.name)
        results.append(result)
        print(f"gpu-check: {result['check']}: {result['result']} {result.get('wall_s', '')} "
              f"{result.get('detail', '')}", flush=True)
    report = format_markdown(header, results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "GPU_RESULTS.md").write_text(report)
    (out / "gpu_results.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    print(report, end="")
    print(f"gpu-check: results in {out}/GPU_RESULTS.md and gpu_results.json")
    return EXIT_FAILED if any(r["result"] == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
