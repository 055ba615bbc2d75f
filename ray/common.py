"""What every ray/ recipe shares: the command line, the model, the data, the training loop (`Trainer`), the
snapshot directories, and the Ray driver that runs the loop on N workers (`fit_on_ray`).

The training loop is written once and runs in two places: in the one process of single_gpu.py, and inside each
Ray Train worker of multigpu.py / multinode.py. What differs between them is behind a small `Session`: who the
process is (rank, world size), where its log lines go, how a snapshot is stored and how a stop request arrives.

    LocalSession  one process: print, write the snapshot directory itself, take SIGUSR1/SIGTERM directly
    RaySession    a Ray Train worker: lines go to the driver through the run's control actor, snapshots through
                  ray.train.report(checkpoint=...), the stop request through the same actor

Ray is imported lazily: single_gpu.py runs without starting (or even importing) Ray.
"""

import argparse
import contextlib
import json
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
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
SNAPSHOT = "snapshot.pt"
# --checkpoint-dir D holds D/train/checkpoint_*/snapshot.pt: Ray Train's layout (RunConfig(storage_path=D,
# name="train") and one directory per reported Checkpoint). single_gpu.py writes the same layout itself.
RUN_NAME = "train"
KEEP_SNAPSHOTS = 2  # the newest and the one before it (a damaged newest falls back to it)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback."""


# ---------------------------------------------------------------------------------------------------- command line


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
    """Bad input is one line on stderr and exit 2 (CONTRACT.md C4), not a usage block."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


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
    p.add_argument("--data-dir", default=None, help="directory that holds train.npz (--data npz)")
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
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with many processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def run(main, *args):
    """Call main(*args): a RecipeError becomes one `error:` line on stderr and exit 2 instead of a traceback."""
    try:
        main(*args)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


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


def build_dataset(args):
    dataset = synthetic_dataset(args.dataset_size) if args.data == "synthetic" else npz_dataset(args.data_dir)
    dataset.in_channels = dataset.tensors[0].shape[1]
    return dataset


def check_dataset_fits(dataset: Dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some workers would get no data")
    if n // (world_size * batch_size) == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} workers x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


def ignore_stop_signals(worker_id=None):
    """DataLoader workers (and Ray's worker processes) leave SIGUSR1/SIGTERM to the process that decides."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset, rank, world_size, args):
    """Each rank reads a disjoint shard, reshuffled every epoch from (seed, epoch); the tail that does not divide
    evenly and the last incomplete batch are dropped (CONTRACT.md C5). With one rank: one shard holding all."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_stop_signals)


# ---------------------------------------------------------------------------------------------------- precision


def mixed_precision(device, enabled):
    """(autocast context factory, GradScaler or None) for --amp: bf16 where native (CPUs, GPUs of compute
    capability >= 8.0), else fp16 + GradScaler (CONTRACT.md C10)."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), torch.amp.GradScaler(device.type)


# ---------------------------------------------------------------------------------------------------- snapshots


def snapshot_dirs(checkpoint_dir):
    """The snapshot directories under --checkpoint-dir (Ray's `checkpoint_*` under the run name)."""
    root = os.path.join(checkpoint_dir, RUN_NAME)
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, n) for n in os.listdir(root)  # (not Ray's checkpoint_manager_snapshot.json)
            if n.startswith("checkpoint_") and os.path.isdir(os.path.join(root, n))]


def read_snapshot(directory, map_location="cpu"):
    """weights_only=True: a snapshot is data; unpickling arbitrary objects from a shared filesystem is not safe."""
    return torch.load(os.path.join(directory, SNAPSHOT), map_location=map_location, weights_only=True)


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


