"""Benchmark every framework folder's recipe against the raw loop (raw PyTorch DDP, or raw JAX) on the same model.

    make bench                                          # = tools/envs.sh ... && this script --publish
    .venvs/benchmarks/bin/python benchmarks/run.py --out runs/bench [--world-sizes 1,2] [--repeats 5]

For each entry of RECIPES (plus its baseline: the raw DDP loop, benchmarks/raw_ddp.py, or the raw loop on a folder's
own model or framework, raw_ddp_monai.py, raw_ddp_fno.py, raw_jax.py) and each world size, the recipe is
launched the way users launch it (`python -m torch.distributed.run ... SCRIPT --timings-file F ...` with that
folder's .venvs/<env> interpreter); rank 0 writes the wall-clock time after every optimizer step. From that:

  step time         median interval between consecutive optimizer steps, the first --warmup steps excluded;
                    a run's value is that median, the reported value the median over --repeats runs
  samples/s         world size x per-rank batch / step time (the whole job)
  scaling eff.      thr(W) / (W x thr(1)) = step time(1) / step time(W): the per-rank batch is fixed
  overhead          recipe step time / its baseline's step time at the same world size, paired within a repeat
                    (launched back to back), median over repeats
  time to 1st step  the runner's clock just before it starts the launcher -> rank 0's first optimizer step
                    (interpreter start, imports, rendezvous, data, model and the first step itself)

Every repeat launches everything once, in an order rotated per repeat, so a change of machine load hits every
entry alike. On CPU every rank gets one thread (OMP_NUM_THREADS=1): W ranks use W cores. On GPUs (nccl) each
rank gets one GPU; on Slurm (--launcher srun, see bench.sbatch) world sizes above --gpus-per-node span nodes.

Outputs in --out: results.json (every run and the summary), results.md (the table), results.png (the chart);
with --publish the table also goes to benchmarks/RESULTS.md. A framework folder plugs in with one line in
RECIPES.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Recipe:
    name: str  # label in the table
    env: str  # interpreter: .venvs/<env>/bin/python (tools/envs.sh <env> builds it)
    script: str  # relative to the repository root; takes the common command line and --timings-file
    pythonpath: str = ""  # relative to the root, for a script that imports from another folder
    args: tuple = ()  # extra command-line arguments
    # torchrun: `python -m torch.distributed.run ... SCRIPT`; spawn: the script starts its own processes
    # (`SCRIPT --nprocs W`, jax/multigpu.py: JAX has no torchrun)
    launcher: str = "torchrun"
    batch_size: int | None = None  # per-rank batch for this entry (None: --batch-size), e.g. 3-D volumes
    # the entry its overhead is measured against: the raw loop on the same model in the same framework
    baseline: str = "raw DDP"


BASELINE = Recipe("raw DDP", "pytorch", "benchmarks/raw_ddp.py", pythonpath="pytorch")
# The same loop without DDP: W processes that never communicate. Its "scaling efficiency" is the most any
# recipe can reach on this machine (shared cores, memory bandwidth and caches), so a miss can be told apart from
# a machine that cannot scale.
CEILING = Recipe("no-comm ceiling", "pytorch", "benchmarks/raw_ddp.py", pythonpath="pytorch", args=("--no-ddp",))
# monai/ trains a 3-D UNet, not the shared ConvNet: its overhead is measured against a raw DDP loop on that UNet
# (same data pipeline, imported from monai/recipe.py), with 16^3 crops of 20^3 synthetic volumes, 2 per rank.
UNET_ARGS = ("--roi-size", "16")
RAW_UNET = Recipe("raw DDP (UNet)", "monai", "benchmarks/raw_ddp_monai.py", pythonpath="monai", args=UNET_ARGS,
                  batch_size=2, baseline="raw DDP (UNet)")
# modulus/ trains PhysicsNeMo's FNO on Darcy flow: measured against a raw DDP loop on the same FNO and data.
RAW_FNO = Recipe("raw DDP (FNO)", "modulus", "benchmarks/raw_ddp_fno.py", pythonpath="modulus",
                 baseline="raw DDP (FNO)")
# jax/ is another framework on its own model code (the same ConvNet, written in JAX): measured against the smallest
# data-parallel loop in plain JAX on that model and data (imported from jax/recipe.py), started the same way.
RAW_JAX = Recipe("raw JAX", "jax", "benchmarks/raw_jax.py", pythonpath="jax", launcher="spawn", baseline="raw JAX")
# One line per framework folder: its multi-process recipe started by torchrun.
RECIPES = [
    Recipe("pytorch", "pytorch", "pytorch/multigpu_torchrun.py"),
    Recipe("lightning", "lightning", "lightning/multigpu_torchrun.py"),
    Recipe("jax", "jax", "jax/multigpu.py", launcher="spawn", baseline=RAW_JAX.name),
    Recipe("monai", "monai", "monai/multigpu_torchrun.py", args=UNET_ARGS, batch_size=2, baseline=RAW_UNET.name),
    # DeepSpeed: the same model, data and SGD stepped through its engine, at ZeRO stages 0, 1 and 2.
    *(Recipe(f"deepspeed zero{stage}", "deepspeed", "deepspeed/multigpu_torchrun.py",
             args=("--ds-config", str(ROOT / "deepspeed" / "configs" / f"zero{stage}.json"))) for stage in (0, 1, 2)),
    # PhysicsNeMo's FNO on Darcy flow, measured against a raw DDP loop on the same FNO and data.
    Recipe("modulus", "modulus", "modulus/multigpu_torchrun.py", baseline=RAW_FNO.name),
    # NeMo: the shared ConvNet as a ModelPT, Hydra config + exp_manager, against the raw DDP loop on that model.
    Recipe("nemo", "nemo", "nemo/multigpu_torchrun.py"),
    # Ray Train: multigpu.py starts its own one-node Ray cluster and N TorchTrainer workers (Ray has no torchrun);
    # the same model and data as raw DDP, so its overhead is measured against it.
    Recipe("ray", "ray", "ray/multigpu.py", launcher="spawn"),
]
BASELINES = {b.name: b for b in (BASELINE, RAW_UNET, RAW_FNO, RAW_JAX)}
OWN_BASELINE_NOTES = {RAW_UNET.name: "monai/'s 3-D UNet and data pipeline, DiceCELoss, Adam",
                      RAW_FNO.name: "PhysicsNeMo's FNO on 32x32 Darcy fields, Adam",
                      RAW_JAX.name: "jax/'s ConvNet and synthetic data in plain JAX, one device per process"}
TARGET_SCALING = 0.90  # at every world size > 1
TARGET_OVERHEAD = 1.10  # recipe step time / its raw loop's step time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="output directory")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated; must include 1 (the scaling reference)")
    p.add_argument("--repeats", type=int, default=5, help="launches of every entry at every world size")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per launch, warm-up included")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the step time")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--recipes", default=",".join(r.name for r in RECIPES),
                   help=f"comma-separated subset of {', '.join(r.name for r in RECIPES)}")
    p.add_argument("--no-ceiling", action="store_true", help="leave out the no-communication ceiling entry")
    p.add_argument("--launcher", choices=["local", "srun"], default="local",
                   help="local: torchrun --standalone on this machine; srun: one torchrun per node in a Slurm "
                        "job, c10d rendezvous at MASTER_ADDR:MASTER_PORT (bench.sbatch sets both)")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="ranks per node with --launcher srun (world sizes above it span nodes)")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="passed to every entry; auto: nccl where the baseline's torch has CUDA, else gloo")
    p.add_argument("--launch-timeout", type=float, default=600, help="seconds before a launch counts as hung")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before every launch, wait up to this long for other processes to use under --quiet-cores "
                        "(CPU only)")
    p.add_argument("--quiet-cores", type=float, default=0.25, help="CPU cores others may use on a quiet machine")
    p.add_argument("--redo-disturbed", type=int, default=0, metavar="N",
                   help="launch again (up to N times) when others used more than --quiet-cores during a launch")
    p.add_argument("--publish", action="store_true",
                   help="also write the table to benchmarks/RESULTS.md and the chart to benchmarks/results.png")
    args = p.parse_args(argv)
    args.world_sizes = sorted({int(w) for w in args.world_sizes.split(",")})
    if args.world_sizes[0] != 1:
        p.error("--world-sizes must include 1: scaling efficiency is relative to one rank")
    known = {r.name: r for r in RECIPES}
    unknown = [n for n in args.recipes.split(",") if n not in known]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; known: {list(known)}")
    args.recipes = [known[n] for n in args.recipes.split(",")]
    if args.steps < args.warmup + 3:
        p.error("--steps must exceed --warmup by at least 3 (step times need intervals after the warm-up)")
    if args.launcher == "srun" and args.gpus_per_node < 1:
        p.error("--launcher srun needs --gpus-per-node")
    return args


# ------------------------------------------------------------------------------------------------- machine


def python_of(env: str) -> Path:
    python = ROOT / ".venvs" / env / "bin" / "python"
    if not python.exists():
        sys.exit(f"error: {python} missing: run `tools/envs.sh {env}` (make bench does)")
    return python


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(env: str, devices: bool) -> dict:
    """Package versions (and, with devices, torch's view of the GPUs) as that environment's interpreter sees them.

    Only the metadata unless devices: importing torch costs seconds on a small machine.
    """
    code = ("import importlib.metadata as m, json\n"
            "v = {}\n"
            "for p in ('torch', 'lightning', 'jax', 'monai', 'deepspeed'):\n"
            "    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "if DEVICES:\n"
            "    import torch\n"
            "    v.update(cuda=torch.cuda.is_available(),\n"
            "             gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])\n"
            "print(json.dumps(v))\n").replace("DEVICES", str(devices))
    out = subprocess.run([str(python_of(env)), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: cannot query {python_of(env)}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used since boot (None where /proc/stat is missing)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: launchers and their ranks
    return r.ru_utime + r.ru_stime


class OtherLoad:
    """Cores used by processes other than this runner and its launches, on average since start()."""

    def start(self):
        self.busy, self.kids, self.t = cpu_busy_seconds(), children_cpu_seconds(), time.time()
        return self

    def cores(self) -> float | None:
        if self.busy is None:
            return None
        busy, kids, t = cpu_busy_seconds(), children_cpu_seconds(), time.time()
        return max(0.0, ((busy - self.busy) - (kids - self.kids)) / max(t - self.t, 1e-6))


def wait_until_quiet(limit_s: float, max_cores: float, window_s: float = 3) -> float | None:
    """Sample other processes' CPU use in window_s windows until it is below max_cores or limit_s has passed."""
    deadline, waited = time.time() + limit_s, False
    while True:
        probe = OtherLoad().start()
        time.sleep(window_s)
        used = probe.cores()
        if used is None or used <= max_cores or time.time() >= deadline:
            return used
        if not waited:
            print(f"[bench] waiting for a quiet machine: others use {used:.2f} cores", file=sys.stderr, flush=True)
            waited = True


# ------------------------------------------------------------------------------------------------- launches


def child_env(args, recipe: Recipe) -> dict:
    """This environment minus launcher variables, one thread per rank, unbuffered output."""
    drop = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "PYTHONPATH"}
    if args.launcher == "local":
        drop |= {"MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("TORCHELASTIC_", "PMI_", "OMPI_"))
           and not (args.launcher == "local" and k.startswith("SLURM_"))}
    env.update(OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    if recipe.pythonpath:
        env["PYTHONPATH"] = str(ROOT / recipe.pythonpath)
    return env


def launch_command(args, recipe: Recipe, world_size: int, launch_id: int, timings: Path, ckpt: Path) -> list[str]:
    python = str(python_of(recipe.env))
    if recipe.launcher == "spawn":
        if args.launcher == "srun" and world_size > args.gpus_per_node:
            sys.exit(f"error: {recipe.name} starts its processes on one node: world size {world_size} > "
                     f"--gpus-per-node {args.gpus_per_node}")
        launcher = [python] if args.launcher == "local" else ["srun", "--nodes=1", "--ntasks=1", python]
        return [*launcher, str(ROOT / recipe.script), "--nprocs", str(world_size), *recipe.args,
                *common_args(args, recipe, world_size, timings, ckpt)]
    if args.launcher == "local":
        launcher = [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world_size}"]
    else:
        per_node = min(world_size, args.gpus_per_node)
        if world_size % per_node:
            sys.exit(f"error: world size {world_size} is not a multiple of --gpus-per-node {per_node}")
        nodes = world_size // per_node
        # A fresh port per launch: a rendezvous port of the previous launch may still be in TIME_WAIT.
        port = int(os.environ["MASTER_PORT"]) + launch_id % 1000
        launcher = ["srun", "--kill-on-bad-exit=1", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
                    python, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--nproc-per-node={per_node}",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={os.environ['MASTER_ADDR']}:{port}",
                    f"--rdzv-id={os.environ.get('SLURM_JOB_ID', 'bench')}-{launch_id}"]
    return [*launcher, str(ROOT / recipe.script), *recipe.args, *common_args(args, recipe, world_size, timings, ckpt)]


def common_args(args, recipe: Recipe, world_size: int, timings: Path, ckpt: Path) -> list[str]:
    # One epoch that is exactly --steps long: no epoch boundary (metrics, checkpoints) among the timed steps.
    batch = recipe.batch_size or args.batch_size
    # The backend measured, asked for explicitly: on a CPU machine inside a GPU job (the local Slurm cluster's
    # fake GPUs) the recipes would otherwise refuse to train on the CPU (CONTRACT C12).
    return ["--backend", args.backend, "--epochs", "1", "--max-steps", str(args.steps), "--batch-size", str(batch),
            "--dataset-size", str(args.steps * world_size * batch), "--log-every", "1000000",
            "--timings-file", str(timings), "--checkpoint-dir", str(ckpt)]


def launch(args, recipe: Recipe, world_size: int, repeat: int, launch_id: int, scratch: Path) -> dict:
    """One launch; returns its record (step times, time to first step), or exits with its output on failure."""
    work = Path(tempfile.mkdtemp(prefix=f"{recipe.env}-w{world_size}-", dir=scratch))
    timings = work / "timings.json"
    cmd = launch_command(args, recipe, world_size, launch_id, timings, work / "checkpoints")
    others = OtherLoad().start()
    launch_time = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=child_env(args, recipe), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=args.launch_timeout)
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher and every rank
        raise
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        sys.exit(f"error: {recipe.name} with {world_size} rank(s) did not finish within {args.launch_timeout} s:\n"
                 f"{' '.join(cmd)}\n{output[-4000:]}")
    wall = time.time() - launch_time
    # Under srun the ranks are slurmstepd's children, not this runner's: no way to tell them from other work.
    other_cores = others.cores() if args.launcher == "local" else None
    data = json.loads(timings.read_text()) if timings.exists() else None
    if data is None or len(data["step_end_times"]) != args.steps:
        sys.exit(f"error: {recipe.name} with {world_size} rank(s) failed (exit {proc.returncode}, "
                 f"{'no timings file' if data is None else 'too few steps'}):\n{' '.join(cmd)}\n{output[-4000:]}")
    if proc.returncode != 0:
        # Training finished and rank 0 wrote its timings, then a process died on the way out (seen: gloo
        # teardown, "terminate called without an active exception"). The numbers stand; the failure is reported.
        print(f"warning: {recipe.name} with {world_size} rank(s) exited with {proc.returncode} after its last step:"
              f"\n{output[-1500:]}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints of a benchmark run are of no use
    ends, batch = data["step_end_times"], recipe.batch_size or args.batch_size
    if data["world_size"] != world_size or data["batch_size"] != batch or len(ends) != args.steps:
        sys.exit(f"error: {recipe.name} wrote {data['world_size']} ranks x batch {data['batch_size']}, "
                 f"{len(ends)} steps; asked for {world_size} x {batch}, {args.steps}")
    intervals = [b - a for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:])]
    step = statistics.median(intervals)
    return {"recipe": recipe.name, "world_size": world_size, "repeat": repeat, "launch_time": launch_time,
            "wall_s": wall, "time_to_first_step_s": ends[0] - launch_time, "step_time_s": step,
            "step_time_mean_s": statistics.fmean(intervals), "samples_per_s": world_size * batch / step,
            "timed_steps": len(intervals), "other_cores": other_cores, "exit_code": proc.returncode}


