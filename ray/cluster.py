"""ray/'s plumbing: what the lesson (recipe.py) needs around it on a real cluster, apart from what it teaches.

Map:
    parse_args, add_ray_flags   the command line (C2; no silent CPU, C12); --max-failures of the scripts on Ray
    run                         toolkit.run, the driver (or single_gpu.py's one process) speaking as rank 0
    WorkerHang, explain         a worker's collective past --timeout (WorkerLink.reporting_hangs): its stacks on
                                disk, its one line through Ray's error to the driver, which prints it (C13)
    pick_backend                --backend auto: nccl with CUDA, gloo without
    npz_dataset                 --data npz: DATA_DIR/train.npz, checked; a bad file is one error line (C4)
    check_dataset_fits          enough samples for every worker and one full step, checked before anything starts
    resumable_snapshot          find_snapshot's choice, refused in the driver (toolkit.samples_done) when its
                                number of workers or batch cannot resume here, before any worker starts
    step_timer                  --timings-file: per-step times on rank 0 (toolkit.StepTimer), or None
    mixed_precision             --amp: bf16 where the device does it natively, else fp16 with a GradScaler (C10)
    SNAPSHOT, RUN_NAME,
    KEEP_SNAPSHOTS              the snapshot layout: CHECKPOINT_DIR/train/checkpoint_*/snapshot.pt, newest 2 kept
    snapshot_dirs               the snapshot directories under --checkpoint-dir
    find_snapshot               the newest readable one by stored step; a damaged one is a warning (C6)
    snapshot_step               the step stored in a snapshot directory
    save_snapshot               snapshot.pt into a directory, flushed to disk
    LocalSession                single_gpu.py's session: lines printed, the layout written atomically (rename)
    WorkerLink                  a Ray Train worker's side of the control actor: its lines, the stop agreement,
                                rank 0's choice of where to resume, its hang's evidence and line, the run's status
    make_control_actor          the run's control actor: the workers' lines to the driver, the stop request to them
    DriverPump                  the driver's thread beside trainer.fit(): prints those lines, passes signals on
    scratch_storage             Ray Train's storage path: --checkpoint-dir, or a temporary one removed afterwards
    ray_environment             token authentication and no usage statistics, set before `import ray`
    ray_logs_to_driver          Ray's own messages in the job log only with RAY_RECIPE_LOGS=1
    OBJECT_STORE_BYTES          256 MiB of object store: small /dev/shm in containers and on small nodes
    local_ray                   a one-node Ray cluster owned by this process (multigpu.py)
    joined_ray                  this driver joined to a running cluster, or one error line by --timeout (multinode.py)
    wait_for_nodes              multinode.py: poll until every node of the job has joined (deadline --timeout)
    default_workers             multinode.py: one worker per GPU of the cluster, one per node without GPUs
"""

import argparse
import contextlib
import functools
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, TensorDataset

import toolkit
from toolkit import (HANG, PREEMPTION, OneLineParser, RecipeError, StepTimer, log, non_negative_int,
                     positive_float, positive_int)

# ---------------------------------------------------------------------------------------------------- command line


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (CONTRACT.md C2), plus the script's own flags."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per worker")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "npz"], default="synthetic",
                   help="npz: DATA_DIR/train.npz with `images` (N, C, H, W) float and `labels` (N,) int")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="directory that holds train.npz (--data npz)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="snapshots go here and resume from here is automatic (default: none, nothing is saved)")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on CPUs and GPUs that do it natively (compute capability >= 8.0), "
                        "else fp16 with a GradScaler")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before joining Ray, a rendezvous or a collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds train.npz)")
    if args.checkpoint_dir:  # Ray needs an absolute storage path; the workers may run in another directory
        args.checkpoint_dir = os.path.abspath(args.checkpoint_dir)
    # Given GPUs it cannot use: stop (C12). The driver checks its own node; Ray then places GPU workers only on
    # nodes whose `ray start` counted GPUs (ray_node.sh: --num-gpus from Slurm).
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


def add_ray_flags(parser):
    """Flags of the scripts that run the loop on Ray workers (multigpu.py, multinode.py)."""
    parser.add_argument("--max-failures", type=non_negative_int, default=3,
                        help="times Ray replaces a dead worker and restarts from the last checkpoint "
                             "(FailureConfig) before the run fails")