def write_snapshot_dir(directory, snapshot):
    """snapshot.pt into `directory`, flushed to disk (the directory is then handed to Ray or renamed)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SNAPSHOT), "wb") as f:
        torch.save(snapshot, f)
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------------- sessions


class LocalSession:
    """One process, no Ray: print the lines, write Ray's directory layout atomically (temporary directory, fsync,
    rename), keep the newest KEEP_SNAPSHOTS, and take SIGUSR1/SIGTERM directly."""

    rank, world_size = 0, 1

    def __init__(self, args):
        self.checkpoint_dir, self.stop_requested = args.checkpoint_dir, False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.stop_requested = True

    def log(self, message):
        log(self.rank, message)

    def should_stop(self):
        return self.stop_requested

    def resume_from(self):
        return find_snapshot(self.checkpoint_dir)

    def save(self, snapshot):
        root = os.path.join(self.checkpoint_dir, RUN_NAME)
        final = os.path.join(root, f"checkpoint_{snapshot['step']:09d}")
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=ensure_dir(root))
        write_snapshot_dir(tmp, snapshot)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        by_step = sorted(snapshot_dirs(self.checkpoint_dir), key=lambda d: d.rsplit("_", 1)[-1])
        for old in by_step[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self):
        pass


def ensure_dir(path):
    os.makedirs(path, exist_ok=True)
    return path


class RaySession:
    """Inside a Ray Train worker. Ray set up the process group (gloo/nccl) before the loop started.

    Log lines go to the driver through the run's control actor: Ray would prefix a worker's own stdout with
    `(RayTrainWorker pid=..., ip=...)`, and a worker on another node has no stdout in the job log at all.
    Every rank calls ray.train.report at the same points (Ray requires it); only rank 0 hands over a checkpoint.
    """

    def __init__(self, config):
        import ray.train

        self.train = ray.train
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        # The driver takes SIGUSR1/SIGTERM and passes the request on through the control actor. (The loop runs
        # in a thread of the worker process, where no signal handler can be installed.)
        self.control, self.resume_path, self.args = config["control"], config["resume_from"], config["args"]

    def log(self, message):
        self.control.log.remote(f"[rank{self.rank}] {message}")

    def should_stop(self):
        import ray

        return self.rank == 0 and ray.get(self.control.stop_requested.remote())

    def resume_from(self):
        """Rank 0 chooses, the others follow (ranks must never disagree about where they start): the furthest
        along of the driver's choice, the checkpoint Ray restored after restarting the workers (FailureConfig),
        and the newest readable snapshot on disk -- Ray registers a reported checkpoint only when its controller
        next polls the workers, so a worker that dies right after a report can leave a complete snapshot on
        disk that Ray does not know about."""
        choice = [None]
        if self.rank == 0:
            checkpoint = self.train.get_checkpoint()
            on_disk = find_snapshot(self.args.checkpoint_dir)
            candidates = [p for p in (self.resume_path, checkpoint.path if checkpoint else None, on_disk) if p]
            choice[0] = max(candidates, key=snapshot_step) if candidates else None
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        return choice[0]

    def save(self, snapshot):
        with tempfile.TemporaryDirectory(prefix="ray-snapshot-") as tmp:
            checkpoint = None
            if self.rank == 0:
                write_snapshot_dir(tmp, snapshot)
                checkpoint = self.train.Checkpoint.from_directory(tmp)
            # Ray copies the directory into RunConfig.storage_path before report returns
            self.train.report({"step": snapshot["step"], "epoch": snapshot["epoch"]}, checkpoint=checkpoint)

    def close(self):
        import ray

        ray.get(self.control.flush.remote())  # every line sent before this one has been printed


# ---------------------------------------------------------------------------------------------------- training


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file, rank 0)."""

    def __init__(self, path, device, world_size, batch_size):
        self.path, self.device, self.times = path, device, []
        self.info = {"world_size": world_size, "batch_size": batch_size}
        self.start = time.time()

    def __call__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.time())

    def write(self):
        with open(self.path, "w") as f:
            json.dump({"start_time": self.start, "step_end_times": self.times, **self.info}, f)


