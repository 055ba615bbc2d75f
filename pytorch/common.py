"""What every pytorch/ recipe shares: the command line, the model, the data and the snapshot file.

Everything about *distribution* stays in the scripts themselves, so that
`diff single_gpu.py multigpu_torchrun.py` shows exactly what going multi-process changes.
"""

import argparse
import contextlib
import gc
import json
import os
import sys
import threading
import time

import torch
import torch.nn as nn
from torch.utils.data import Dataset, TensorDataset

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
SNAPSHOT = "snapshot.pt"
PREVIOUS_SNAPSHOT = "snapshot.prev.pt"


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback."""


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", default=None, help="where mnist/cifar10 live (downloaded there if missing)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", default=None, help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 + GradScaler on GPUs without bf16)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds, or will hold, the dataset)")
    if args.num_workers < 0:
        p.error("--num-workers must be >= 0")
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def run(main, *args, rank=None):
    """Call main(*args); turn a RecipeError into one clear line and exit 2 instead of a traceback wall."""
    try:
        main(*args)
        # DDP keeps reference cycles that hold the process group. Left to the interpreter's shutdown, they are
        # freed when gloo's threads can no longer be joined, and the process aborts ("terminate called without
        # an active exception") after a successful run. Free them now, while everything is still alive.
        gc.collect()
    except RecipeError as e:
        if rank is None:
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        log(rank, f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def deadline(seconds, rank, what):
    """Exit with a clear message if the block has not finished after `seconds`.

    Some failures block inside C++ where no timeout reaches, e.g. a rank that connected to a MASTER_PORT that
    another program is listening on waits for an answer forever. A dead or missing rank must never hang a job.
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


@contextlib.contextmanager
def explained_rendezvous(rank, world_size, timeout):
    """Around init_process_group: turn the ways a rendezvous fails into one line that says what to check."""
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"rendezvous at {addr} (are all {world_size} ranks started, MASTER_ADDR reachable from every node, "
            f"MASTER_PORT used by nothing else?)")
    try:
        with deadline(timeout, rank, what):
            yield
    except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {timeout}s")
        raise RecipeError(f"rendezvous at {addr} failed: {hint} ({str(e).splitlines()[0][:200]})") from None


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


# ---------------------------------------------------------------------------------------------------- model


class ConvNet(nn.Module):
    """A small CNN: big enough that a training step is real work, small enough for a CPU smoke test."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # same head for 28x28 (MNIST) and 32x32 (CIFAR-10) inputs
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(dataset):
    return ConvNet(in_channels=dataset.in_channels, num_classes=10)


# ---------------------------------------------------------------------------------------------------- data


def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise).

    Generated from its own seed, so every rank and every run builds the identical dataset without any file.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    images = prototypes[labels] + torch.randn(size, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


def torchvision_dataset(name, root, download):
    """MNIST or CIFAR-10 training split through torchvision, in its standard on-disk format."""
    import torchvision  # imported here: synthetic runs do not need torchvision at all
    from torchvision import transforms

    if name == "mnist":
        cls, norm = torchvision.datasets.MNIST, transforms.Normalize((0.1307,), (0.3081,))
    else:
        cls, norm = torchvision.datasets.CIFAR10, transforms.Normalize((0.4914, 0.4822, 0.4465),
                                                                        (0.2470, 0.2435, 0.2616))
    try:
        return cls(root, train=True, download=download, transform=transforms.Compose([transforms.ToTensor(), norm]))
    except (RuntimeError, OSError) as e:  # torchvision says "Dataset not found" or the download failed
        hint = "" if download else " (only the first rank downloads; it failed or has not run)"
        raise RecipeError(f"cannot load {name} from {root!r}: {e}{hint}") from None


def build_dataset(args, download):
    """The training set. `download` is True on exactly one process per job, so ranks never race on files."""
    if args.data == "synthetic":
        ds = synthetic_dataset(args.dataset_size)
        ds.in_channels = 1
        return ds
    ds = torchvision_dataset(args.data, args.data_dir, download)
    ds.in_channels = 1 if args.data == "mnist" else 3
    return ds


def check_dataset_fits(dataset: Dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // (world_size * batch_size) == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


# ---------------------------------------------------------------------------------------------------- training


def autocast_and_scaler(device, enabled):
    """bf16 autocast where bf16 exists (CPUs, Ampere+ GPUs); fp16 + GradScaler on older GPUs."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def build_optimizer(model, args, steps_per_epoch):
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # The schedule spans --epochs. --max-steps only stops early, so a run cut short by it (or by a crash, or by
    # preemption) and then resumed follows exactly the same learning-rate curve as an uninterrupted one.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    return optimizer, scheduler


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file). Off by default."""

    def __init__(self, path, device):
        self.path, self.device, self.times = path, device, []
        self.start = time.time()

    def step(self):
        if self.path:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # only when timing: a sync per step costs throughput
            self.times.append(time.time())

    def write(self, **info):
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"start_time": self.start, "step_end_times": self.times, **info}, f)


def training_left(state, args):
    return state["epoch"] < args.epochs and not (args.max_steps and state["step"] >= args.max_steps)


def settle_ddp_buckets(model, loader, device):
    """One throw-away backward pass before a resumed DDP run trains, so that its gradients are summed in the
    same order as in the uninterrupted run.

    DDP lays its gradient buckets out anew after the first backward of every process. An uninterrupted run
    has done that long before step k; a run resumed at step k would do its first step with the initial
    layout, and with more than 2 ranks a different layout adds the same numbers in a different order: the
    weights differ in the last bits, and training can amplify that. The gradients of this pass are discarded
    and the optimizer is not stepped. (This model has no BatchNorm or dropout; with those, mind their state.)
    Only call it when training follows: a process that ends right after it can abort at exit.
    """
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- snapshots


def capture_rng():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_snapshot(checkpoint_dir, snapshot):
    """Write atomically: a crash mid-write leaves the last good snapshot in place, never half a file.

    The previous snapshot is kept as snapshot.prev.pt so that a snapshot damaged later (a full disk, a
    truncated copy) still leaves something to resume from.
    """
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, SNAPSHOT)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(snapshot, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        os.replace(final, os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))
    os.replace(tmp, final)


def read_snapshot(path, map_location):
    """weights_only=True: a snapshot is data; unpickling arbitrary objects from a shared filesystem is not safe."""
    return torch.load(path, map_location=map_location, weights_only=True)


def find_snapshot(checkpoint_dir):
    """The newest readable snapshot in checkpoint_dir, or None when there is none yet.

    A damaged snapshot is named in a warning and the previous one is used; if none is readable, that is an
    error (starting from scratch silently would throw the finished work away and then overwrite it).
    """
    if not checkpoint_dir:
        return None
    candidates = [os.path.join(checkpoint_dir, n) for n in (SNAPSHOT, PREVIOUS_SNAPSHOT)]
    existing = [p for p in candidates if os.path.exists(p)]
    problems = []
    for path in existing:
        try:
            # mmap: a truncated or damaged file fails here (its zip index is at the end) without reading all the
            # weights, which the caller loads next onto its own device.
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated zip, wrong format, unexpected pickled objects, ...
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            print(f"warning: {problems[-1]}; trying the previous snapshot", file=sys.stderr, flush=True)
            continue
        return path
    if problems:
        raise RecipeError("no usable snapshot: " + "; ".join(problems) +
                          ". Delete or move the damaged file(s) to start over.")
    return None
