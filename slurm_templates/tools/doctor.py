"""Preflight doctor for a distributed job: run it with the same launcher and directives as your training.

    srun ... python doctor.py                    (one task per GPU: ranks from SLURM_PROCID/LOCALID/NTASKS)
    srun ... torchrun --nproc-per-node=N ... doctor.py      (one torchrun per node)

Every rank prints one line (rank, node, hostname, the CPU cores it may run on, visible devices, versions);
rank 0 prints the NCCL/Gloo environment. A rank bound to fewer cores than SLURM_CPUS_PER_TASK fails (srun
without SRUN_CPUS_PER_TASK on Slurm 22.05-23.02 runs every task on one core), and so does, in a job of several
nodes, a MASTER_ADDR or a hostname that resolves to a loopback address (127.0.1.1 from a Debian/Ubuntu
/etc/hosts) or not at all, and a GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME that names no interface of this node.
"[doctor] WARN" lines (exit code unchanged) flag a locked-memory limit that InfiniBand cannot work with and a
rank whose cores are all on another NUMA node than its GPU. On NCCL across nodes the doctor reads which network
NCCL took (its NCCL_DEBUG=INFO lines, unless you set NCCL_DEBUG): TCP sockets on a node with InfiniBand, EFA or
Slingshot fail (NCCL's silent fallback), on a node without them they are a WARN. Then a short all-reduce health
check runs across all ranks under a watchdog. A job given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) that
torch cannot use fails, as the recipes refuse it (CONTRACT.md C12); --backend gloo checks the CPU path on purpose.
Exit code 0 means "this launch configuration works" (WARN lines included); otherwise
a line starting with "[doctor] FAIL" says what is wrong.
With --report-dir each rank also writes doctor-rank<R>.json there.
"""

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import platform
import re
import resource
import socket
import sys
import tempfile
import threading
import time

EXIT_FAIL = 3
SYS = "/sys"  # the tests point this at a fake tree


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


def parse_cpu_list(text: str) -> set[int]:
    """'0-2,5' -> {0, 1, 2, 5}: the notation of /sys/devices/system/node/node<N>/cpulist."""
    cores = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def sysfs(path: str) -> str | None:
    """A file under /sys, stripped; None where it does not exist (a VM, a container, a CPU-only node)."""
    try:
        with open(os.path.join(SYS, path)) as f:
            return f.read().strip()
    except OSError:
        return None


def resolve(name: str) -> list[str]:
    """The addresses `name` resolves to on this node, in the order a connect or a bind tries them ([]: none)."""
    try:
        found = [info[4][0] for info in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(found))


def loopback(addresses: list[str]) -> str:
    """The first loopback address among `addresses` ('' when none is): 127.x or ::1 reach only this node."""
    return next((a for a in addresses if ipaddress.ip_address(a.split("%")[0]).is_loopback), "")


def address_problems(nnodes: int, host: str, env=os.environ) -> list[str]:
    """Names that other nodes cannot use. MASTER_ADDR is where every rank meets; this node's own hostname is
    what gloo binds to and tells the others to connect to, unless GLOO_SOCKET_IFNAME names an interface (the
    recipes' gloo groups exist under NCCL too). With one node, loopback is fine."""
    problems = []
    master = env.get("MASTER_ADDR", "")
    names = [(f"MASTER_ADDR={master}", master, "set MASTER_ADDR to the first of `scontrol show hostnames` (with "
              "its network address in /etc/hosts or DNS) or to that node's IP address")] if master else []
    if nnodes > 1 and not env.get("GLOO_SOCKET_IFNAME") and host != master:
        names.append((f"this node's hostname {host}", host, "give it the node's network address in /etc/hosts or "
                      "DNS, or export GLOO_SOCKET_IFNAME=<the interface between nodes> (gloo binds to the address "
                      "of the hostname otherwise)"))
    for label, name, fix in names:
        addresses = resolve(name)
        if not addresses:
            problems.append(f"{label} does not resolve on {host}: {fix}")
            continue
        lo = loopback(addresses)
        if nnodes > 1 and lo:
            hosts_line = ("" if name == "localhost" or lo == name else f" (an /etc/hosts line `{lo} {name}`? "
                          "Debian and Ubuntu write `127.0.1.1 <own hostname>` there)")
            problems.append(f"{label} with {nnodes} nodes: other nodes cannot reach it: it resolves to {lo} on "
                            f"{host}{hosts_line}; {fix}")
    return problems


