"""What every pytorch/ recipe shares: the command line, the model, the data, the training loop (`Trainer`) and
the snapshot file.

How processes start, which sampler gives a rank its shard and how the model is wrapped (DDP, FSDP) stays in the
scripts themselves, so that `diff single_gpu.py multigpu_torchrun.py` shows exactly what going multi-process
changes. The Trainer only asks "is there more than one rank?" where the answer changes what it must do (reduce
the metrics, let one rank write the snapshot, agree on when to stop).
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2 (CONTRACT.md C4), not a usage block: with 512 ranks each
    printing the usage, the actual complaint is lost."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (CONTRACT.md C2: same in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", default=None, help="where mnist/cifar10 live (downloaded there if missing)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", default=None,
                   help="snapshots go here and resume from here is automatic (default: none, nothing is saved)")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on CPUs and GPUs that do it natively (compute capability >= 8.0), "
                        "else fp16 with a GradScaler")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--rendezvous-timeout", type=positive_int, default=None,
                   help="seconds the ranks wait for each other at start-up (default: --timeout). Raise it where "
                        "ranks start far apart (hundreds of nodes, container pulls) and keep --timeout short: "
                        "it then bounds only the collectives, so a dead peer is an error sooner")
    p.add_argument("--io-timeout", type=positive_int, default=1800,
                   help="seconds the other ranks wait while rank 0 alone downloads data or writes a snapshot")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.rendezvous_timeout = args.rendezvous_timeout or args.timeout
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds, or will hold, the dataset)")
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def run(main, *args, rank=None):
    """Call main(*args) the way every script's entry point needs it:

    - SIGUSR1/SIGTERM are caught from the first line on (a signal during start-up must not kill the process
      before it can save anything; the Trainer acts on it at a step boundary);
    - a RecipeError becomes one clear line and exit 2 instead of a traceback wall;
    - the process group, if main created one, is destroyed on the way out, so the scripts need no try/finally.
    """
    PREEMPTION.install()
    if rank is None:
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    try:
        main(*args)
    except RecipeError as e:
        log(rank, f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        if not (gist := lost_a_peer(e)):
            raise
        # Not this rank's fault: another process of the job (or its node) died, and this rank's next collective
        # failed. Its own log says why; the last snapshot is intact (written atomically), and the job's requeue
        # (Slurm requeues a --requeue job after a node failure) or a resubmission resumes from it.
        log(rank, f"error: lost contact with another rank ({gist}): a process or node of the job died; "
                  f"see its log. The last snapshot is intact: a requeued or resubmitted run resumes from it",
            file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            leave_process_group()


def lost_a_peer(error):
    """The gist of a collective that failed because a peer is gone (gloo: "Connection reset/closed by peer",
    "Timed out waiting ... for recv"; NCCL: a DistBackendError), or "" for any other error."""
    text = str(error).strip()
    if not (dist.is_initialized() and (isinstance(error, dist.DistError) or "gloo/transport" in text)):
        return ""
    text = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else type(error).__name__)  # "[pair.cc:537] "
    return text.split(". This is typically")[0][:200]


def leave_process_group():
    """Free the DDP model, then destroy the process group -- in that order, or a finished run can hang or abort
    at exit. DDP's C++ Reducer holds the process group. Freed last (by the interpreter's shutdown, or by DDP's
    reference cycles collected after the destroy), gloo's destructor runs with the GIL held and joins its
    threads, while one of them may wait for the GIL to free the tensors of the last collective: a deadlock
    (seen with one CPU core per torchrun step in Slurm) or "terminate called without an active exception".
    destroy_process_group() drops the last reference without holding the GIL."""
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model
    gc.collect()  # DDP's reference cycles
    dist.destroy_process_group()


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
                else f"not all {world_size} ranks reached it within --rendezvous-timeout {timeout}s")
        raise RecipeError(f"rendezvous at {addr} failed: {hint} ({str(e).splitlines()[0][:200]})") from None


@functools.cache
def rank0_wait_group(io_timeout):
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout))


def wait_for_rank0(io_timeout):
    """Where the other ranks wait while rank 0 alone downloads the data or writes a snapshot. Not a barrier on
    the training process group: its --timeout is the watchdog for collectives (a dead peer must be an error
    within it), and a download or a save to a slow shared filesystem can take longer. A gloo group of its own,
    made on first use (every rank gets here at the same points), waits up to --io-timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier(group=rank0_wait_group(io_timeout))