# ------------------------------------------------------------------------------------------------- summary


def median_of(values):
    return statistics.median(values) if values else None


def summarize(runs: list[dict], names: list[str], world_sizes: list[int],
              baseline_of: dict[str, str] | None = None) -> list[dict]:
    """baseline_of: entry name -> the name of the raw loop on its model (default: BASELINE)."""
    baseline_of = baseline_of or {}
    by = {(r["recipe"], r["world_size"], r["repeat"]): r for r in runs}
    repeats = sorted({r["repeat"] for r in runs})
    rows = []
    for name in names:
        for w in world_sizes:
            mine = [by[name, w, k] for k in repeats]
            row = {"recipe": name, "world_size": w,
                   "step_time_s": median_of([r["step_time_s"] for r in mine]),
                   "samples_per_s": median_of([r["samples_per_s"] for r in mine]),
                   "time_to_first_step_s": median_of([r["time_to_first_step_s"] for r in mine]),
                   "scaling_efficiency": None, "overhead": None}
            if w > 1:  # paired within each repeat: step(1) / step(W) = thr(W) / (W thr(1))
                row["scaling_efficiency"] = median_of([by[name, 1, k]["step_time_s"] / by[name, w, k]["step_time_s"]
                                                       for k in repeats])
            base = row["baseline"] = baseline_of.get(name, BASELINE.name)
            row["overhead"] = median_of([by[name, w, k]["step_time_s"] / by[base, w, k]["step_time_s"]
                                         for k in repeats])
            rows.append(row)
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    lines = []
    for row in rows:
        if row["recipe"] in (*BASELINES, CEILING.name):
            continue
        who = f"{row['recipe']} at {row['world_size']} rank(s)"
        if row["scaling_efficiency"] is not None:
            ok = row["scaling_efficiency"] >= TARGET_SCALING
            lines.append(f"{who}: scaling efficiency {row['scaling_efficiency']:.2f} "
                         f"{'meets' if ok else 'MISSES'} the target >= {TARGET_SCALING:.2f}")
        ok = row["overhead"] <= TARGET_OVERHEAD
        lines.append(f"{who}: overhead {row['overhead']:.2f}x {row.get('baseline', BASELINE.name)} "
                     f"{'meets' if ok else 'MISSES'} the target <= {TARGET_OVERHEAD:.2f}x")
    return lines


