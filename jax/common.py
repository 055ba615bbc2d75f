"""What every jax/ recipe shares: the command line, the model, the data, the training loop and the snapshots.

In JAX the training loop is the same code on one device and on 512: the scripts differ only in how the
processes find each other (`jax.distributed.initialize`) and which devices the mesh spans. A jitted step whose
batch is sharded over the mesh's "data" axis and whose parameters are replicated *is* data-parallel training:
XLA inserts the gradient all-reduce itself. So the loop lives here, once, and
`diff single_gpu.py multinode.py` shows exactly what going multi-process changes.

Words, mapped onto the other folders: a JAX *process* is a rank (`jax.process_index()` = RANK,
`jax.process_count()` = number of processes); a process drives its *local devices* (`jax.local_devices()`:
one per process when Slurm starts one task per GPU, all of the node's GPUs when it starts one per node); the
*global devices* (`jax.devices()`) of all processes form the *mesh* the batch is sharded over.
"""

import argparse
import contextlib
import gzip
import json
import os
import pickle
import signal
import socket
import struct
import sys
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving a
# snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
SNAPSHOT = "snapshot.npz"
PREVIOUS_SNAPSHOT = "snapshot.prev.npz"


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback.

    every_rank: the error depends on this process (it cannot reach the coordinator), so every process that hits
    it says so. Otherwise every process finds the same problem (a bad flag, a missing file) and only rank 0
    prints it: one line, not one per process.
    """

    def __init__(self, message, every_rank=False):
        super().__init__(message)
        self.every_rank = every_rank


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit 2 (argparse's own prints the whole usage first)."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="per device (= per process when each process drives one device)")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", default=None,
                   help="holds MNIST/raw/*-ubyte[.gz] or cifar-10-batches-py/ (read in place, never downloaded)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", default=None, help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
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
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def rank_from_env():
    """The rank before JAX knows it: what the launcher set (for error lines printed before initialize)."""
    return int(os.environ.get("JAX_PROCESS_ID", os.environ.get("SLURM_PROCID", "0")))


PREEMPTION = None  # the PreemptionFlag, installed by run() before anything else


def run(main, *args):
    """Call main(*args); turn a RecipeError into one clear line and exit 2 instead of a traceback wall.

    The signal handlers come first: a SIGUSR1 that arrives while JAX is still importing must not kill the
    process. os._exit, not sys.exit, on the way out of an error: a process whose peers are gone must not wait
    in JAX's shutdown barrier.
    """
    global PREEMPTION
    PREEMPTION = PreemptionFlag()
    try:
        main(*args)
    except RecipeError as e:
        rank = rank_from_env()
        if rank == 0 or e.every_rank:
            log(rank, f"error: {e}", file=sys.stderr)
        sys.stdout.flush()
        os._exit(2)
    except SystemExit as e:
        if e.code == PREEMPTED_EXIT_CODE:
            sys.stdout.flush()
            os._exit(PREEMPTED_EXIT_CODE)
        raise


@contextlib.contextmanager
def deadline(seconds, rank, what):
    """Exit with a clear message if the block has not finished after `seconds`.

    Some failures block inside C++ where no Python timeout reaches (a peer that never arrives at a
    collective). A dead or missing process must never hang a job.
    """
    def give_up():
        log(rank, f"error: {what} did not finish within {seconds} s", file=sys.stderr)
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def quiet_xla_logs():
    """XLA's C++ logs warnings to stderr (TF_CPP_*); keep stderr for the recipe's own error line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def select_platform(backend):
    """--backend, in JAX's terms: which device platform; set before the first use of any device."""
    import jax

    if backend == "gloo":
        jax.config.update("jax_platforms", "cpu")
    # Multi-process collectives between CPU devices need an implementation (none by default): gloo over TCP.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if backend == "nccl" and jax.default_backend() != "gpu":
        raise RecipeError("--backend nccl needs GPUs, and JAX sees none (is the CUDA plugin installed: "
                          "pip install \"jax[cuda12]\"?)")


