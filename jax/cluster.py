"""The plumbing of jax/: everything the scripts and recipe.py need that is not the lesson itself.

Importing this module quiets XLA's C++ logs (TF_CPP_MIN_LOG_LEVEL=2; jax reads it once, at its import, which is
why recipe.py imports jax after this module and the scripts import jax inside setup()): stderr keeps the recipe's
own error line.

Map:
    run, explain                 toolkit.run with hard_exit (os._exit: JAX's shutdown barrier must not wait for the
                                 dead); a peer that died (gloo: its connections closed) is one line
    parse_args, nprocs_flag      the command line every recipe takes (C2), no silent CPU (C12); multigpu.py's --nprocs
    gpu_problem                  C12's probe: why JAX cannot use GPUs here ('' when it can), from the installed
                                 packages and device files alone (cuda_plugins, NVIDIA_DEVICES)
    visible_gpus, process_gpu    the GPUs this process may use (CUDA_VISIBLE_DEVICES, else the driver's list);
                                 multigpu.py's one GPU per process and its share of the memory preallocation
    select_platform              --backend in JAX's terms (CUDA demanded, or CPU devices with gloo collectives): only
                                 configuration, since jax.distributed.initialize refuses to run after a device was used
    platform_start               the first device use, where JAX starts CUDA: its failure becomes the C12 line
    rendezvous                   around jax.distributed.initialize: a busy port, an unreachable coordinator or a
                                 missing peer become one line within --timeout (parse_address, check_coordinator)
    launch_plan                  multinode.py: coordinator, process count, process id and GPUs from JAX_* or SLURM_*
                                 (the coordinator's address from JAX's own Slurm detection; local_device_ids,
                                 tasks_per_node: uneven layouts such as '2(x3),1')
    spawn                        multigpu.py's spawner: N processes, signals forwarded, their exit codes combined
                                 (free_port, default_nprocs, verdict)
    reduce_max                   the ranks' agreement on preemption: toolkit.PREEMPTION.agreed(step, reduce_max)
    broadcast, barrier           rank 0's choice to every process; nobody goes on before everybody is there
    local_value                  a replicated array's value, as numpy, from this process's own copy (no communication)
    watch_for_hangs              C13: no step for --timeout -> stacks in <checkpoint-dir>/debug/<job id>/, the ranks
                                 that do not answer named through JAX's coordination service, one line, exit 1
                                 (report_hang, who_stopped_answering); coordination_timeout keeps JAX's own
                                 heartbeat abort later
    replicate                    numpy, the same on every process -> global arrays replicated over the mesh
    Dataset, check_dataset_fits  images and labels in memory; enough of them for every process and one global batch
    check_global_batch           a checkpoint resumes under any number of processes at its global batch; another
                                 global batch is one line
    read_mnist, read_cifar10     the datasets' own files, read in place with numpy (never downloaded)
    ShardedLoader                DistributedSampler's rule in numpy: this process's shard, reshuffled every epoch;
                                 --num-workers threads prepare the next batches
    checkpoint_manager           Orbax's CheckpointManager as recipe.py uses it: a folder per step, a step interval,
                                 the newest 2 kept, saved in the background, atomic by Orbax's own finalize
    restore_newest               the newest step every process can read, each array placed (sharded or replicated) as
                                 the live one is; a damaged step falls back to the one before (restore_checkpoint:
                                 one step; draining_event_loops: Orbax's failed reads end quietly)
    read_checkpoint              the newest step as numpy, whole arrays, in one process (tools, tests)
"""

