"""Preflight doctor for a distributed job: run it with the same launcher and directives as your training.

    srun ... python doctor.py                    (one task per GPU: ranks from SLURM_PROCID/LOCALID/NTASKS)
    srun ... torchrun --nproc-per-node=N ... doctor.py      (one torchrun per node)

Every rank prints one line (rank, node, hostname, the CPU cores it may run on, visible devices, versions);
rank 0 prints the NCCL/Gloo environment. A rank bound to fewer cores than SLURM_CPUS_PER_TASK fails (srun
without SRUN_CPUS_PER_TASK on Slurm >= 22.05 runs every task on one core). Then a short all-reduce health
check runs across all ranks under a watchdog. A job given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) that
torch cannot use fails, as the recipes refuse it (CONTRACT.md C12); --backend gloo checks the CPU path on purpose.
Exit code 0 means "this launch configuration works"; otherwise
a line starting with "[doctor] FAIL" says what is wrong.
With --report-dir each rank also writes doctor-rank<R>.json there.
"""

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import threading
import time

EXIT_FAIL = 3


def log(msg: str) -> None:
    print(f"[doctor] {msg}", flush=True)


def fail(msg: str) -> None:
    print(f"[doctor] FAIL: {msg}", flush=True)
    sys.stdout.flush()
    os._exit(EXIT_FAIL)  # noqa: SLF001 - also from the watchdog thread, without waiting for hung collectives


def launch_env() -> dict:
    """RANK/LOCAL_RANK/WORLD_SIZE from torchrun, else from Slurm; problems are reported, not guessed."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "environment"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", 1))
    elif "SLURM_PROCID" in env:
        source = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_NTASKS", 1))
        local_rank = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    else:
        source, rank, world, local_rank, local_world = "single process", 0, 1, 0, 1
    return dict(source=source, rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def cpu_list(cores) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (the notation of taskset and Cpus_allowed_list)."""
    ranges, cores = [], sorted(cores)
    for core in cores:
        if ranges and core == ranges[-1][1] + 1:
            ranges[-1][1] = core
        else:
            ranges.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in ranges)


def checks(info: dict) -> list[str]:
    """Configuration mistakes that make a job hang, crash or crawl later, found before any collective runs."""
    problems = []
    env = os.environ
    cores = os.sched_getaffinity(0)
    wanted = int(env.get("SLURM_CPUS_PER_TASK", 0))
    if len(cores) < wanted:
        problems.append(f"bound to {len(cores)} CPU core(s) ({cpu_list(cores)}) but SLURM_CPUS_PER_TASK={wanted}: "
                        "srun does not pass --cpus-per-task on (Slurm >= 22.05); put "
                        "`export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK` before srun")
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
    if info["world_size"] > 1:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(var):
                problems.append(f"{var} is not set (set it in the job script from `scontrol show hostnames`)")
        if nnodes > 1 and env.get("MASTER_ADDR", "") in {"localhost", "127.0.0.1", "::1"}:
            problems.append(f"MASTER_ADDR={env['MASTER_ADDR']} with {nnodes} nodes: other nodes cannot reach it "
                            "(use the first hostname of $SLURM_JOB_NODELIST)")
    if info["source"] == "torchrun" and "SLURM_STEP_ID" in env:
        step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
        step_nodes = int(env.get("SLURM_STEP_NUM_NODES", nnodes))
        if step_tasks > step_nodes:
            problems.append(f"double launch: torchrun runs inside {step_tasks} srun tasks on {step_nodes} node(s); "
                            "use --ntasks-per-node=1 with torchrun (it starts one process per GPU itself)")
    if info["source"] == "slurm" and info["world_size"] != int(env.get("SLURM_NTASKS", info["world_size"])):
        problems.append("WORLD_SIZE disagrees with SLURM_NTASKS")
    return problems


def shared_gpu(local_rank: int, visible: int) -> bool:
    """Would this rank share a GPU with another? The recipes take GPU local_rank % visible: with one GPU visible
    per task (--gpus-per-task, --gpu-bind) every task has its own cuda:0; with all of a node's GPUs visible a
    local rank beyond their count lands on a GPU a lower rank already has."""
    return visible > 1 and local_rank >= visible