class Trainer:
    """The training loop, in the shape of the PyTorch DDP tutorial series (`_run_batch`, `_run_epoch`,
    `_save_snapshot`) plus what a job on a real cluster needs: exact resume (even mid-epoch), preemption, metrics
    over all ranks. The session says who this process is and where lines, snapshots and stop requests go."""

    CHECK_EVERY = 10  # steps between "stop requested?" checks: one tiny all_reduce, nothing next to a step

    def __init__(self, model, loader, args, device, session):
        self.model, self.loader, self.args, self.device, self.session = model, loader, args, device, session
        self.rank, self.world_size = session.rank, session.world_size
        self.distributed = self.world_size > 1
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=args.epochs * len(loader))
        self.autocast, self.scaler = mixed_precision(device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0  # progress: what a snapshot must restore
        self.preempted = False
        self.timer = StepTimer(args.timings_file, device, self.world_size, args.batch_size) \
            if args.timings_file and self.rank == 0 else None

    def train(self):
        """Train what is left; returns "done" or "preempted" (the driver turns the latter into exit 75)."""
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
                return "preempted"
        if self.timer:
            self.timer.write()
        self._log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")
        return "done"

    def _training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def _run_epoch(self):
        epoch_start = time.perf_counter()
        self.loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats the same order
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
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
            if (self.args.max_steps and self.step >= self.args.max_steps) or self._stop_agreed():
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

    def _stop_agreed(self):
        """Every CHECK_EVERY steps: has a stop been requested? Only rank 0 asks, then all ranks agree (all_reduce
        MAX) so that they stop after the same step; ranks asking on their own could disagree and deadlock."""
        if self.step % self.CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.session.should_stop()), device=self.device)
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.preempted = bool(flag.item())
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
            self.session.log(message)

    def _bare_model(self):
        return self.model.module if isinstance(self.model, DDP) else self.model

    def _save_snapshot(self):
        snap = {"model": self._bare_model().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                "rng": {"torch": torch.get_rng_state()}}
        if self.scaler is not None:
            snap["scaler"] = self.scaler.state_dict()
        self.session.save(snap)
        self._log(f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")

    def _resume(self):
        path = self.session.resume_from()
        if path is None:
            return
        snap = read_snapshot(path, map_location=self.device)
        self._bare_model().load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        torch.set_rng_state(snap["rng"]["torch"].cpu())
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        self._log(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")


# ---------------------------------------------------------------------------------------------------- Ray driver


def add_ray_flags(parser):
    """Flags of the scripts that run the loop on Ray workers (multigpu.py, multinode.py)."""
    parser.add_argument("--max-failures", type=non_negative_int, default=3,
                        help="times Ray replaces a dead worker and restarts from the last checkpoint "
                             "(FailureConfig) before the run fails")


def train_worker(config):
    """What each Ray Train worker runs (TorchTrainer's train_loop_per_worker): Ray has already started this
    process, set up the process group and chosen its device; the rest is the single-process recipe."""
    import ray.train.torch

    args, session = config["args"], RaySession(config)
    torch.manual_seed(args.seed)
    device = ray.train.torch.get_device()
    dataset = build_dataset(args)
    loader = build_loader(dataset, session.rank, session.world_size, args)
    # prepare_model: move to the worker's device and wrap in DistributedDataParallel (not with one worker)
    model = ray.train.torch.prepare_model(ConvNet(in_channels=dataset.in_channels))
    # One line per rank: where each rank landed is the first question when a multi-node run misbehaves.
    session.log(f"host {socket.gethostname()} | ip {ray.util.get_node_ip_address()} | pid {os.getpid()} | "
                f"device {device} | world size {session.world_size}")
    status = Trainer(model, loader, args, device, session).train()
    if session.rank == 0:
        config["control"].finish.remote(status)
    session.close()


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


# Set by SIGUSR1/SIGTERM in a driver. The handler only sets it: Ray calls happen in DriverPump's thread.
STOP_REQUESTED = threading.Event()


def catch_stop_signals():
    """In a driver: SIGUSR1/SIGTERM request a stop instead of killing the process. Called first thing and again
    after ray.init, which installs its own SIGTERM handler in a driver that starts a cluster."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: STOP_REQUESTED.set())


class DriverPump(threading.Thread):
    """In the driver, beside trainer.fit(): prints the workers' lines as they arrive and passes a stop request
    (SIGUSR1/SIGTERM to the driver) on to the workers through the control actor."""

    def __init__(self, control):
        super().__init__(daemon=True)
        self.control, self.done, self.stop_sent = control, threading.Event(), False

    def run(self):
        while not self.done.wait(0.2):
            self.pump()

    def pump(self):
        import ray

        if STOP_REQUESTED.is_set() and not self.stop_sent:
            ray.get(self.control.request_stop.remote())
            self.stop_sent = True
        for line in ray.get(self.control.drain.remote()):
            print(line, flush=True)

    def finish(self):
        self.done.set()
        self.join()
        self.pump()  # the lines that arrived after the last poll


def fit_on_ray(args, num_workers, placement_strategy="PACK"):
    """Run the training loop on `num_workers` Ray Train workers of the cluster this driver is connected to, and
    exit the way the contract says: 0 done, 75 preempted (snapshot saved), 2 bad input."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Bad input fails here, in the driver, before any worker starts: one line instead of a worker's traceback.
    check_dataset_fits(build_dataset(args), num_workers, args.batch_size)
    resume_from = find_snapshot(args.checkpoint_dir)
    use_gpu = torch.cuda.is_available() if args.backend == "auto" else args.backend == "nccl"
    control = make_control_actor()
    pump = DriverPump(control)
    # Without --checkpoint-dir nothing is saved, but Ray Train still wants a storage path for the run's state.
    storage = args.checkpoint_dir or tempfile.mkdtemp(prefix="ray-train-")
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"args": args, "control": control, "resume_from": resume_from},
        torch_config=TorchConfig(backend=pick_backend(args.backend), timeout_s=args.timeout),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1},
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=KEEP_SNAPSHOTS)),
    )
    pump.start()
    try:
        trainer.fit()
    finally:
        pump.finish()
        if not args.checkpoint_dir:
            shutil.rmtree(storage, ignore_errors=True)
    if ray.get(control.result.remote()) == "preempted":
        sys.exit(PREEMPTED_EXIT_CODE)