import argparse
import asyncio
import faulthandler
import functools
import gzip
import importlib.metadata
import importlib.util
import multiprocessing
import os
import pickle
import pkgutil
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np
import toolkit
from toolkit import (
    PREEMPTED_EXIT_CODE,
    OneLineParser,
    RecipeError,
    deadline,
    launcher_rank,
    non_negative_int,
    positive_float,
    positive_int,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any `import jax`: XLA's C++ warnings off stderr


def explain(error):
    """toolkit.run's verdict on an error that is not a RecipeError: a collective that failed because a peer closed its
    connections (gloo: "Connection reset by peer") -- its process died -- is one line and exit 1. None for anything
    else: a bug, with its traceback. A peer that stopped answering raises nothing: the hang watchdog speaks then, and
    a collective broken meanwhile by another rank leaving is part of that hang (the watchdog's line, its exit)."""
    if HANG_REPORTED.is_set():
        threading.Event().wait()  # the watchdog ends this process (os._exit) once its line is out
    text = str(error).strip()
    if not (isinstance(error, RuntimeError) and "gloo" in text.lower() and toolkit.PEER_GONE.search(text)):
        return None
    gist = re.sub(r"^[A-Z_]+: |\[[^\]]*\.cc:\d+\] ", "", text.splitlines()[0])[:200]  # "UNKNOWN: ", "[pair.cc:538] "
    return (f"lost contact with another rank ({gist}): a process or node of the job died; see its log. "
            f"The last snapshot is intact: a requeued or resubmitted run resumes from it"), 1


# JAX's shutdown barrier would wait for peers that are gone: after an error leave with os._exit. (A preemption has
# passed it already: every process is alive then, and recipe.train shuts down before it exits 75.)
run = functools.partial(toolkit.run, explain=explain, hard_exit=True)


# ---------------------------------------------------------------------------------------------------- command line


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="per device (= per process when each process drives one device)")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="holds MNIST/raw/*-ubyte[.gz] or cifar-10-batches-py/ (read in place, never downloaded)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 compute (parameters, gradients and loss stay fp32)")
    p.add_argument("--num-workers", type=non_negative_int, default=0,
                   help="loader threads that prepare the next batches while the device computes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: GPUs (XLA uses NCCL) when there are any, else CPU devices with gloo collectives; "
                        "gloo: CPU devices even where GPUs exist; nccl: GPUs or an error")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or a collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds the dataset's files)")
    # No silent CPU (C12): GPUs given or --backend nccl, and JAX cannot use them -> one line, before JAX starts.
    toolkit.refuse_silent_cpu(args.backend, gpu_problem)
    return args


def nprocs_flag(p):
    p.add_argument("--nprocs", type=positive_int, default=None,
                   help="processes to start (default: the GPUs visible, 2 without)")


# ---------------------------------------------------------------------------------------------------- devices


NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")  # JAX starts CUDA only where one exists (WSL2: dxg)
NVIDIA_GPU_LIST = "/proc/driver/nvidia/gpus"  # the NVIDIA driver: one entry per GPU of the node