class WorkerHang(Exception):
    """A Ray Train worker's collective ran past --timeout: toolkit.HANG's (line, exit code), its stacks already on
    disk. Raised in the worker, it reaches the driver inside Ray Train's WorkerGroupError (worker_failures)."""


def explain(error):
    """The driver's one line for a worker's hang: Ray Train wraps the worker's WorkerHang (a WorkerGroupError
    naming each failed rank's exception); the lowest rank's line, HANG's exit code. Other errors keep Ray's text."""
    failures = getattr(error, "worker_failures", None) or {}
    hangs = [failures[rank] for rank in sorted(failures) if isinstance(failures[rank], WorkerHang)]
    return tuple(hangs[0].args) if hangs else None


# Every script's entry point. The driver is the one process that prints (the workers' lines come through it), so
# its own lines, errors included, carry rank 0. No cleanup: local_ray/joined_ray shut Ray down themselves.
run = functools.partial(toolkit.run, rank=0, explain=explain)


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------------- data, timing


def npz_dataset(data_dir):
    """DATA_DIR/train.npz: `images` float (N, C, H, W) and `labels` int (N,) in 0..9. Checked before training."""
    import numpy as np

    path = os.path.join(data_dir, "train.npz")
    if not os.path.isdir(data_dir):
        raise RecipeError(f"--data-dir {data_dir} does not exist")
    if not os.path.exists(path):
        raise RecipeError(f"--data-dir {data_dir} has no train.npz (found: {sorted(os.listdir(data_dir))[:5]})")
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
    except Exception as e:  # not a zip, a missing array, a pickled object, ...
        raise RecipeError(f"{path} is not an .npz with `images` and `labels` ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if images.ndim != 4 or labels.shape != (len(images),):
        raise RecipeError(f"{path}: want images (N, C, H, W) and labels (N,), got {images.shape} and {labels.shape}")
    return TensorDataset(torch.from_numpy(images).float(), torch.from_numpy(labels).long())


def check_dataset_fits(dataset: Dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some workers would get no data")
    if n // (world_size * batch_size) == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} workers x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


def resumable_snapshot(args, workers):
    """find_snapshot's choice, checked in the driver for the workers' shape (toolkit.samples_done) before any
    starts: a refusal raised in a worker would reach the driver as Ray's error, after Ray restarted the group."""
    path = find_snapshot(args.checkpoint_dir)
    if path is not None:
        toolkit.samples_done(torch.load(os.path.join(path, SNAPSHOT), map_location="cpu", weights_only=True,
                                        mmap=True), workers, args.batch_size, path, "worker(s)")
    return path


def step_timer(args, device, rank, world_size):
    """The benchmarks' step hook: a toolkit.StepTimer on rank 0 when --timings-file is given, else None. On a GPU
    it waits for the device after each step (only when timing: a sync per step costs throughput)."""
    if not (args.timings_file and rank == 0):
        return None
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    return StepTimer(args.timings_file, sync, world_size=world_size, batch_size=args.batch_size)


def mixed_precision(device, enabled):
    """(autocast context factory, GradScaler or None) for --amp: bf16 where native (CPUs, GPUs of compute
    capability >= 8.0), else fp16 + GradScaler (CONTRACT.md C10). Without --amp on a GPU: fp32 with TF32 matmuls
    and convolutions (C10), set in the worker process that trains."""
    if not enabled:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        return contextlib.nullcontext, None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), torch.amp.GradScaler(device.type)


# ---------------------------------------------------------------------------------------------------- snapshots

SNAPSHOT = "snapshot.pt"
# --checkpoint-dir D holds D/train/checkpoint_*/snapshot.pt: Ray Train's layout (RunConfig(storage_path=D,
# name="train") and one directory per reported Checkpoint). single_gpu.py writes the same layout itself.
RUN_NAME = "train"
KEEP_SNAPSHOTS = 2  # the newest and the one before it (a damaged newest falls back to it)


def snapshot_dirs(checkpoint_dir):
    """The snapshot directories under --checkpoint-dir (Ray's `checkpoint_*` under the run name)."""
    root = os.path.join(checkpoint_dir, RUN_NAME)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in os.listdir(root)  # (not Ray's checkpoint_manager_snapshot.json)
            if n.startswith("checkpoint_") and os.path.isdir(os.path.join(root, n))]