def rendezvous_store(rank, world_size, timeout):
    """init_process_group's keyword arguments: the store where the ranks meet at MASTER_ADDR:MASTER_PORT, waiting
    up to `timeout` (--rendezvous-timeout) for each other; the collectives get init_process_group's own timeout.

    Under torchrun the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE) and every worker is a client. A worker
    that torchrun --max-restarts restarted meets the others in that store, which still holds the keys the failed
    attempt wrote: a new worker can read a dead worker's address from them and fail with "Gloo connectFullMesh
    failed ... Connection refused" (torch 2.13, about 2 restarts in 5 on CPU; the same with NCCL:
    pytorch/pytorch#167288). A key prefix per attempt hides the old keys. Only with one torchrun (one agent):
    across nodes the agents count restarts differently (only the one whose worker failed counts it), so there the
    job restarts through Slurm (multinode_torchrun.sbatch requeues). Without torchrun (srun), rank 0 hosts it."""
    addr, port, wait = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(addr, port, world_size, is_master=False, timeout=wait)
        if os.environ.get("GROUP_WORLD_SIZE") == "1" and "TORCHELASTIC_RESTART_COUNT" in os.environ:
            store = dist.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=wait, multi_tenant=True)
    return {"store": store, "rank": rank, "world_size": world_size}


def torchrun_env():
    """(rank, local_rank, world_size) from the variables torchrun sets; a clear error when they are missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    missing = [n for n in names if n not in os.environ]
    if missing:
        script = os.path.basename(sys.argv[0])
        raise RecipeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc_per_node N {script}` "
                          f"(or set all of {', '.join(names)})")
    return tuple(int(os.environ[n]) for n in names)


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
        hint = "" if download else " (only rank 0 and the first rank of each node that cannot see rank 0's copy " \
                                   "download; it failed or has not run)"
        raise RecipeError(f"cannot load {name} from {root!r}: {e}{hint}") from None


def build_dataset(args, download):
    """The training set. `download` is True on one process per copy of --data-dir (fetch_dataset), so ranks
    never race on files."""
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


def build_loader(dataset, sampler, args):
    """The DataLoader every script uses; the sampler (which shard, which order) is the script's choice.

    drop_last: the last incomplete batch is dropped (CONTRACT.md C5), so every rank does the same number of
    steps. Workers ignore SIGUSR1/SIGTERM: Slurm signals every process of a step, and a worker killed by it makes
    the main process raise at an arbitrary line instead of saving a snapshot; the main process decides.
    """
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_preemption_signals)


def ignore_preemption_signals(worker_id):
    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def bf16_is_native(device):
    """bf16 on CPUs and on GPUs of compute capability >= 8.0 (Ampere+). torch.cuda.is_bf16_supported() also
    says yes on V100/T4, where bf16 is emulated and slower than fp16 (CONTRACT.md C10)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def mixed_precision(device, enabled):
    """(autocast context factory, GradScaler or None) for --amp: bf16 where native, else fp16 + GradScaler
    (fp16's narrow range underflows small gradients unless the loss is scaled)."""
    if not enabled:
        return contextlib.nullcontext, None
    if bf16_is_native(device):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), torch.amp.GradScaler(device.type)