def fmt(value, spec, empty="—"):
    return empty if value is None else format(value, spec)


def markdown(result: dict) -> str:
    m, c = result["machine"], result["config"]
    lines = [
        "| recipe | ranks | step time (ms) | samples/s | scaling efficiency | overhead vs raw loop "
        "| time to first step (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["summary"]:
        lines.append(f"| {row['recipe']} | {row['world_size']} | {row['step_time_s'] * 1000:.1f} "
                     f"| {row['samples_per_s']:.0f} | {fmt(row['scaling_efficiency'], '.2f')} "
                     f"| {row['overhead']:.2f}x "
                     f"| {row['time_to_first_step_s']:.1f} |")
    device = ", ".join(m["gpus"]) if m["gpus"] else f"CPU, {c['threads']} thread(s) per rank (OMP_NUM_THREADS)"
    others, worst = m.get("other_load_cores"), m.get("other_load_cores_max_launch")
    own = [n for n in dict.fromkeys(r["recipe"] for r in result["summary"]) if n in BASELINES and n != BASELINE.name]
    lines += [
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores; {device}; torch {m['torch']}"
        + (f", lightning {m['lightning']}" if m.get("lightning") else "")
        + (f", jax {m['jax']}" if m.get("jax") else "") + f"; Python {m['python']}; "
        f"{m['os']}. Measured {m['date']}.",
        f"Load: `uptime` load average (1 min) {m['load_before'][0]:.2f} at the start, {m['load_after'][0]:.2f} at "
        "the end"
        + (f"; other processes used {others:.2f} of {m['cores']} cores on average during it "
           f"({worst:.2f} during the busiest launch)" if others is not None else "") + ".",
        f"Config: per-rank batch {c['batch_size']}, {c['steps']} steps per launch of which the first {c['warmup']} "
        f"are warm-up, medians over {c['repeats']} repeats; {c['backend']}; launcher {c['launcher']}; "
        "ConvNet (width 16) on 1x28x28 synthetic data, SGD with momentum"
        + ("; monai and raw DDP (UNet): a 3-D UNet (8/16/32) on 16^3 crops, batch 2 per rank, Adam, overhead "
           "against the raw DDP loop on the same UNet" if any(r["recipe"] == RAW_UNET.name for r in result["summary"])
           else "") + ".",
        *([f"Launches during which other processes used more than {c['quiet_cores']} cores were redone (up to "
            f"{c['redo_disturbed']} times): {sum(r['attempts'] - 1 for r in result['runs'])} redone."]
          if c["redo_disturbed"] else []),
        *(["Exited non-zero after their last step (timings kept): "
            + ", ".join(f"{r['recipe']} at {r['world_size']} rank(s), repeat {r['repeat'] + 1}: exit {r['exit_code']}"
                        for r in result["runs"] if r.get("exit_code")) + "."]
          if any(r.get("exit_code") for r in result["runs"]) else []),
        *([f"{CEILING.name}: the raw loop without DDP, W processes that never communicate; its scaling efficiency "
            "is the most this machine allows (shared cores, memory bandwidth, caches)."]
          if any(r["recipe"] == CEILING.name for r in result["summary"]) else []),
        *(["Raw loops on a folder's own model or framework, that folder's overhead relative to its own: "
            + "; ".join(f"{n}, {OWN_BASELINE_NOTES[n]}" for n in own) + "."] if own else []),
        f"Targets: scaling efficiency >= {TARGET_SCALING:.2f}, overhead <= {TARGET_OVERHEAD:.2f}x its raw loop.",
        "",
        *[f"- {v}" for v in result["verdicts"]],
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    names = list(dict.fromkeys(r["recipe"] for r in rows))
    sizes = sorted({r["world_size"] for r in rows})
    get = {(r["recipe"], r["world_size"]): r for r in rows}
    width = 0.8 / len(sizes)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("samples_per_s", "samples/s (whole job)", None),
              ("overhead", "step time / its raw loop's step time", TARGET_OVERHEAD),
              ("time_to_first_step_s", "time to first step (s)", None)]
    for ax, (key, label, target) in zip(axes, panels):
        for i, w in enumerate(sizes):
            xs = [j + (i - (len(sizes) - 1) / 2) * width for j in range(len(names))]
            vals = [get[n, w][key] for n in names]
            bars = ax.bar(xs, vals, width, label=f"{w} rank{'s' if w > 1 else ''}")
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.3 * max(vals)))  # room for the labels and the legend
            if key == "samples_per_s" and w > 1:
                ax.bar_label(bars, [f"eff {get[n, w]['scaling_efficiency']:.2f}" for n in names], fontsize=8)
            else:
                ax.bar_label(bars, [f"{v:.2f}" if v < 100 else f"{v:.0f}" for v in vals], fontsize=8)
        if target:
            ax.axhline(target, color="red", linestyle="--", linewidth=1, label=f"target {target:.2f}")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label)
        ax.legend(fontsize=8, loc="upper left", ncols=len(sizes) + 1)
    m = result["machine"]
    device = ", ".join(m["gpus"]) if m["gpus"] else f"{m['cpu_model']} ({m['cores']} cores), 1 thread/rank"
    fig.suptitle(f"Per-rank batch {result['config']['batch_size']}; {device}; torch {m['torch']}; {m['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main


def stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # launch() then kills the running launch's process group


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, stop)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    own_baselines = [BASELINES[n] for n in dict.fromkeys(r.baseline for r in args.recipes) if n != BASELINE.name]
    entries = [BASELINE, *own_baselines, *([] if args.no_ceiling else [CEILING]), *args.recipes]
    for env in dict.fromkeys(e.env for e in entries):
        python_of(env)
    info = versions(BASELINE.env, devices=True)  # the baseline's torch decides: CUDA -> nccl, else gloo
    for env in dict.fromkeys(e.env for e in args.recipes):
        info.update({k: v for k, v in versions(env, devices=False).items() if k not in info})
    if args.backend == "auto":
        args.backend = "nccl" if info["cuda"] else "gloo"
    backend = args.backend
    if args.launcher == "local" and info["cuda"] and max(args.world_sizes) > len(info["gpus"]):
        sys.exit(f"error: {len(info['gpus'])} GPU(s) here, world sizes {args.world_sizes} asked for")
    quiet = wait_until_quiet(args.wait_quiet, args.quiet_cores) if args.wait_quiet and not info["cuda"] else None
    load_before = os.getloadavg()
    if not info["cuda"] and (quiet if quiet is not None else load_before[0]) > args.quiet_cores:
        print(f"warning: other processes use {quiet if quiet is not None else load_before[0]:.2f} cores: they skew "
              "CPU numbers; for final numbers run when the machine is quiet (--wait-quiet)", file=sys.stderr,
              flush=True)

    scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=out))
    runs, launch_id = [], 0
    whole, t0 = OtherLoad().start(), time.time()
    for repeat in range(args.repeats):
        for w in args.world_sizes:
            shift = (repeat + w) % len(entries)  # rotate the order: no entry always runs first or last
            for recipe in entries[shift:] + entries[:shift]:
                for attempt in range(args.redo_disturbed + 1):
                    if args.wait_quiet and not info["cuda"]:
                        wait_until_quiet(args.wait_quiet, args.quiet_cores)
                    launch_id += 1
                    record = launch(args, recipe, w, repeat, launch_id, scratch)
                    if record["other_cores"] is None or record["other_cores"] <= args.quiet_cores:
                        break
                    if attempt < args.redo_disturbed:
                        print(f"[bench] {recipe.name} with {w} rank(s) disturbed (others used "
                              f"{record['other_cores']:.2f} cores): again", file=sys.stderr, flush=True)
                record["attempts"] = attempt + 1
                runs.append(record)
                print(f"[bench] repeat {repeat + 1}/{args.repeats} | {recipe.name:>10} | {w} rank(s) | step "
                      f"{record['step_time_s'] * 1000:7.1f} ms | {record['samples_per_s']:7.0f} samples/s | "
                      f"first step after {record['time_to_first_step_s']:5.1f} s"
                      + ("" if record["other_cores"] is None else f" | others {record['other_cores']:.2f} cores"),
                      flush=True)
    elapsed, other = time.time() - t0, whole.cores() if args.launcher == "local" else None
    shutil.rmtree(scratch, ignore_errors=True)
    per_launch = [r["other_cores"] for r in runs if r["other_cores"] is not None]

    machine = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "torch": info["torch"],
               "lightning": info.get("lightning"), "jax": info.get("jax"), "gpus": info["gpus"],
               "python": platform.python_version(),
               "os": f"{platform.system()} {platform.release()}",
               "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               "load_before": list(load_before), "load_after": list(os.getloadavg()),
               "other_load_cores": other, "other_load_cores_max_launch": max(per_launch, default=None),
               "other_load_cores_before": quiet, "bench_seconds": elapsed}
    config = {k: v for k, v in vars(args).items() if k not in {"recipes", "out", "publish"}}
    config.update(recipes=[asdict(r) for r in entries], backend=backend)
    summary = summarize(runs, [e.name for e in entries], args.world_sizes, {e.name: e.baseline for e in entries})
    result = {"machine": machine, "config": config, "summary": summary, "verdicts": verdicts(summary), "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (out / "results.md").write_text(table)
    plot(result, out / "results.png")
    published = publish(table, out / "results.png", args.recipes, date=machine["date"]) if args.publish else None
    print(table)
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}"
          + (f" and {published}" if published else ""))