def make_mesh(devices):
    """A one-axis mesh: the batch is split along "data" over these devices, the parameters are replicated."""
    import jax

    return jax.sharding.Mesh(np.array(devices), ("data",))


# ---------------------------------------------------------------------------------------------------- rendezvous


def parse_address(address):
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RecipeError(f"coordinator address {address!r} is not HOST:PORT")
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
                                  f"15000 + SLURM_JOB_ID % 15000)", every_rank=True) from None
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
                                  f"and is the port the same in every process?", every_rank=True) from None
            time.sleep(0.5)


def initialize_distributed(args, coordinator_address=None, num_processes=None, process_id=None,
                           local_device_ids=None):
    """jax.distributed.initialize, bounded by --timeout and explained when it fails.

    Arguments left None are auto-detected by JAX (under srun from SLURM_* variables; elsewhere from
    JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES/JAX_PROCESS_ID read by the caller).
    """
    import jax

    select_platform(args.backend)
    rank = process_id if process_id is not None else rank_from_env()
    if coordinator_address is not None:
        check_coordinator(coordinator_address, rank, args.timeout)
    what = (f"jax.distributed.initialize (coordinator {coordinator_address or 'from SLURM_*'}: are all processes "
            f"started and is the coordinator reachable from every node?)")
    # Our deadline fires first: when JAX's own initialization_timeout expires, XLA aborts the process with a
    # C++ stack trace (LOG(FATAL) in CoordinationServiceAgent::Connect) instead of raising.
    try:
        with deadline(args.timeout, rank, what):
            jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                       initialization_timeout=args.timeout + 60,
                                       heartbeat_timeout_seconds=max(args.timeout, 10))
    except Exception as e:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...), ValueError
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise RecipeError(f"jax.distributed.initialize failed: {first}", every_rank=True) from None
    # initialize() starts XLA's preemption sync manager, which takes SIGTERM over in C++: a TERM would then never
    # reach our flag and the run would train on. Take it back, so that TERM and USR1 both end in a snapshot.
    PREEMPTION.install()
    return jax.process_index(), jax.process_count()


# ---------------------------------------------------------------------------------------------------- data


class Dataset:
    """Images (N, H, W, C) float32, normalised, and labels (N,) int32: small enough to hold in memory."""

    def __init__(self, images, labels, name):
        self.images, self.labels, self.name = images, labels, name

    def __len__(self):
        return len(self.labels)


def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise).

    Generated from its own seed, so every process and every run builds the identical dataset without any file.
    """
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((10, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, size, dtype=np.int32)
    images = prototypes[labels] + rng.standard_normal((size, 28, 28, 1), dtype=np.float32)
    return Dataset(images, labels, "synthetic")


def _read_maybe_gz(path):
    for candidate in (path, path + ".gz"):
        if os.path.exists(candidate):
            opener = gzip.open if candidate.endswith(".gz") else open
            with opener(candidate, "rb") as f:
                return candidate, f.read()
    raise RecipeError(f"{path}[.gz] not found: --data-dir must hold MNIST/raw/ with the IDX files")


def mnist_dataset(root):
    """MNIST's training split from its raw IDX files (MNIST/raw/train-{images-idx3,labels-idx1}-ubyte[.gz])."""
    raw = os.path.join(root, "MNIST", "raw")
    ipath, images = _read_maybe_gz(os.path.join(raw, "train-images-idx3-ubyte"))
    lpath, labels = _read_maybe_gz(os.path.join(raw, "train-labels-idx1-ubyte"))
    magic, n, rows, cols = struct.unpack(">IIII", images[:16]) if len(images) >= 16 else (0, 0, 0, 0)
    if magic != 2051 or len(images) != 16 + n * rows * cols:
        raise RecipeError(f"{ipath} is not an MNIST image file (IDX magic 2051 and {n}x{rows}x{cols} bytes)")
    lmagic, ln = struct.unpack(">II", labels[:8]) if len(labels) >= 8 else (0, 0)
    if lmagic != 2049 or ln != n or len(labels) != 8 + n:
        raise RecipeError(f"{lpath} is not an MNIST label file for {n} images")
    x = np.frombuffer(images, np.uint8, offset=16).reshape(n, rows, cols, 1).astype(np.float32) / 255
    y = np.frombuffer(labels, np.uint8, offset=8).astype(np.int32)
    return Dataset((x - 0.1307) / 0.3081, y, "mnist")