def allow_tf32():
    """fp32 matmuls and convolutions in TF32 on Ampere+ GPUs: inputs rounded to a 10-bit mantissa, accumulation
    in fp32 -- about twice the matmul throughput for a precision loss training does not notice. No effect on
    CPUs or older GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model, args, steps_per_epoch):
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    # The schedule spans --epochs. --max-steps only stops early, so a run cut short by it (or by a crash, or by
    # preemption) and then resumed follows exactly the same learning-rate curve as an uninterrupted one.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    return optimizer, scheduler


class PreemptionFlag:
    """Remembers that Slurm asked us to stop (SIGUSR1 before the time limit, SIGTERM on preemption or scancel);
    the Trainer acts on it at a step boundary.

    Saving inside the signal handler would interrupt a collective half-way; instead every rank checks the flag
    every CHECK_EVERY steps and all of them agree (all_reduce MAX) on the same step to stop at.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    CHECK_EVERY = 10  # a tiny all_reduce every 10 steps costs nothing next to the step itself

    def __init__(self):
        self.requested = False

    def install(self):
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, step, device, distributed):
        if step % self.CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.requested), device=device)
        if distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


PREEMPTION = PreemptionFlag()


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file, rank 0). A Trainer step hook:
    the training loop itself knows nothing about it."""

    def __init__(self, path, device, world_size, batch_size):
        self.path, self.device, self.times = path, device, []
        self.info = {"world_size": world_size, "batch_size": batch_size}
        self.start = time.time()

    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # only when timing: a sync per step costs throughput
        self.times.append(time.time())

    def write(self):
        with open(self.path, "w") as f:
            json.dump({"start_time": self.start, "step_end_times": self.times, **self.info}, f)


class Trainer:
    """The training loop every script in this folder shares, in the shape of the PyTorch DDP tutorial series:
    `_run_batch`, `_run_epoch`, `_save_snapshot`, plus what a job on a real cluster needs (exact resume, even
    mid-epoch; preemption; metrics over all ranks).

    The script hands in a model already placed and wrapped (DDP, FSDP or nothing), a loader whose sampler gives
    this rank its shard, and the rank. With one rank nothing is reduced, broadcast or waited for.
    """

    def __init__(self, model, loader, args, device, rank=0, world_size=1):
        self.model, self.loader, self.args, self.device = model, loader, args, device
        self.rank, self.world_size, self.distributed = rank, world_size, world_size > 1
        self.optimizer, self.scheduler = build_optimizer(model, args, len(loader))
        self.autocast, self.scaler = mixed_precision(device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0  # progress: what a snapshot must restore
        self.preempted = False
        # Step hooks: the benchmarks' timer, off unless --timings-file is given.
        self.timer = StepTimer(args.timings_file, device, world_size, args.batch_size) \
            if args.timings_file and rank == 0 else None

    # ------------------------------------------------------------------------------------------ the loop

    def train(self):
        self._resume()
        start = time.perf_counter()
        while self._training_left():
            self._run_epoch()
            finished = not self._training_left()
            if self.args.checkpoint_dir and (finished or self.preempted or self.epoch % self.args.save_every == 0):
                self._save_snapshot()
            if self.preempted:
                self._log(f"preempted at step {self.step}: "
                          f"{'snapshot saved' if self.args.checkpoint_dir else 'no --checkpoint-dir, nothing saved'}"
                          f"; exiting with {PREEMPTED_EXIT_CODE} so the job script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        if self.timer:
            self.timer.write()
        self._log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")

    def _training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def _run_epoch(self):
        epoch_start = time.perf_counter()
        self.loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats the same order
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
        # Totals stay on the device: reading a value (.item()) every step would stall the GPU each time.
        totals, seen = torch.zeros(2, device=self.device), 0  # loss x samples, correct predictions; samples
        self.model.train()
        for i, (x, y) in enumerate(self.loader):
            if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
                continue
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss, correct = self._run_batch(x, y)
            self.step, self.batch_in_epoch = self.step + 1, i + 1
            if self.timer:
                self.timer()
            totals += torch.stack([loss * len(y), correct])
            seen += len(y)
            if self.rank == 0 and self.step % self.args.log_every == 0:  # .item() syncs: rank 0 only
                self._log(f"epoch {self.epoch + 1} | batch {i + 1}/{len(self.loader)} | step {self.step} | "
                          f"loss {loss.item():.4f}")
            if (self.args.max_steps and self.step >= self.args.max_steps) or self._preemption_agreed():
                break
        self._report_epoch(totals, seen, time.perf_counter() - epoch_start)
        if self.batch_in_epoch == len(self.loader):  # the epoch ran to its end (not cut short)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _run_batch(self, x, y):
        with self.autocast():
            logits = self.model(x)
            loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # fp16: scale the loss so small gradients do not underflow
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()  # under DDP, gradients are averaged across ranks during backward
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach().float(), (logits.argmax(1) == y).sum().float()

    def _preemption_agreed(self):
        self.preempted = PREEMPTION.agreed(self.step, self.device, self.distributed)
        return self.preempted

    def _report_epoch(self, totals, seen, elapsed):
        totals = torch.cat([totals, torch.tensor([float(seen)], device=self.device)])
        if self.distributed:
            dist.all_reduce(totals)  # one collective per epoch: metrics over all ranks, not just rank 0's
        loss_sum, correct, seen = totals.tolist()
        if seen:
            self._log(f"epoch {self.epoch + 1}/{self.args.epochs} | step {self.step} | loss {loss_sum / seen:.4f} | "
                      f"acc {correct / seen:.4f} | {seen / elapsed:.0f} samples/s | {elapsed:.1f} s")

    def _log(self, message):
        if self.rank == 0:
            log(0, message)

    # ------------------------------------------------------------------------------------------ snapshots

    def _snapshot(self):
        model = self.model.module if isinstance(self.model, DDP) else self.model
        snap = {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                "batch_size": self.args.batch_size, "rng": capture_rng()}
        if self.scaler is not None:
            snap["scaler"] = self.scaler.state_dict()
        return snap

    def _save_snapshot(self):
        if self.rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
            save_snapshot(self.args.checkpoint_dir, self._snapshot())
            log(0, f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")
        if self.distributed:
            wait_for_rank0(self.args.io_timeout)  # nobody reads or restarts before the file is complete

    def _resume(self):
        if self.distributed and self.args.checkpoint_dir:
            check_shared_directory(self.args.checkpoint_dir, self.rank)
        # Rank 0 decides which snapshot to use and tells the others: on a shared filesystem ranks can disagree
        # about whether a file exists, and a job where only some ranks resume deadlocks.
        choice = [find_snapshot(self.args.checkpoint_dir) if self.rank == 0 else None]
        if self.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return
        snap = read_snapshot(choice[0], map_location=self.device)  # each rank onto its own device
        model = self.model.module if isinstance(self.model, DDP) else self.model
        model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        restore_rng(snap["rng"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        self._adapt_to_another_shape(snap, choice[0])
        if isinstance(self.model, DDP) and self._training_left():
            with self.autocast():  # as in training: fp32 activations would need twice the memory once
                settle_ddp_buckets(self.model, self.loader, self.device)  # same gradient order as without a restart
        self._log(f"resumed from {choice[0]}: epoch {self.epoch + 1}, step {self.step}")


    def _adapt_to_another_shape(self, snap, path):
        """A snapshot written by another number of ranks or another per-rank batch (a job requeued onto fewer or
        more GPUs): every rank's shard, and the steps per epoch, are different now. Every layout reads the epoch's
        samples in the same seeded order (rank r takes every world_size-th one), so the samples trained so far are
        a prefix of that order: resume after the same prefix when it is a whole number of the new global batches,
        and continue the learning-rate curve at the same point; otherwise refuse. Counting the old per-rank
        batches under the new layout would silently train on the wrong samples."""
        old = (snap["world_size"], snap.get("batch_size", self.args.batch_size))
        if old == (self.world_size, self.args.batch_size):
            return
        done = self.batch_in_epoch * old[0] * old[1]  # samples of the current epoch already trained on
        global_batch = self.world_size * self.args.batch_size
        if done % global_batch:
            raise RecipeError(f"{path} was written by {old[0]} rank(s) x batch {old[1]} after {done} samples of epoch "
                              f"{self.epoch + 1}, not a whole number of batches of {self.world_size} x "
                              f"{self.args.batch_size}: resume with {old[0]} rank(s) x batch {old[1]} (or a shape "
                              f"that divides {done})")
        self.batch_in_epoch = done // global_batch
        self.step = self.epoch * len(self.loader) + self.batch_in_epoch
        # The cosine schedule spans --epochs in steps of the new layout: rebuild it at the same point of training.
        self.scheduler.T_max, self.scheduler.last_epoch = self.args.epochs * len(self.loader), self.step
        for group, lr in zip(self.optimizer.param_groups, self.scheduler._get_closed_form_lr(), strict=True):
            group["lr"] = lr
        self._log(f"snapshot written by {old[0]} rank(s) x batch {old[1]}, resuming as {self.world_size} x "
                  f"{self.args.batch_size}: epoch {self.epoch + 1} after {done} samples (step {self.step})")


def who_sees(path, rank):
    """Which ranks see what rank 0 writes into `path`: [(sees it, hostname)] for every rank. Collective: rank 0
    writes a probe file, every rank looks for it."""
    token = [f".probe-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(path, token[0])
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.path.exists(probe), socket.gethostname()))
    dist.barrier()
    if rank == 0:
        os.remove(probe)
    return seen


def check_shared_directory(path, rank):
    """Every rank must see what rank 0 writes into --checkpoint-dir: after a requeue each rank loads the snapshot
    from there. A node-local path (/tmp, a local scratch disk) would give the other nodes a FileNotFoundError
    while rank 0 waits in the next collective until --timeout. Checked once, collectively, with a probe file."""
    seen = who_sees(path, rank)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise RecipeError(f"--checkpoint-dir {path} is not shared: {', '.join(blind)} cannot see what rank 0 on "
                          f"{seen[0][1]} writes there; use a directory on a filesystem every node mounts")


def fetch_dataset(args, rank):
    """Download the dataset once per copy of --data-dir, before any rank reads it: rank 0 downloads, and so does
    the first rank of every node that cannot see rank 0's directory (a node-local disk: /tmp, a local scratch,
    a per-node copy staged by the job). Everybody else waits (up to --io-timeout), then reads. torchvision skips
    the download where the files are already there."""
    if args.data == "synthetic":
        return
    shared = who_sees(args.data_dir, rank)[rank][0]
    if rank == 0 or (int(os.environ.get("LOCAL_RANK", "0")) == 0 and not shared):
        build_dataset(args, download=True)
    wait_for_rank0(args.io_timeout)  # a barrier: waits for every downloader, not only rank 0


def settle_ddp_buckets(model, loader, device):
    """One throw-away backward pass before a resumed DDP run trains, so that its gradients are summed in the
    same order as in the uninterrupted run.

    DDP lays its gradient buckets out anew after the first backward of every process. An uninterrupted run
    has done that long before step k; a run resumed at step k would do its first step with the initial
    layout, and with more than 2 ranks a different layout adds the same numbers in a different order: the
    weights differ in the last bits, and training can amplify that. The gradients of this pass are discarded
    and the optimizer is not stepped. (This model has no BatchNorm or dropout; with those, mind their state.)
    """
    x, y = next(iter(loader))
    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------- snapshots


def capture_rng():
    """The CPU generator and this process's own GPU generator (not every GPU's: a process that resumes may see
    fewer devices than the one that saved, e.g. with --gpus-per-task)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


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