def gpus_unusable(backend_choice: str, cuda: bool, env=os.environ) -> str:
    """The recipes' no-silent-CPU rule (CONTRACT.md C12, toolkit.gpus_given): a problem when this process was given
    GPUs, --backend was left to auto, and torch cannot use a GPU ('' otherwise)."""
    count = env.get("SLURM_GPUS_ON_NODE", "").strip()
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    given = (f"SLURM_GPUS_ON_NODE={count}" if count.isdigit() and int(count) > 0
             else f"CUDA_VISIBLE_DEVICES={visible}" if visible not in ("", "-1", "NoDevFiles") else "")
    if backend_choice != "auto" or cuda or not given:
        return ""
    import torch
    why = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no usable GPU"
    return (f"{given} but torch {torch.__version__} cannot use a GPU ({why}): the recipes refuse to train on the "
            "CPU here; fix the driver/module/wheel (or pass --backend gloo to check the CPU path on purpose)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for init + all-reduce (watchdog)")
    parser.add_argument("--report-dir", help="write doctor-rank<R>.json here")
    args = parser.parse_args()

    t0 = time.monotonic()
    info = launch_env()
    rank = info["rank"]
    # The watchdog turns a hang (unreachable MASTER_ADDR, wrong WORLD_SIZE, missing srun) into a message.
    watchdog = threading.Timer(args.timeout, fail, [
        f"rank {rank}: no all-reduce after {args.timeout:.0f} s. Likely: fewer processes started than "
        f"WORLD_SIZE={info['world_size']} (srun missing? #SBATCH counts != launcher counts?), MASTER_ADDR/PORT "
        "unreachable from this node, or a firewall/wrong NCCL_SOCKET_IFNAME"])
    watchdog.daemon = True
    watchdog.start()

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    ndev = torch.cuda.device_count() if cuda else 0
    backend = args.backend if args.backend != "auto" else ("nccl" if cuda else "gloo")
    host = socket.gethostname()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a"
    cores = os.sched_getaffinity(0)
    log(f"rank {rank}/{info['world_size']} local_rank {info['local_rank']} node {os.environ.get('SLURM_NODEID', '?')} "
        f"host {host} | cores {cpu_list(cores)} ({len(cores)}) | launcher {info['source']} | "
        f"CUDA_VISIBLE_DEVICES={visible} cuda_devices={ndev} | "
        f"python {platform.python_version()} torch {torch.__version__} nccl {nccl} | backend {backend}")
    if rank == 0:
        keys = sorted(k for k in os.environ if k.startswith(("NCCL_", "GLOO_", "TORCH_NCCL", "TORCH_DIST"))
                      or k in {"MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"})
        log("env: " + (" ".join(f"{k}={os.environ[k]}" for k in keys) or "(no NCCL_/GLOO_ variables set)"))
        log(f"slurm: job {os.environ.get('SLURM_JOB_ID', '-')} nodes {os.environ.get('SLURM_JOB_NODELIST', '-')} "
            f"tasks {os.environ.get('SLURM_NTASKS', '-')} gpus/node {os.environ.get('SLURM_GPUS_ON_NODE', '-')}")

    problems = checks(info) + [p for p in [gpus_unusable(args.backend, cuda)] if p]
    if backend == "nccl":
        if not cuda:
            problems.append("backend nccl but torch sees no CUDA device")
        elif shared_gpu(info["local_rank"], ndev):
            problems.append(f"local_rank {info['local_rank']} but only {ndev} GPUs visible to every task on {host}: "
                            "more tasks than GPUs, two ranks would share one (NCCL: 'Duplicate GPU detected')")
    if problems:
        fail(f"rank {rank} on {host}: " + "; ".join(problems))

    if info["world_size"] > 1:
        # The recipes' rule: the local rank among the visible GPUs (one task per GPU sees only its own, cuda:0).
        device = torch.device("cuda", info["local_rank"] % ndev) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, rank=rank, world_size=info["world_size"],
                                timeout=datetime.timedelta(seconds=args.timeout),
                                device_id=device if device.type == "cuda" else None)
        x = torch.full((1024,), float(rank + 1), device=device)
        dist.all_reduce(x.clone())  # the first collective sets up the communicator: not part of the time
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.monotonic()
        dist.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.monotonic() - start
        expected = info["world_size"] * (info["world_size"] + 1) / 2
        if not torch.allclose(x.cpu(), torch.full((1024,), expected)):
            fail(f"rank {rank}: all-reduce returned {x[0].item()}, expected {expected}")
        hosts = [None] * info["world_size"]
        dist.all_gather_object(hosts, host)
        dist.barrier()
        dist.destroy_process_group()
    else:
        took, hosts = 0.0, [host]
    watchdog.cancel()

    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        report = dict(info, host=host, hosts=hosts, cpu_affinity=sorted(cores), backend=backend,
                      torch=torch.__version__, cuda_visible_devices=visible, allreduce_seconds=took)
        with open(os.path.join(args.report_dir, f"doctor-rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
    if rank == 0:
        placement = " ".join(f"rank{r}={h}" for r, h in enumerate(hosts))
        log(f"OK: {info['world_size']} ranks on {len(set(hosts))} host(s), all-reduce verified "
            f"({took * 1000:.1f} ms), total {time.monotonic() - t0:.1f} s | {placement}")


if __name__ == "__main__":
    main()