def cuda_plugins():
    """The CUDA plugins installed for jaxlib (jax[cuda12] brings xla_cuda12, jax[cuda13] xla_cuda13), found where JAX
    looks for plugins -- the jax_plugins entry points and namespace package -- without importing them."""
    names = {ep.value.rpartition(".")[2] for ep in importlib.metadata.entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    return sorted(n for n in names if n.startswith("xla_cuda"))


def gpu_problem():
    """toolkit.refuse_silent_cpu's probe for JAX: '' when JAX can start CUDA here, else the cause.

    It reads installed packages and device files only: it runs before jax.distributed.initialize, which refuses to
    run once anything used a device. Whether CUDA then starts (driver version, CUDA libraries) JAX says when it
    starts it: select_platform demands the cuda platform, platform_start turns JAX's error into the same line."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        version = ""
    plugins = cuda_plugins()
    if not plugins:
        jaxlib, pin = (f"jaxlib {version}", f"=={version}") if version else ("jaxlib", "")
        return (f"{jaxlib} has no CUDA plugin (requirements.txt installs the CPU build): "
                f"pip install \"jax[cuda13]{pin}\" (jax[cuda12] where the driver predates CUDA 13)")
    if not any(os.path.exists(d) for d in NVIDIA_DEVICES):
        return (f"JAX's CUDA plugin ({', '.join(plugins)}) finds no NVIDIA device here (none of "
                f"{', '.join(NVIDIA_DEVICES)}: is the driver loaded, are the GPUs passed into the container?)")
    return ""


def visible_gpus():
    """The GPUs this process may use, as CUDA numbers them for it: CUDA_VISIBLE_DEVICES's entries or, where it is
    unset, every GPU the NVIDIA driver lists (no CUDA call: JAX must not start before jax.distributed.initialize)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        listed = [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
        return [] if listed[:1] in (["-1"], ["NoDevFiles"]) else listed
    try:
        return [str(i) for i in range(len(os.listdir(NVIDIA_GPU_LIST)))]
    except OSError:  # no NVIDIA driver
        return []


def process_gpu(process_id, nprocs):
    """multigpu.py: the GPU process `process_id` of `nprocs` drives (local_device_ids, [i] of visible_gpus()), None
    without GPUs. Left to itself each process would start every visible GPU and preallocate 75 % of each one's
    memory (XLA's default): the second process runs out of memory. Processes that share a GPU (--nprocs above the
    GPUs) split the 75 %, unless the user set XLA's memory variables."""
    gpus = visible_gpus()
    if not gpus:
        return None
    sharing = -(-nprocs // len(gpus))
    users = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE")
    if sharing > 1 and not any(n in os.environ for n in users):
        os.environ["XLA_CLIENT_MEM_FRACTION"] = f"{0.75 / sharing:.3g}"  # read when JAX starts CUDA, later
    return [process_id % len(gpus)]


def select_platform(backend):
    """--backend, in JAX's terms, as configuration only: nothing here may use a device, because
    jax.distributed.initialize refuses to run after that. GPUs given (C12) or nccl: the cuda platform is demanded,
    so that JAX fails loudly where it would otherwise warn and fall back to the CPU; gloo: CPU devices."""
    import jax

    if backend == "gloo":
        jax.config.update("jax_platforms", "cpu")
    elif backend == "nccl" or toolkit.gpus_given():
        jax.config.update("jax_platforms", "cuda")
    # WORKAROUND(jax 0.10.2, jax-ml/jax#11182): CPU devices of several processes have no collectives by default: gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


@contextmanager
def platform_start(backend):
    """Around the first use of a device, where JAX starts the platform select_platform chose: CUDA that will not
    start (a driver too old for the plugin, CUDA libraries missing, no usable device) is C12's one line."""
    try:
        yield
    except RuntimeError as e:
        said = str(e).strip().splitlines()[0].split(" (set JAX_PLATFORMS=")[0] if str(e).strip() else repr(e)
        toolkit.refuse_silent_cpu(backend, lambda: f"JAX cannot start CUDA: {said[:300].rstrip('. ')}")
        raise


# ---------------------------------------------------------------------------------------------------- rendezvous


def parse_address(address):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecipeError(f"coordinator address {address!r} is not HOST:PORT", every_rank=False)
    return host, int(port)


def check_coordinator(address, process_id, timeout):
    """Before jax.distributed.initialize: fail with one line where JAX would abort or wait for minutes.

    Process 0 runs the coordinator service and must be able to bind its port; the others must be able to
    reach it. They poll (process 0 may start later than they do) until --timeout.
    """
    host, port = parse_address(address)
    if process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as e:
                raise RecipeError(f"cannot start the coordinator on port {port} ({e.strerror}): another process "
                                  f"already listens on that port: choose another port (in Slurm jobs: "
                                  f"15000 + SLURM_JOB_ID % 15000)") from None
        return
    end = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= end:
                raise RecipeError(f"cannot reach the coordinator at {address} within --timeout {timeout}s "
                                  f"({e.strerror or e}): is process 0 running, is {host} the first node of the job "
                                  f"and is the port the same in every process?") from None
            time.sleep(0.5)


@contextmanager
def rendezvous(coordinator, process_id, timeout):
    """The block around jax.distributed.initialize: what goes wrong there is one line (every process says it:
    it depends on the process), within --timeout.

    Our deadline fires first: when JAX's own initialization_timeout expires, XLA aborts the process with a C++
    stack trace (LOG(FATAL) in CoordinationServiceAgent::Connect) instead of raising.
    """
    rank = process_id if process_id is not None else launcher_rank()
    if coordinator is not None:
        check_coordinator(coordinator, rank, timeout)
    what = (f"jax.distributed.initialize (coordinator {coordinator or 'from SLURM_*'}: are all processes "
            f"started and is the coordinator reachable from every node?)")
    try:
        with deadline(timeout, rank, what):
            yield
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...), ValueError
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RecipeError(f"jax.distributed.initialize failed: {first}") from None


EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def tasks_per_node(layout):
    """Slurm's compressed list of tasks per node, node by node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in layout.split(","):
        count, _, times = part.partition("(x")
        counts += [int(count)] * int(times.rstrip(")") or 1)
    return counts


def local_device_ids():
    """Which of this node's GPUs this process drives, or None to let JAX pick (GPU number SLURM_LOCALID).

    One task per node: all of them. One GPU visible to this task (srun --gpus-per-task, --gpu-bind): that one.
    """
    visible = visible_gpus()
    # SLURM_NODEID: this node's place in the step's node list, whose task counts may differ ('2(x3),1')
    layout = tasks_per_node(os.environ.get("SLURM_STEP_TASKS_PER_NODE", "1"))
    tasks_here = layout[min(int(os.environ.get("SLURM_NODEID", "0")), len(layout) - 1)]
    if visible and tasks_here == 1:
        return list(range(len(visible)))
    if len(visible) == 1:
        # WORKAROUND(jax 0.10.2, jax-ml/jax#28194): Slurm detection would ask task 3 for a GPU 3 it cannot see
        return [0]
    return None


def launch_plan():
    """(coordinator address, number of processes, process id, local device ids) from the launcher's variables."""
    if all(n in os.environ for n in EXPLICIT):
        try:
            num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except ValueError:
            raise RecipeError("JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers", every_rank=False) from None
        if not 0 <= process_id < num_processes:
            raise RecipeError(f"JAX_PROCESS_ID {process_id} is not in 0..{num_processes - 1} (JAX_NUM_PROCESSES)",
                              every_rank=False)
        return os.environ["JAX_COORDINATOR_ADDRESS"], num_processes, process_id, None
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NODELIST" in os.environ:
        # Under srun: JAX's Slurm detection fills in process id and count. These are per-task values, read here
        # in each task -- expanded once in the batch script they would make every task process 0.
        port = os.environ.get("JAX_COORDINATOR_PORT")
        if not port:
            raise RecipeError("JAX_COORDINATOR_PORT not set: in the job script, export "
                              "JAX_COORDINATOR_PORT=$((15000 + SLURM_JOB_ID % 15000)) (JAX's own default, "
                              "61440 + job id % 4096, lies in the ephemeral range and collides now and then)",
                              every_rank=False)
        # The address JAX's Slurm detection would compute (first node of SLURM_STEP_NODELIST), asked of JAX itself
        # rather than parsed again here: the rendezvous checks that very address before initialize() uses it.
        from jax._src.clusters.slurm_cluster import SlurmCluster

        return SlurmCluster.get_coordinator_address(None, port), None, None, local_device_ids()
    present = [n for n in EXPLICIT if n in os.environ]
    raise RecipeError(f"{', '.join(n for n in EXPLICIT if n not in present)} not set: start multinode.py with srun "
                      f"inside a Slurm job, or set all of {', '.join(EXPLICIT)} (multigpu.py does that for "
                      f"you on one machine)", every_rank=False)


# ---------------------------------------------------------------------------------------------------- the spawner


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nprocs():
    return len(visible_gpus()) or 2  # no GPUs: 2 CPU processes, like the other folders


def verdict(codes):
    """The workers' exit codes -> the job's: the worst of them, 75 only if nobody failed."""
    if all(c == 0 for c in codes):
        return 0
    if 2 in codes:
        return 2
    if all(c in (0, PREEMPTED_EXIT_CODE) for c in codes):
        return PREEMPTED_EXIT_CODE
    return next(c for c in codes if c not in (0, PREEMPTED_EXIT_CODE))


def _start(worker, process_id, *args):
    os.environ["JAX_PROCESS_ID"] = str(process_id)  # for error lines printed before JAX knows the rank
    run(worker, process_id, *args, rank=process_id)


def spawn(worker, nprocs, args):
    """mp.spawn for JAX: worker(process_id, nprocs, coordinator, args) in nprocs fresh processes, then exit with
    their verdict: 0, 2 (bad input, one line) or 75 (preempted, snapshot saved)."""
    coordinator = f"127.0.0.1:{free_port()}"
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold XLA's threads
    procs = [ctx.Process(target=_start, args=(worker, i, nprocs, coordinator, args)) for i in range(nprocs)]

    def forward(signum, frame):  # Slurm signals the whole step; a parent signalled alone passes it on
        for p in procs:
            if p.pid and p.exitcode is None:
                os.kill(p.pid, signum)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, forward)
    for p in procs:
        p.start()
    # A worker that fails early (bad input, unreachable coordinator) leaves the others waiting for it:
    # give them --timeout to notice on their own, then stop them.
    first_failure = None
    while any(p.exitcode is None for p in procs):
        time.sleep(0.2)
        failed = any(p.exitcode not in (None, 0, PREEMPTED_EXIT_CODE) for p in procs)
        if failed and first_failure is None:
            first_failure = time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > min(args.timeout, 30):
            for p in procs:
                if p.exitcode is None:
                    p.kill()
    sys.exit(verdict([p.exitcode for p in procs]))


# ---------------------------------------------------------------------------------------------------- collectives


def reduce_max(value):
    """The maximum of `value` (a flag or a float) over every process (allgather, max): the ranks' agreement on
    preemption (PREEMPTION.agreed's inf where the signal came, else seconds per step). float32, not float64: JAX
    without x64 keeps 32-bit arrays; inf and a step time fit."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return float(np.max(multihost_utils.process_allgather(np.float32(value))))


def broadcast(value):
    """Rank 0's small integer (or None, sent as 0) to every process."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value if value is not None else 0)))


def barrier(name):
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def local_value(x):
    """A replicated global array's value as numpy, read from this process's own copy (no communication)."""
    return np.asarray(x.addressable_data(0))


def replicate(tree, sharding):
    """Numpy (identical on every process) -> global arrays replicated on every device of the mesh."""
    import jax

    def put(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree_util.tree_map(put, tree)


# ---------------------------------------------------------------------------------------------------- hangs

HANG_GRACE_S = 10  # at most, never more than --timeout: how long the live processes wait for each other's answer
HANG_KEY = "recipe-hang"  # in the coordination service's key-value store: HANG_KEY/<rank> = the step it waited after
HANG_REPORTED = threading.Event()  # set once the watchdog reports: explain leaves the exit to it


def coordination_timeout(timeout):
    """JAX's heartbeat and shutdown timeouts for --timeout: the watchdog must have spoken before JAX acts. The
    coordination service aborts every process from a C++ thread (LOG(FATAL): no line, a C++ stack) once a peer sent
    no heartbeat for this long, counted from its last heartbeat, not from the stop (seen: the abort 40 s after a
    SIGSTOP, with 50 s). The watchdog has spoken by --timeout + 2 x HANG_GRACE_S + ~2 s; JAX acts after it even at
    half of this."""
    return 2 * (timeout + 30)


def watch_for_hangs(timeout):
    """C13 for JAX: a step that waits on a peer that stopped answering ends with evidence and one line.

    A collective of XLA's has no deadline: the process waits in C++ until JAX's heartbeat check aborts it. This thread
    (started after jax.distributed.initialize, armed at the first step boundary) reports once no step boundary
    (toolkit.PREEMPTION.agreed) came for --timeout: the stacks on disk, the ranks that do not answer named through
    JAX's coordination service, one line, exit 1 (report_hang). Every wait between two steps counts, a save's too
    (its barriers wait on the peers like a step's collectives): --timeout must exceed the longest save."""
    threading.Thread(target=_watch, args=(timeout,), name="jax-hang-watchdog", daemon=True).start()


def _watch(timeout):
    main = threading.main_thread()
    while True:
        time.sleep(min(1.0, timeout / 4))
        step_at = toolkit.HANG.last_step_at
        if step_at is not None and time.monotonic() - step_at >= timeout:
            frame = sys._current_frames().get(main.ident)
            report_hang(frame, traceback.extract_stack(frame) if frame else traceback.StackSummary(), timeout)


def report_hang(frame, stack, timeout):
    """The watchdog's verdict, never returns: the main thread's stack (`frame`, `stack`: where it waits) and every
    thread's into debug/<job id>/rank<N>.stack.txt, one line naming the ranks that do not answer, exit 1."""
    import jax
    from jax._src import distributed  # private: jax 0.10.2 has no public handle on the coordination service's client

    HANG_REPORTED.set()
    rank, world_size, step = jax.process_index(), jax.process_count(), toolkit.PREEMPTION.step
    folder, where = toolkit.HANG.folder(), (f"{stack[-1].name} at {os.path.basename(stack[-1].filename)}:"
                                            f"{stack[-1].lineno}" if stack else "?")
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{rank}.stack.txt"), "w") as f:
                f.write(f"rank {rank} of {world_size}, pid {os.getpid()} on {socket.gethostname()}, step {step}, "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: no step for --timeout {timeout} s\n"
                        f"\nwhere it waited:\n{''.join(stack.format())}\nevery thread now:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            toolkit.log(rank, f"warning: the hang's evidence is incomplete ({e})", file=sys.stderr)
        client, grace = distributed.global_state.client, min(HANG_GRACE_S, timeout)
        silent, answered = who_stopped_answering(client, rank, world_size, step, grace)
        toolkit.log(rank, f"error: no step completed within --timeout {timeout} s after step {step} (this process "
                          f"waits in {where}): {silent}; stacks in {folder}", file=sys.stderr)
        leave_together(client, rank, answered, grace)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def who_stopped_answering(client, rank, world_size, step, grace):
    """(which processes did not answer through JAX's coordination service within `grace` s, the ranks that did --
    None when the service does not answer). Every live process whose watchdog fired posts HANG_KEY/<rank>; the ones
    that do not are stopped, or gone without closing their connections. In a thread: the service lives in process 0,
    and a stopped process 0 answers no call."""
    found = {}

    def ask():
        client.key_value_set(f"{HANG_KEY}/{rank}", str(step), allow_overwrite=True)
        end = time.monotonic() + grace
        while len(found.setdefault("answered", [])) < world_size and time.monotonic() < end:
            time.sleep(0.2)
            found["answered"] = sorted(int(k.rpartition("/")[2]) for k, _ in client.key_value_dir_get(HANG_KEY))

    if not _bounded(ask, grace):
        return ("the processes that stopped answering cannot be named: JAX's coordination service does not answer "
                "either (it runs in process 0: stopped or gone)"), None
    missing = sorted(set(range(world_size)) - set(found["answered"]))
    if not missing:
        return ("every process answered: none stopped -- a collective that hangs (the network?), or a process stuck "
                "outside its step (where each one waits: its rank<N>.stack.txt)"), found["answered"]
    names = ",".join(map(str, missing))
    return (f"rank{'s' if len(missing) > 1 else ''} {names} stopped answering (alive but not progressing, or gone "
            f"without closing its connections)"), found["answered"]


def leave_together(client, rank, answered, grace):
    """After its line: wait (at most `grace` s) until every process that answered has printed its own. Process 0 runs
    the coordination service: its exit aborts the others (a C++ stack, no line) -- it leaves last, a second later."""
    def wait():
        client.key_value_set(f"{HANG_KEY}-said/{rank}", "", allow_overwrite=True)
        end = time.monotonic() + grace
        while len(client.key_value_dir_get(f"{HANG_KEY}-said")) < len(answered) and time.monotonic() < end:
            time.sleep(0.2)

    if answered and len(answered) > 1 and _bounded(wait, grace) and rank == 0:
        time.sleep(1)


def _bounded(call, grace):
    """call() in a thread, given 2 x grace + 1 s (its own waits end after grace; a stopped service's calls may never
    return): True when it returned without an error."""
    returned = threading.Event()

    def calling():
        with suppress(Exception):  # the service gone (process 0 exited): it does not answer
            call()
            returned.set()

    thread = threading.Thread(target=calling, daemon=True)
    thread.start()
    thread.join(2 * grace + 1)
    return returned.is_set()


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Dataset:
    """Images (N, H, W, C) float32, normalised, and labels (N,) int32: small enough to hold in memory."""

    images: np.ndarray
    labels: np.ndarray
    name: str

    def __len__(self):
        return len(self.labels)


def check_dataset_fits(dataset, world_size, batch_size):
    """batch_size: the global batch, over every process."""
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some processes would get no data", every_rank=False)
    if n // batch_size == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step with a global batch of "
                          f"{batch_size}: lower --batch-size or use more data", every_rank=False)


def check_global_batch(progress, global_batch, devices, path):
    """A checkpoint resumes under any number of processes with the same global batch: step i then trains on the same
    samples (ShardedLoader) and the optimizer's schedule counts the same steps. Another global batch is refused in
    one line: the data position and the schedule's step count are in steps of the old batch, and resuming them
    under another would skip or repeat samples and bend the learning-rate curve."""
    old = progress["global_batch"]
    if old != global_batch:
        import jax

        # Every process stops here (they restored the same step): they leave through the shutdown barrier together,
        # or process 0's exit ends the coordination service under the others, which abort (exit -6).
        jax.distributed.shutdown()
        how = (f"--batch-size {old // devices} on this job's {devices} devices" if old % devices == 0 else
               f"{progress['world_size']} process(es) as before")
        raise RecipeError(f"{path} was saved by {progress['world_size']} process(es) at a global batch of {old}, "
                          f"this job's is {global_batch} (--batch-size x {devices} devices): resume with a global "
                          f"batch of {old} ({how}), or start a new --checkpoint-dir", every_rank=False)


def _read_maybe_gz(path):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                return candidate, f.read()
    raise RecipeError(f"{path}[.gz] not found: --data-dir must hold MNIST/raw/ with the IDX files", every_rank=False)


def read_mnist(root):
    """MNIST's training split from its raw IDX files (MNIST/raw/train-*-ubyte[.gz])."""
    raw = os.path.join(root, "MNIST", "raw")
    ipath, images = _read_maybe_gz(os.path.join(raw, "train-images-idx3-ubyte"))
    lpath, labels = _read_maybe_gz(os.path.join(raw, "train-labels-idx1-ubyte"))
    magic, n, rows, cols = struct.unpack(">IIII", images[:16]) if len(images) >= 16 else (0, 0, 0, 0)
    if magic != 2051 or len(images) != 16 + n * rows * cols:
        raise RecipeError(f"{ipath} is not an MNIST image file (IDX magic 2051 and {n}x{rows}x{cols} bytes)",
                          every_rank=False)
    lmagic, ln = struct.unpack(">II", labels[:8]) if len(labels) >= 8 else (0, 0)
    if lmagic != 2049 or ln != n or len(labels) != 8 + n:
        raise RecipeError(f"{lpath} is not an MNIST label file for {n} images", every_rank=False)
    x = np.frombuffer(images, np.uint8, offset=16).reshape(n, rows, cols, 1).astype(np.float32) / 255
    y = np.frombuffer(labels, np.uint8, offset=8).astype(np.int32)
    return Dataset((x - 0.1307) / 0.3081, y, "mnist")


def read_cifar10(root):
    """CIFAR-10's training split from its python pickles (cifar-10-batches-py/data_batch_*)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    xs, ys = [], []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        if not os.path.exists(path):
            raise RecipeError(f"{path} not found: --data-dir must hold cifar-10-batches-py/ (the python version)",
                              every_rank=False)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")  # the official files are python-2 pickles
            data, labels = np.asarray(batch["data"], np.uint8), np.asarray(batch["labels"], np.int32)
            assert data.ndim == 2 and data.shape[1] == 3072 and len(labels) == len(data)
        except Exception:
            raise RecipeError(f"{path} is not a CIFAR-10 batch (a pickled dict with 'data' N x 3072 uint8 and "
                              f"'labels')", every_rank=False) from None
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    x = np.concatenate(xs).astype(np.float32) / 255
    mean, std = np.array([0.4914, 0.4822, 0.4465], np.float32), np.array([0.2470, 0.2435, 0.2616], np.float32)
    return Dataset((x - mean) / std, np.concatenate(ys), "cifar10")


class ShardedLoader:
    """This process's disjoint shard of the data, reshuffled every epoch from (seed, epoch).

    The same permutation on every process (DistributedSampler's rule): the tail that does not divide evenly
    over the processes is dropped, process p takes positions p, p + P, p + 2P, ... and the last incomplete
    batch is dropped. The global batch of step i is then exactly the samples one process with the global
    batch size would take at step i -- which is why 2 processes x batch 16 train like 1 process x batch 32.
    With --num-workers > 0 threads prepare the next batches; threads never receive signals (Python runs
    handlers in the main thread), so a preemption signal cannot kill a loader half-way.
    """

    def __init__(self, dataset, batch_size, rank, world_size, seed, num_workers):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps = (len(dataset) // world_size) // batch_size
        self.pool = ThreadPoolExecutor(num_workers) if num_workers else None
        self.depth = 2 * num_workers

    def indices(self, epoch):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        order = order[: len(order) // self.world_size * self.world_size]
        return order[self.rank::self.world_size]

    def batches(self, epoch, skip=0):
        """(x, y) for steps skip, skip+1, ... of `epoch` (skip: batches already trained before a resume)."""
        shard = self.indices(epoch)

        def load(i):
            idx = np.sort(shard[i * self.batch_size:(i + 1) * self.batch_size])
            return self.dataset.images[idx], self.dataset.labels[idx]

        if self.pool is None:
            yield from (load(i) for i in range(skip, self.steps))
            return
        pending = deque()
        for i in range(skip, self.steps):
            pending.append(self.pool.submit(load, i))
            if len(pending) > self.depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------------------------------- checkpoints


def checkpoint_manager(directory, every_steps, also_every=None):
    """Orbax's CheckpointManager for --checkpoint-dir: a folder per step (<dir>/<step>/state: the arrays, each
    process writing the shards it holds; <dir>/<step>/progress: JSON), every `every_steps` steps and every
    `also_every` steps (--save-every-steps) unless forced -- its should_save decides, the loop asks every step --
    the newest 2 kept. Saves run in the background once the arrays are copied off the devices; a step's folder
    gets its final name only when every process has written its part, so a kill mid-save leaves the previous
    step and a *.orbax-checkpoint-tmp* folder, removed at the next start."""
    import orbax.checkpoint as ocp

    def due(step, last_saved_step):
        return step % every_steps == 0 or bool(also_every) and step % also_every == 0

    options = ocp.CheckpointManagerOptions(should_save_fn=due, max_to_keep=2, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "progress": ocp.JsonCheckpointHandler()})


class _DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that, closed, first lets the tasks still pending on it finish. A read that failed after the
    first failure (which Orbax raises, and the recipe reports in one line) is not reported again: asyncio would print
    `Task exception was never retrieved` and its traceback when the task is collected."""

    def __init__(self):
        super().__init__()
        self.set_exception_handler(self._quiet_about_unretrieved_failures)

    @staticmethod
    def _quiet_about_unretrieved_failures(loop, context):
        if context.get("message") != "Task exception was never retrieved":
            loop.default_exception_handler(context)

    def close(self):
        pending = asyncio.all_tasks(self)
        if pending and not self.is_running() and not self.is_closed():
            self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        return _DrainingLoop()


@contextmanager
def draining_event_loops():
    """Orbax runs each read in a new event loop (asyncio_utils.run_sync) and gathers the array reads there; the first
    read that fails ends the gather, the loop is closed, and the reads still in flight wake it from tensorstore's
    threads: `RuntimeError: Event loop is closed` tracebacks on stderr, one per read. Drained, they end quietly."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


def restore_checkpoint(manager, step, like):
    """(the arrays of `step`, each placed as its counterpart in `like` is -- sharded or replicated --, progress).

    The shapes are compared first, so that a different model is called that (a RecipeError), not a damaged step
    (Orbax's own error, from its files)."""
    import jax
    import orbax.checkpoint as ocp

    # WORKAROUND(orbax-checkpoint 0.12.8, not reported upstream yet): failed reads outlive their loop: drain it
    with draining_event_loops():
        saved = [m.shape for m in jax.tree_util.tree_leaves(manager.item_metadata(step)["state"])]
        if saved != [a.shape for a in jax.tree_util.tree_leaves(like)]:
            raise RecipeError(f"{os.path.join(str(manager.directory), str(step))} holds a different model (other "
                              f"--data?): move {manager.directory} away to start over", every_rank=False)
        target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                 progress=ocp.args.JsonRestore()))
    return restored["state"], restored["progress"]


def restore_newest(manager, like):
    """(step, arrays placed as in `like`, progress) of the newest step every process can read; None where there is no
    step. Rank 0 names each step to try: on a shared filesystem processes can disagree about which steps exist, and
    a job where only some of them resume deadlocks. A step that any process cannot read (a disk's doing: Orbax names
    only complete steps) falls back to the one before it, with a warning (C6); the damaged folder is then renamed
    <step>.unreadable, kept to look at (Orbax would refuse to save that step again). None readable: one line."""
    import jax

    rank, directory = jax.process_index(), str(manager.directory)
    left = sorted(manager.all_steps()) if rank == 0 else []
    unreadable = []  # (folder, what this process could not read there, or '' where another process could not)
    while step := broadcast(left.pop() if left else None):
        try:
            restored, problem = restore_checkpoint(manager, step, like), ""
        except RecipeError:
            raise
        except Exception as e:
            restored, problem = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        if not reduce_max(bool(problem)):
            break
        unreadable.append((os.path.join(directory, str(step)), problem))
    if unreadable and not step:
        raise RecipeError("no readable checkpoint: " + "; ".join(f"{f} ({p or 'unreadable on another process'})"
                                                                 for f, p in unreadable) +
                          f". Move {directory} away to start over", every_rank=False)
    for folder, problem in unreadable:
        if problem:
            toolkit.log(rank, f"warning: cannot restore {folder} ({problem}); resuming from step {step}",
                        file=sys.stderr)
        if rank == 0:
            os.rename(folder, f"{folder}.unreadable")
    if unreadable:
        barrier("unreadable steps renamed")
        manager.reload()
    return (step, *restored) if step else None


def read_checkpoint(directory):
    """(leaves as numpy, progress) of the newest step in `directory`, in one process and without its devices:
    every array assembled whole from the shards all processes wrote (for tools and tests; the job's processes
    restore with restore_checkpoint)."""
    import jax
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(os.path.abspath(directory), item_handlers={
            "state": ocp.PyTreeCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()}) as manager:
        step = manager.latest_step()
        if step is None:
            raise RecipeError(f"no checkpoint in {directory}")
        one = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        tree = manager.item_metadata(step)["state"]
        args = jax.tree_util.tree_map(lambda m: ocp.ArrayRestoreArgs(sharding=one, global_shape=m.shape), tree)
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(restore_args=args),
                                                                 progress=ocp.args.JsonRestore()))
    return [np.asarray(a) for a in jax.tree_util.tree_leaves(restored["state"])], restored["progress"]