def cifar10_dataset(root):
    """CIFAR-10's training split from its python pickles (cifar-10-batches-py/data_batch_1..5)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    xs, ys = [], []
    for i in range(1, 6):
        path = os.path.join(folder, f"data_batch_{i}")
        if not os.path.exists(path):
            raise RecipeError(f"{path} not found: --data-dir must hold cifar-10-batches-py/ (the python version)")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")  # the official files are python-2 pickles
            data, labels = np.asarray(batch["data"], np.uint8), np.asarray(batch["labels"], np.int32)
            assert data.ndim == 2 and data.shape[1] == 3072 and len(labels) == len(data)
        except Exception:
            raise RecipeError(f"{path} is not a CIFAR-10 batch (a pickled dict with 'data' N x 3072 uint8 and "
                              f"'labels')") from None
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    x = np.concatenate(xs).astype(np.float32) / 255
    mean, std = np.array([0.4914, 0.4822, 0.4465], np.float32), np.array([0.2470, 0.2435, 0.2616], np.float32)
    return Dataset((x - mean) / std, np.concatenate(ys), "cifar10")


def build_dataset(args):
    if args.data == "synthetic":
        return synthetic_dataset(args.dataset_size)
    if not os.path.isdir(args.data_dir) or not os.listdir(args.data_dir):
        raise RecipeError(f"--data-dir {args.data_dir!r} is missing or empty")
    return mnist_dataset(args.data_dir) if args.data == "mnist" else cifar10_dataset(args.data_dir)


def check_dataset_fits(dataset, num_processes, global_batch):
    n = len(dataset)
    if n < num_processes:
        raise RecipeError(f"the dataset has {n} samples but the world size is {num_processes}: "
                          f"some processes would get no data")
    if n // global_batch == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step with a global batch of "
                          f"{global_batch}: lower --batch-size or use more data")


class ShardedLoader:
    """This process's disjoint shard of the data, reshuffled every epoch from (seed, epoch).

    The same permutation on every process (DistributedSampler's rule): the tail that does not divide evenly
    over the processes is dropped, process p takes positions p, p + P, p + 2P, ... and the last incomplete
    batch is dropped. The global batch of step i is then exactly the samples one process with the global
    batch size would take at step i -- which is why 2 processes x batch 16 train like 1 process x batch 32.
    With --num-workers > 0 threads prepare the next batches; threads never receive signals (Python runs
    handlers in the main thread), so a preemption signal cannot kill a loader half-way.
    """

    def __init__(self, dataset, batch_size, process_index, num_processes, seed, num_workers):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.process_index, self.num_processes = process_index, num_processes
        self.steps = (len(dataset) // num_processes) // batch_size
        self.pool = ThreadPoolExecutor(num_workers) if num_workers else None
        self.depth = 2 * num_workers

    def indices(self, epoch):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        order = order[: len(order) // self.num_processes * self.num_processes]
        return order[self.process_index::self.num_processes]

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


# ---------------------------------------------------------------------------------------------------- model


def init_params(seed, in_channels, image_size, num_classes=10, width=16):
    """The same small CNN as pytorch/'s ConvNet (conv-relu-pool twice, then two dense layers), as a pytree.

    Initialised like torch's defaults (uniform in +-1/sqrt(fan_in)), from --seed: every process computes the
    identical initial weights, no broadcast needed. (Plain JAX, not Flax: eight arrays need no framework.)
    """
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    flat = (image_size // 4) ** 2 * 2 * width
    return {
        "conv1": {"w": uniform((3, 3, in_channels, width), 9 * in_channels), "b": uniform((width,), 9 * in_channels)},
        "conv2": {"w": uniform((3, 3, width, 2 * width), 9 * width), "b": uniform((2 * width,), 9 * width)},
        "fc1": {"w": uniform((flat, 128), flat), "b": uniform((128,), flat)},
        "fc2": {"w": uniform((128, num_classes), 128), "b": uniform((num_classes,), 128)},
    }


def apply_model(params, x, compute_dtype):
    import jax
    import jax.numpy as jnp

    def conv(p, h):
        h = jax.lax.conv_general_dilated(h, p["w"].astype(compute_dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p["b"].astype(compute_dtype))
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    h = conv(params["conv2"], conv(params["conv1"], x.astype(compute_dtype)))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["fc1"]["w"].astype(compute_dtype) + params["fc1"]["b"].astype(compute_dtype))
    logits = h @ params["fc2"]["w"].astype(compute_dtype) + params["fc2"]["b"].astype(compute_dtype)
    return logits.astype(jnp.float32)  # loss and its gradient in fp32, also under --amp


def build_optimizer(args, steps_per_epoch):
    """SGD with momentum and a cosine schedule spanning --epochs (like pytorch/): --max-steps only stops early,
    so a run cut short and resumed follows exactly the same learning-rate curve as an uninterrupted one."""
    import optax

    schedule = optax.cosine_decay_schedule(args.lr, decay_steps=args.epochs * steps_per_epoch)
    return optax.sgd(schedule, momentum=0.9)


# ---------------------------------------------------------------------------------------------------- training


class PreemptionFlag:
    """Remembers that Slurm asked us to stop; the training loop acts on it at a step boundary.

    Saving inside the signal handler would interrupt a step half-way; instead every process checks the flag
    every STOP_CHECK_EVERY steps and all of them agree (allgather, max) on the same step to stop at.
    """

    STOP_CHECK_EVERY = 10

    def __init__(self):
        self.requested = False
        self.install()

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, step, num_processes):
        if step % self.STOP_CHECK_EVERY:
            return False
        if num_processes == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file). Off by default."""

    def __init__(self, path):
        self.path, self.times = path, []
        self.start = time.time()

    def step(self, result):
        if self.path:
            result.block_until_ready()  # only when timing: JAX dispatches asynchronously
            self.times.append(time.time())

    def write(self, **info):
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"start_time": self.start, "step_end_times": self.times, **info}, f)