def ray_environment(own_cluster):
    """Settings for the Ray processes this driver starts or talks to (set before `import ray`: Ray reads the
    authentication mode once, at import).

    - Token authentication: a cluster this process starts itself (own_cluster) gets a token made for this run
      (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN) unless the caller already chose. Ray's default would write
      ~/.ray/auth_token, one token for every cluster of the user. A driver joining a cluster takes the token from
      the environment, as the job that started the cluster exported it (multinode.sbatch does).
    - No usage statistics: a call to the internet from every compute node.
    """
    import secrets

    if own_cluster and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def ray_logs_to_driver():
    """Ray's own messages from workers and the Train controller (prefixed `(RayTrainWorker pid=...)`) stay in the
    session's log files unless RAY_RECIPE_LOGS=1: the job log holds the recipe's `[rankN]` lines only."""
    return os.environ.get("RAY_RECIPE_LOGS") == "1"


@contextlib.contextmanager
def local_ray(num_cpus):
    """A Ray cluster of one node, started by this process and ended with it (ray.shutdown stops exactly the
    processes ray.init started). Its temporary directory is short and its own: Ray puts Unix sockets in it,
    whose paths may not exceed ~107 characters, and two runs must not share a session directory."""
    ray_environment(own_cluster=True)
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, object_store_memory=OBJECT_STORE_BYTES,
             log_to_driver=ray_logs_to_driver(), logging_level="warning")
    catch_stop_signals()
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
    catch_stop_signals()
    try:
        yield
    finally:
        ray.shutdown()  # disconnects; the cluster belongs to whoever started it (the job script)


# The recipes pass only small objects through Ray's object store; Ray's default (30% of RAM, in /dev/shm) fails
# or falls back to slow disk in containers and on small nodes with a small /dev/shm.
OBJECT_STORE_BYTES = 256 * 1024**2