def nccl_selects(spec: str, names: list[str]) -> list[str]:
    """The interfaces among `names` that NCCL_SOCKET_IFNAME selects, as NCCL reads it: a comma list of name
    PREFIXES (ib matches ib0, ibp65s0, ibs1), '=' before the list for exact names, '^' before that to exclude."""
    exclude = spec.startswith("^")
    spec = spec[exclude:]
    exact = spec.startswith("=")
    wanted = [w.split(":")[0] for w in spec[exact:].split(",") if w]
    return [n for n in names if any(n == w if exact else n.startswith(w) for w in wanted) != exclude]


def interface_problems(host: str, env=os.environ) -> list[str]:
    """NCCL_SOCKET_IFNAME/GLOO_SOCKET_IFNAME that name no interface here: NCCL fails at its bootstrap ("no
    socket interface found"), gloo at init ("Unable to find address for")."""
    # socket.if_nameindex, not /sys/class/net: that shows the namespace /sys was mounted in, not this process's.
    names = sorted(name for _, name in socket.if_nameindex())
    present = ", ".join(names)
    problems = []
    nccl = env.get("NCCL_SOCKET_IFNAME", "")
    if nccl and not nccl_selects(nccl, names):
        problems.append(f"NCCL_SOCKET_IFNAME={nccl} selects none of the interfaces of {host} ({present}): NCCL "
                        "reads each name as a prefix (ib matches ib0, ibp65s0), '=' first for exact names, '^' "
                        "first to exclude")
    gloo = [n for n in env.get("GLOO_SOCKET_IFNAME", "").split(",") if n]
    missing = [n for n in gloo if n not in names]
    if missing:
        problems.append(f"GLOO_SOCKET_IFNAME={env['GLOO_SOCKET_IFNAME']}: no interface {', '.join(missing)} on "
                        f"{host} ({present}); gloo takes exact names (a comma list), not prefixes")
    return problems


def memlock_warning() -> str:
    """InfiniBand needs pinned memory: under a low `ulimit -l` NCCL's IB transport fails ("ibv_reg_mr failed")."""
    try:
        hcas = sorted(os.listdir(os.path.join(SYS, "class", "infiniband")))
    except OSError:
        return ""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if not hcas or soft == resource.RLIM_INFINITY:
        return ""
    return (f"locked-memory limit {soft // 1024} KiB (ulimit -l) with InfiniBand here ({', '.join(hcas)}): NCCL "
            "can fail with 'ibv_reg_mr failed'. Put `ulimit -l unlimited` before srun (if the hard limit allows), "
            "or ask for slurm.conf PropagateResourceLimitsExcept=MEMLOCK and slurmd's LimitMEMLOCK=infinity")


# Fast fabrics as sysfs lists them: InfiniBand, RoCE and AWS EFA adapters are RDMA devices (class/infiniband),
# HPE Slingshot NICs are class/cxi.
FABRIC_CLASSES = ("infiniband", "cxi")


def fabric_devices() -> list[str]:
    found = []
    for cls in FABRIC_CLASSES:
        try:
            found += sorted(os.listdir(os.path.join(SYS, "class", cls)))
        except OSError:
            pass
    return found


def nccl_network(nccl_log: str) -> str | None:
    """The network NCCL chose between nodes, from its NCCL_DEBUG=INFO lines ('... NCCL INFO Using network IB')."""
    found = re.findall(r"NCCL INFO Using network (.+?)\s*$", nccl_log, re.M)
    return found[-1] if found else None


def transport_problem(network: str | None, nnodes: int, devices: list[str]) -> tuple[str, str]:
    """('FAIL' | 'WARN' | '', why): NCCL on TCP sockets between nodes, silently (its fallback when the fast network
    does not come up), is a job several times slower; where the node has a fast fabric, that is a failure."""
    if nnodes < 2 or network != "Socket":
        return "", ""
    if devices:
        return "FAIL", (f"NCCL uses TCP sockets between nodes although this node has {', '.join(devices)}: the fast "
                        "network did not come up (plugin missing, wrong NCCL_IB_HCA or interface). Uncomment your "
                        "fabric's preset in the template's fabric block: its NCCL_NET makes NCCL fail with the "
                        "reason instead of falling back")
    return "WARN", ("NCCL uses TCP sockets between nodes, and this node shows no InfiniBand, EFA or Slingshot device "
                    "(/sys/class/infiniband, /sys/class/cxi): right on an Ethernet-only cluster, several times "
                    "slower than a fast fabric")