ALONE = "Rows measured alone since this table: "


def publish(table: str, png: Path, recipes, *, here: Path = HERE, date: str = "") -> Path:
    """--publish. Every recipe measured: RESULTS.md and results.png, the table and chart the READMEs show. A subset
    (`--recipes jax`): RESULTS-<names>.md and results-<names>.png beside them -- a table of a few entries must not
    replace the whole one -- and one line at the end of RESULTS.md that points to it. Returns the table's path."""
    whole = {r.name for r in recipes} == {r.name for r in RECIPES}
    name = "-".join(r.name.replace(" ", "_") for r in recipes)
    path = here / ("RESULTS.md" if whole else f"RESULTS-{name}.md")
    path.write_text(f"# Benchmark results (latest `make bench`{'' if whole else f' of {name} alone'})\n\n"
                    "Written by `benchmarks/run.py --publish`; see benchmarks/README.md for what each column means.\n\n"
                    f"![benchmark chart]({'results.png' if whole else f'results-{name}.png'})\n\n" + table)
    shutil.copyfile(png, here / ("results.png" if whole else f"results-{name}.png"))
    main = here / "RESULTS.md"
    if not whole and main.exists():
        lines = main.read_text().rstrip("\n").split("\n")
        links = [x for x in lines[-1].removeprefix(ALONE).split("; ")
                 if lines[-1].startswith(ALONE) and not x.startswith(f"[{name}](")]
        lines = lines[:-1] if lines[-1].startswith(ALONE) else [*lines, ""]
        main.write_text("\n".join([*lines, ALONE + "; ".join([*links, f"[{name}]({path.name}) ({date})"])]) + "\n")
    return path


if __name__ == "__main__":
    main()