def find_snapshot(checkpoint_dir):
    """The newest readable snapshot directory, by the step stored in it (never by file time), or None.

    A damaged snapshot is named in a warning and the next newest is used; if there are snapshots but none is
    readable, that is an error (starting over silently would throw the finished work away)."""
    if not checkpoint_dir:
        return None
    readable, problems = [], []
    for directory in snapshot_dirs(checkpoint_dir):
        try:
            snap = torch.load(os.path.join(directory, SNAPSHOT), map_location="cpu", weights_only=True, mmap=True)
            readable.append((snap["step"], directory))
        except Exception as e:  # truncated, half-copied, wrong format, no snapshot.pt in it
            problems.append(f"{directory} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
            print(f"warning: {problems[-1]}; using an older snapshot", file=sys.stderr, flush=True)
    if readable:
        return max(readable)[1]
    if problems:
        raise RecipeError("no usable snapshot: " + "; ".join(problems) + ". Move the damaged ones away to start over.")
    return None


def snapshot_step(directory):
    return torch.load(os.path.join(directory, SNAPSHOT), map_location="cpu", weights_only=True, mmap=True)["step"]


def save_snapshot(directory, snapshot):
    """snapshot.pt into `directory`, flushed to disk (the directory is then handed to Ray or renamed)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SNAPSHOT), "wb") as f:
        torch.save(snapshot, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------- sessions


class LocalSession:
    """single_gpu.py's session (recipe.RaySession is a Ray Train worker's): one process, no Ray. Lines are printed;
    SIGUSR1/SIGTERM arrive directly (run() installed the handlers, and there is no other rank to agree with:
    reduce_max None); snapshots are written in Ray's directory layout atomically (temporary directory, fsync,
    rename), the newest KEEP_SNAPSHOTS kept."""

    rank, world_size, reduce_max = 0, 1, None

    def __init__(self, checkpoint_dir):
        self.checkpoint_dir = checkpoint_dir

    def log(self, message):
        log(self.rank, message)

    def resume_from(self):
        return find_snapshot(self.checkpoint_dir)

    def save(self, snapshot):
        root = os.path.join(self.checkpoint_dir, RUN_NAME)
        final = os.path.join(root, f"checkpoint_{snapshot['step']:09d}")
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        save_snapshot(tmp, snapshot)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        by_step = sorted(snapshot_dirs(self.checkpoint_dir), key=lambda d: d.rsplit("_", 1)[-1])
        for old in by_step[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)



class WorkerLink:
    """A Ray Train worker's side of the run's control actor: who this worker is, its lines, the stop agreement,
    the choice of where to resume, and its status at the end (recipe.RaySession adds Ray Train's snapshots).

    Log lines go to the driver through the actor: Ray would prefix a worker's own stdout with
    `(RayTrainWorker pid=..., ip=...)`, and a worker on another node has no stdout in the job log at all. The
    driver takes SIGUSR1/SIGTERM and passes the request on through the same actor (the loop runs in a thread of
    the worker process, where no signal handler can be installed)."""

    def __init__(self, config, device):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.train, self.control, self.device = ray.train, config["control"], device
        self.args, self.resume_path = config["args"], config["resume_from"]

    def log(self, message):
        """The run's lines: rank 0 speaks for all (every rank has the same step, metrics over all ranks)."""
        if self.rank == 0:
            self.control.log.remote(f"[rank{self.rank}] {message}")

    def log_placement(self, device):
        """One line per rank: where each rank landed is the first question when a multi-node run misbehaves."""
        import ray

        self.control.log.remote(f"[rank{self.rank}] host {socket.gethostname()} | ip {ray.util.get_node_ip_address()}"
                                f" | pid {os.getpid()} | device {device} | world size {self.world_size}")

    def reduce_max(self, requested):
        """PREEMPTION.agreed's maximum over the ranks (`requested`: inf where the signal came, else seconds per
        step): rank 0 asks the actor whether the driver was told to stop -- the signal this process never gets,
        taken as if it had (inf, except at the early check, which only measures) -- then all ranks all_reduce MAX,
        so that they stop after the same step (ranks asking on their own could disagree and deadlock) and all
        pick the same next check."""
        import ray

        if self.rank == 0 and ray.get(self.control.stop_requested.remote()):
            PREEMPTION.requested = True
            requested = requested if PREEMPTION.interval is None else math.inf  # interval None: the early check
        largest = torch.tensor(float(requested), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest.item()

    def rank0_chooses(self, candidates):
        """Rank 0 calls candidates() and takes the snapshot directory furthest along (by stored step), the others
        follow: ranks must never disagree about where they start."""
        choice = [None]
        if self.rank == 0:
            found = [p for p in candidates() if p]
            choice[0] = max(found, key=snapshot_step) if found else None
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    @contextlib.contextmanager
    def reporting_hangs(self):
        """Around the training: a collective past --timeout (a peer stopped or stuck) writes this worker's stacks
        into <checkpoint-dir>/debug/ and leaves as WorkerHang, whose line the driver prints once Ray Train gives up.
        toolkit.run runs in the driver, which has no process group: the worker asks toolkit.HANG itself, told
        --checkpoint-dir and --timeout (this process parsed no command line). While --max-failures may let Ray
        Train restart the group, the job log says why it restarts."""
        HANG.remember(self.args.checkpoint_dir, self.args.timeout)
        try:
            yield
        except Exception as e:
            verdict = HANG.report(e)
            if verdict is None:
                raise
            if self.args.max_failures:
                self.control.log.remote(f"[rank{self.rank}] warning: {verdict[0]}; Ray Train restarts the workers "
                                        f"from the last snapshot while --max-failures {self.args.max_failures} allows")
            raise WorkerHang(*verdict) from None

    def close(self, status):
        """Rank 0 tells the driver how the run ended ("done" or "preempted": exit 75); every rank waits until
        its lines have been printed."""
        import ray

        if self.rank == 0:
            self.control.finish.remote(status)
        ray.get(self.control.flush.remote())  # every line sent before this one has been printed


# ---------------------------------------------------------------------------------------------------- the driver


def make_control_actor():
    """The run's control actor: workers send it their lines, the driver passes it the stop request.

    Ray workers are separate processes (on other nodes, too): a signal to the driver never reaches them, and
    their stdout is not the driver's. The actor runs beside the driver (num_cpus=0: it takes no worker's CPU).
    """
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class RunControl:
        def __init__(self):
            self.lines, self.stop, self.status = [], False, None

        def log(self, line):
            self.lines.append(line)

        def drain(self):
            lines, self.lines = self.lines, []
            return lines

        def request_stop(self):
            self.stop = True

        def stop_requested(self):
            return self.stop

        def finish(self, status):
            self.status = status

        def result(self):
            return self.status

        def flush(self):
            """A no-op: calls from one caller run in order, so when this returns the earlier ones have run."""

    return RunControl.remote()


class DriverPump(threading.Thread):
    """In the driver, beside trainer.fit() (`with DriverPump(control): trainer.fit()`): prints the workers' lines
    as they arrive and passes a stop request (SIGUSR1/SIGTERM to the driver: PREEMPTION, whose handler only
    sets a flag; the Ray calls happen in this thread) on to the workers through the control actor."""

    def __init__(self, control):
        super().__init__(daemon=True)
        self.control, self.done, self.stop_sent = control, threading.Event(), False

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.done.set()
        self.join()
        self.pump()  # the lines that arrived after the last poll

    def run(self):
        while not self.done.wait(0.2):
            self.pump()

    def pump(self):
        import ray

        if PREEMPTION.requested and not self.stop_sent:
            ray.get(self.control.request_stop.remote())
            self.stop_sent = True
        for line in ray.get(self.control.drain.remote()):
            print(line, flush=True)


@contextlib.contextmanager
def scratch_storage(checkpoint_dir):
    """Ray Train's storage path: --checkpoint-dir, or without it (nothing is saved, but Ray Train still wants a
    storage path for the run's state) a temporary directory, removed afterwards."""
    storage = checkpoint_dir or tempfile.mkdtemp(prefix="ray-train-")
    try:
        yield storage
    finally:
        if not checkpoint_dir:
            shutil.rmtree(storage, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- Ray clusters


def ray_environment(own_cluster):
    """Settings for the Ray processes this driver starts or talks to (set before `import ray`: Ray reads the
    authentication mode once, at import).

    - Token authentication: a cluster this process starts itself (own_cluster) gets a token made for this run
      (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) unless the caller already chose. Ray's default would write
      ~/.ray/auth_token, one token for every cluster of the user. A driver joining a cluster takes the token from
      the environment, as the job that started the cluster exported it (multinode.sbatch does).
    - No usage statistics: a call to the internet from every compute node.
    - A failed worker group is shut down after Ray Train has waited TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S (30 s)
      for every worker's destroy_process_group, which a stopped worker never runs: 5 s keeps the end of a hang
      within --timeout + 60 s (C13). Read by Ray Train's controller, a process of the cluster: one this process
      starts inherits this environment; ray_node.sh sets it for multinode.sbatch's.
    """
    import secrets

    if own_cluster and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if own_cluster:
        os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5")


def ray_logs_to_driver():
    """Ray's own messages from workers and the Train controller (prefixed `(RayTrainWorker pid=...)`) stay in the
    session's log files unless RAY_RECIPE_LOGS=1: the job log holds the recipe's `[rankN]` lines only."""
    return os.environ.get("RAY_RECIPE_LOGS") == "1"


# The recipes pass only small objects through Ray's object store; Ray's default (30% of RAM, in /dev/shm) fails
# or falls back to slow disk in containers and on small nodes with a small /dev/shm.
OBJECT_STORE_BYTES = 256 * 1024**2


@contextlib.contextmanager
def local_ray(num_cpus):
    """A Ray cluster of one node, started by this process and ended with it (ray.shutdown stops exactly the
    processes ray.init started). Its temporary directory is short and its own: Ray puts Unix sockets in it,
    whose paths may not exceed ~107 characters, and two runs must not share a session directory."""
    ray_environment(own_cluster=True)
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Slurm signals every process of the step (multigpu.sbatch's srun): Ray's processes died of USR1/TERM before the
    # driver had saved (the GCS, the raylet, the Train workers). They start with both blocked, as ray_node.sh starts
    # a cluster of its own: the mask survives fork and exec; this driver takes them (PREEMPTION) and passes them on.
    signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION.SIGNALS)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                 object_store_memory=OBJECT_STORE_BYTES, log_to_driver=ray_logs_to_driver(), logging_level="warning")
        PREEMPTION.install()  # again: ray.init installs its own SIGTERM handler in a driver that starts a cluster
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, PREEMPTION.SIGNALS)  # one that came meanwhile is delivered now
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def joined_ray(address, timeout):
    """Connect this driver to a running Ray cluster; a wrong or unreachable address is one error line within
    `timeout` seconds (Ray itself keeps retrying for minutes)."""
    ray_environment(own_cluster=False)
    import ray

    def give_up():
        print(f"error: could not join the Ray cluster at {address} within --timeout {timeout} s: is the address "
              f"HEAD_IP:GCS_PORT of a running head (`ray start --head --port ...`), reachable from this node, "
              f"and RAY_AUTH_TOKEN the cluster's token?", file=sys.stderr, flush=True)
        os._exit(2)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        ray.init(address=address, log_to_driver=ray_logs_to_driver(), logging_level="warning")
    except Exception as e:  # ConnectionError, AuthenticationError, ...
        raise RecipeError(f"could not join the Ray cluster at {address}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    finally:
        timer.cancel()
    PREEMPTION.install()  # again, as in local_ray
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; the cluster belongs to whoever started it (the job script)


def wait_for_nodes(count, timeout):
    """Poll until `count` nodes are alive: the job script starts them all, but each joins when it is ready."""
    import ray

    deadline = time.monotonic() + timeout
    while (alive := [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]) and len(alive) < count:
        if time.monotonic() > deadline:
            raise RecipeError(f"only {len(alive)} of {count} nodes joined the Ray cluster within --timeout {timeout} s "
                              f"(joined: {', '.join(alive)}): see the job log for the nodes' `ray start` output")
        time.sleep(1)
    log(0, f"cluster: {len(alive)} nodes ({', '.join(sorted(alive))})")


def default_workers():
    """One worker per device of the cluster: its GPUs, or one per node where there are none."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return gpus if torch.cuda.is_available() and gpus else len([n for n in ray.nodes() if n["Alive"]])