def gpu_pci_address(index: int) -> str | None:
    """GPU `index` as sysfs names it ('0000:dc:00.0'), built as torch.numa.binding does; None if torch lacks it."""
    import torch
    props = torch.cuda.get_device_properties(index)
    try:
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:
        return None


def numa_warning(pci: str | None, cores) -> str:
    """A rank whose cores are all on another NUMA node than its GPU: every copy to the GPU crosses sockets."""
    node = sysfs(f"bus/pci/devices/{pci}/numa_node") if pci else None
    if node is None or int(node) < 0:  # -1: one NUMA node, or the firmware does not say
        return ""
    near = parse_cpu_list(sysfs(f"devices/system/node/node{node}/cpulist") or "")
    if not near or near & set(cores):
        return ""
    return (f"GPU {pci} is on NUMA node {node} (cores {cpu_list(near)}) but this rank runs on cores "
            f"{cpu_list(cores)}, all on another node; bind ranks near their GPU: `torchrun --numa-binding=node`, "
            "or with srun per GPU the GPUs' Cores= in gres.conf (AutoDetect=nvml fills them)")


def checks(info: dict) -> list[str]:
    """Configuration mistakes that make a job hang, crash or crawl later, found before any collective runs."""
    problems = []
    env, host = os.environ, socket.gethostname()
    cores = os.sched_getaffinity(0)
    wanted = int(env.get("SLURM_CPUS_PER_TASK", 0))
    if len(cores) < wanted:
        problems.append(f"bound to {len(cores)} CPU core(s) ({cpu_list(cores)}) but SLURM_CPUS_PER_TASK={wanted}: "
                        "srun does not pass --cpus-per-task on (Slurm 22.05-23.02); put "
                        "`export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK` before srun")
    nnodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", 1)))
    if info["world_size"] > 1:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(var):
                problems.append(f"{var} is not set (set it in the job script from `scontrol show hostnames`)")
        problems += address_problems(nnodes, host, env)
    problems += interface_problems(host, env)
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
    near_gpu = numa_warning(gpu_pci_address(info["local_rank"] % ndev), cores) if backend == "nccl" and ndev else ""
    warnings = [w for w in (memlock_warning(), near_gpu) if w]
    for warning in warnings:
        log(f"WARN: rank {rank} on {host}: {warning}")
    if problems:
        fail(f"rank {rank} on {host}: " + "; ".join(problems))

    # Which network NCCL takes between nodes: its INFO lines, into a file of ours (unless you set NCCL_DEBUG).
    nccl_log = None
    if backend == "nccl" and info["world_size"] > 1 and "NCCL_DEBUG" not in os.environ:
        nccl_log = os.path.join(tempfile.gettempdir(), f"doctor-nccl-{os.environ.get('SLURM_JOB_ID', os.getpid())}"
                                                       f"-rank{rank}.log")
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=nccl_log)

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
    network = None
    if nccl_log:
        with contextlib.suppress(OSError):
            with open(nccl_log, errors="replace") as f:
                network = nccl_network(f.read())
            os.remove(nccl_log)
        level, why = transport_problem(network, len(set(hosts)), fabric_devices())
        if level == "FAIL":
            fail(f"rank {rank} on {host}: {why}")
        if level:
            warnings.append(why)
            log(f"WARN: rank {rank} on {host}: {why}")

    if args.report_dir:
        os.makedirs(args.report_dir, exist_ok=True)
        report = dict(info, host=host, hosts=hosts, cpu_affinity=sorted(cores), backend=backend,
                      torch=torch.__version__, cuda_visible_devices=visible, allreduce_seconds=took,
                      warnings=warnings)
        with open(os.path.join(args.report_dir, f"doctor-rank{rank}.json"), "w") as f:
            json.dump(report, f, indent=1)
    if rank == 0:
        placement = " ".join(f"rank{r}={h}" for r, h in enumerate(hosts))
        between = f" | NCCL between nodes: {network}" if network and len(set(hosts)) > 1 else ""
        log(f"OK: {info['world_size']} ranks on {len(set(hosts))} host(s), all-reduce verified "
            f"({took * 1000:.1f} ms), total {time.monotonic() - t0:.1f} s | {placement}{between}")


if __name__ == "__main__":
    main()