def local_value(x):
    """A replicated global array's value as numpy, read from this process's own copy (no communication)."""
    return np.asarray(x.addressable_data(0))


def host_tree(tree):
    import jax

    return jax.tree_util.tree_map(local_value, tree)


class Trainer:
    """Data-parallel training over `mesh`: parameters replicated, each batch sharded along the "data" axis.

    rank / num_processes: this process and how many there are (1 for single_gpu.py).
    """

    def __init__(self, args, mesh, rank, num_processes):
        import jax

        self.args, self.mesh, self.rank, self.num_processes = args, mesh, rank, num_processes
        self.local_devices = len(mesh.local_devices)
        self.global_batch = args.batch_size * mesh.devices.size
        self.dataset = build_dataset(args)
        check_dataset_fits(self.dataset, num_processes, self.global_batch)
        self.loader = ShardedLoader(self.dataset, args.batch_size * self.local_devices, rank, num_processes,
                                    args.seed, args.num_workers)
        self.optimizer = build_optimizer(args, self.loader.steps)
        image = self.dataset.images.shape
        params = init_params(args.seed, in_channels=image[3], image_size=image[1])
        self.state = {"epoch": 0, "step": 0, "batch_in_epoch": 0}
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self.params, self.opt_state = self.place((params, self.optimizer.init(params)))
        self.train_step = self.compile_step()
        self.preemption = PREEMPTION

    def place(self, tree):
        """Numpy (identical on every process) -> global arrays replicated on every device of the mesh."""
        import jax

        def put(value):
            value = np.asarray(value)
            return jax.make_array_from_callback(value.shape, self.replicated, lambda index: value[index])

        return jax.tree_util.tree_map(put, tree)

    def compile_step(self):
        import jax
        import jax.numpy as jnp
        import optax

        compute_dtype = jnp.bfloat16 if self.args.amp else jnp.float32

        @partial(jax.jit, out_shardings=self.replicated, donate_argnums=(0, 1))
        def step(params, opt_state, x, y):
            def loss_fn(p):
                logits = apply_model(p, x, compute_dtype)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

            # The mean runs over the *global* batch: XLA turns it into per-device sums plus an all-reduce,
            # and the same for the gradients -- DDP's all-reduce, written by the compiler.
            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            return optax.apply_updates(params, updates), opt_state, loss, correct

        return step

    def global_batch_of(self, x, y):
        """This process's part of the batch -> one global array sharded over every device of every process."""
        import jax

        return (jax.make_array_from_process_local_data(self.sharded, x),
                jax.make_array_from_process_local_data(self.sharded, y))

    # ------------------------------------------------------------------------------------------ snapshots

    def snapshot_leaves(self):
        import jax

        return jax.tree_util.tree_leaves((host_tree(self.params), host_tree(self.opt_state)))

    def save_snapshot(self):
        """Written by rank 0 alone (every process holds the same replicated values), atomically."""
        meta = {**self.state, "world_size": self.num_processes, "global_batch": self.global_batch,
                "seed": self.args.seed}
        leaves = self.snapshot_leaves()  # every process reads its own copy; only rank 0 writes
        if self.rank == 0:
            write_snapshot(self.args.checkpoint_dir, leaves, meta)
            log(0, f"snapshot saved to {self.args.checkpoint_dir} (step {self.state['step']})")
        self.barrier("snapshot")  # nobody reads or restarts before the file is complete

    def resume(self):
        import jax

        # Rank 0 decides which snapshot to use and tells the others: on a shared filesystem processes can
        # disagree about whether a file exists, and a job where only some of them resume deadlocks.
        choice = find_snapshot(self.args.checkpoint_dir) if self.rank == 0 else None
        names = (None, SNAPSHOT, PREVIOUS_SNAPSHOT)
        code = self.broadcast(names.index(os.path.basename(choice) if choice else None))
        if code == 0:
            return
        path = os.path.join(self.args.checkpoint_dir, names[code])
        leaves, meta = read_snapshot(path)
        template = jax.tree_util.tree_structure((self.params, self.opt_state))
        expected = self.snapshot_leaves()
        if len(leaves) != len(expected) or any(a.shape != b.shape for a, b in zip(leaves, expected)):
            raise RecipeError(f"{path} holds a different model (other --data?): move it away to start over")
        self.params, self.opt_state = self.place(jax.tree_util.tree_unflatten(template, leaves))
        self.state.update(epoch=meta["epoch"], step=meta["step"], batch_in_epoch=meta["batch_in_epoch"])
        if self.rank == 0:
            log(0, f"resumed from {path}: epoch {self.state['epoch'] + 1}, step {self.state['step']}")

    def broadcast(self, value):
        if self.num_processes == 1:
            return value
        from jax.experimental import multihost_utils

        return int(multihost_utils.broadcast_one_to_all(np.int32(value if value is not None else 0)))

    def barrier(self, name):
        if self.num_processes > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # ------------------------------------------------------------------------------------------ the loop

    def training_left(self):
        args, state = self.args, self.state
        return state["epoch"] < args.epochs and not (args.max_steps and state["step"] >= args.max_steps)

    def train_epoch(self, timer):
        """One pass over this process's shard; returns summed loss, correct predictions and samples (global).

        Totals stay on the device: reading a value every step would wait for each step to finish.
        """
        args, state = self.args, self.state
        skip = state["batch_in_epoch"]  # resuming mid-epoch: these batches were trained on before the snapshot
        loss_sum, correct, seen, preempted = 0.0, 0, 0, False
        for x, y in self.loader.batches(state["epoch"], skip):
            gx, gy = self.global_batch_of(x, y)
            self.params, self.opt_state, loss, n_correct = self.train_step(self.params, self.opt_state, gx, gy)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            timer.step(loss)
            loss_sum, correct, seen = loss_sum + loss * self.global_batch, correct + n_correct, seen + self.global_batch
            if state["step"] % args.log_every == 0 and self.rank == 0:
                log(0, f"epoch {state['epoch'] + 1} | batch {state['batch_in_epoch']}/{self.loader.steps} | "
                       f"step {state['step']} | loss {float(local_value(loss)):.4f}")
            if args.max_steps and state["step"] >= args.max_steps:
                break
            if self.preemption.agreed(state["step"], self.num_processes):
                preempted = True
                break
        return loss_sum, correct, seen, preempted

    def fit(self):
        args, state = self.args, self.state
        if args.checkpoint_dir:
            self.resume()
        if self.rank == 0:
            log(0, f"processes {self.num_processes} | devices {self.mesh.devices.size} "
                   f"({self.local_devices} per process, {self.mesh.devices.flat[0].platform}) | "
                   f"{len(self.dataset)} samples | batch {args.batch_size}/device, {self.global_batch} global | "
                   f"{self.loader.steps} steps/epoch")
        timer = StepTimer(args.timings_file if self.rank == 0 else None)
        start = time.perf_counter()
        while self.training_left():
            epoch_start = time.perf_counter()
            loss_sum, correct, seen, preempted = self.train_epoch(timer)
            elapsed = time.perf_counter() - epoch_start
            if seen and self.rank == 0:
                log(0, f"epoch {state['epoch'] + 1}/{args.epochs} | step {state['step']} | "
                       f"loss {float(local_value(loss_sum)) / seen:.4f} | "
                       f"acc {int(local_value(correct)) / seen:.4f} | {seen / elapsed:.0f} samples/s | "
                       f"{elapsed:.1f} s")
            if state["batch_in_epoch"] == self.loader.steps:  # the epoch ran to its end
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            finished = not self.training_left()
            if args.checkpoint_dir and (finished or preempted or state["epoch"] % args.save_every == 0):
                self.save_snapshot()
            if preempted:
                if self.rank == 0:
                    saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                    log(0, f"preempted at step {state['step']}: {saved}; exiting with {PREEMPTED_EXIT_CODE} "
                           f"so the job script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        timer.write(world_size=self.num_processes, batch_size=args.batch_size)
        if self.rank == 0:
            log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------------------------------------- snapshots


def write_snapshot(checkpoint_dir, leaves, meta):
    """Write atomically (temporary file, fsync, rename): a crash mid-write leaves the last good snapshot.

    The previous snapshot is kept as snapshot.prev.npz so that one damaged later (a full disk, a truncated
    copy) still leaves something to resume from. Format: numpy's .npz, the flattened (params, optimizer state)
    as leaf0..leafN plus the progress as JSON -- readable with numpy alone, no pickles.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, SNAPSHOT)
    tmp = final + ".tmp"
    arrays = {f"leaf{i}": leaf for i, leaf in enumerate(leaves)}
    with open(tmp, "wb") as f:
        np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        os.replace(final, os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))
    os.replace(tmp, final)


def read_snapshot(path):
    """(leaves, meta); reading every array checks every CRC, so a damaged file fails here, not later."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        leaves = [z[f"leaf{i}"] for i in range(sum(1 for k in z.files if k.startswith("leaf")))]
    return leaves, meta


def find_snapshot(checkpoint_dir):
    """The newest readable snapshot (by its stored step, never by file time), or None when there is none yet.

    A damaged snapshot is named in a warning and the other one is used; if none is readable, that is an error
    (starting from scratch silently would throw the finished work away and then overwrite it).
    """
    readable, problems = [], []
    for name in (SNAPSHOT, PREVIOUS_SNAPSHOT):
        path = os.path.join(checkpoint_dir, name)
        if not os.path.exists(path):
            continue
        try:
            readable.append((read_snapshot(path)[1]["step"], name == SNAPSHOT, path))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if readable:
        for problem in problems:
            print(f"warning: {problem}; using {max(readable)[2]}", file=sys.stderr, flush=True)
        return max(readable)[2]
    if problems:
        raise RecipeError("no usable snapshot: " + "; ".join(problems) +
                          ". Delete or move the damaged file(s) to start over.")
    return None
