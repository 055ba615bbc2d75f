"""The lesson of pytorch/, top to bottom: the model, the data, the training loop (`Trainer`, in the shape of the
PyTorch DDP tutorial series), the snapshot, and `train()`, which every script calls after its own `setup()`. The
Trainer asks "more than one rank?" only where that changes what it does. The plumbing: cluster.py (its map)."""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster import (allow_tf32, capture_rng, check_dataset_fits, check_shared_directory, explained_rendezvous,
                     mixed_precision, pick_backend, reduce_max, rendezvous_store, restore_rng, settle_ddp_buckets,
                     step_timer, torchvision_dataset, wait_for_rank0)
from toolkit import (PREEMPTED_EXIT_CODE, PREEMPTION, RecipeError, adapt_to_another_shape, atomic_write,
                     ignore_preemption_signals, log, snapshot_due)

SNAPSHOT, PREVIOUS_SNAPSHOT = "snapshot.pt", "snapshot.prev.pt"


class ConvNet(nn.Module):
    """A small CNN: big enough that a training step is real work, small enough for a CPU smoke test."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.AdaptiveAvgPool2d(4))  # one head for 28x28 (MNIST) and 32x32 (CIFAR-10)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise), generated from its
    own seed: every rank and every run builds the identical dataset without any file."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    images = prototypes[labels] + torch.randn(size, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


def build_dataset(args, rank=0):
    """Synthetic, or MNIST/CIFAR-10 on disk through torchvision (downloaded once per copy of --data-dir)."""
    dataset = synthetic_dataset(args.dataset_size) if args.data == "synthetic" else torchvision_dataset(args, rank)
    dataset.in_channels = 3 if args.data == "cifar10" else 1
    return dataset


def build_loader(dataset, args, rank=0, world_size=1):
    """Each rank reads a disjoint 1/world_size of the data, reshuffled every epoch from (seed, epoch); one process
    reads one shard holding everything, in the same order. drop_last (C5): every rank does the same steps."""
    check_dataset_fits(dataset, world_size, args.batch_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_preemption_signals)


class Trainer:
    """The tutorial's loop (`_run_batch`, `_run_epoch`, `_save_snapshot`) plus exact resume (even mid-epoch),
    preemption and metrics over all ranks, for a model already placed and wrapped (DDP, FSDP or none)."""

    def __init__(self, model, loader, args, device, rank=0, world_size=1):
        self.model, self.loader, self.args, self.device = model, loader, args, device
        self.rank, self.world_size, self.distributed = rank, world_size, world_size > 1
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        # Spans --epochs: a run cut short (--max-steps, a crash, preemption) and resumed keeps the same LR curve.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, args.epochs * len(loader))
        self.autocast, self.scaler = mixed_precision(device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0  # progress: what a snapshot must restore
        self.preempted, self.timer = False, step_timer(args, device, rank, world_size)  # timer: benchmarks' or None

    def train(self):
        self._resume()
        start = time.perf_counter()
        while self._training_left():
            self._run_epoch()
            if snapshot_due(self.args, self.step, self.epoch, last=self.preempted or not self._training_left()):
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
        # Totals stay on the device (loss x samples, correct predictions): an .item() per step would stall the GPU.
        totals, seen = torch.zeros(2, device=self.device), 0
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
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            self.preempted = PREEMPTION.agreed(self.step, reduce_max(self.device) if self.distributed else None)
            if self.preempted:  # SIGUSR1/SIGTERM on any rank: every rank stops after the same step
                break
            if snapshot_due(self.args, self.step) and i + 1 < len(self.loader):  # (an epoch's end saves in train())
                self._save_snapshot()  # --save-every-steps: mid-epoch, with the position in the epoch
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

    def _save_snapshot(self):
        if self.rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
            model = self.model.module if isinstance(self.model, DDP) else self.model
            snap = {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                    "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                    "batch_size": self.args.batch_size, "rng": capture_rng()}
            if self.scaler is not None:
                snap["scaler"] = self.scaler.state_dict()
            save_snapshot(self.args.checkpoint_dir, snap)
            log(0, f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")
        if self.distributed:
            wait_for_rank0(self.args.io_timeout)  # nobody reads or restarts before the file is complete

    def _resume(self):
        if self.distributed and self.args.checkpoint_dir:
            check_shared_directory(self.args.checkpoint_dir, self.rank)
        # Rank 0 chooses and tells the others: ranks can disagree about a file, and if only some resume, it hangs.
        choice = [find_snapshot(self.args.checkpoint_dir) if self.rank == 0 else None]
        if self.distributed:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return
        snap = torch.load(choice[0], map_location="cpu", weights_only=True)  # data only; load_state_dict copies it over
        (self.model.module if isinstance(self.model, DDP) else self.model).load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        restore_rng(snap["rng"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        adapt_to_another_shape(self, snap, choice[0], self._log)  # a job requeued onto more or fewer GPUs
        if self._training_left():  # DDP: the uninterrupted run's gradient order
            settle_ddp_buckets(self.model, self.loader, self.device, self.autocast)
        self._log(f"resumed from {choice[0]}: epoch {self.epoch + 1}, step {self.step}")


def save_snapshot(checkpoint_dir, snapshot):
    """Atomically (a crash mid-write leaves the last good snapshot, never half a file); the previous one is kept as
    snapshot.prev.pt, so that a snapshot damaged later (a full disk, a truncated copy) leaves one to resume from."""
    atomic_write(os.path.join(checkpoint_dir, SNAPSHOT), lambda f: torch.save(snapshot, f),
                 previous=os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))


def find_snapshot(checkpoint_dir):
    """The newest readable snapshot, or None. A damaged one is named in a warning and the previous one is used;
    none readable is an error (starting over silently would throw the finished work away, then overwrite it)."""
    if not checkpoint_dir:
        return None
    problems = []
    for path in filter(os.path.exists, [os.path.join(checkpoint_dir, n) for n in (SNAPSHOT, PREVIOUS_SNAPSHOT)]):
        try:  # mmap: a truncated file fails here (its zip index is at the end) without reading all the weights
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated zip, wrong format, unexpected pickled objects, ...
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            print(f"warning: {problems[-1]}; trying the previous snapshot", file=sys.stderr, flush=True)
            continue
        return path
    if problems:
        raise RecipeError(f"no usable snapshot: {'; '.join(problems)}. "
                          "Delete or move the damaged file(s) to start over.")
    return None


def init_distributed(args, rank, world_size, device):
    """Join the process group at MASTER_ADDR:MASTER_PORT. Two deadlines: --rendezvous-timeout for all ranks to
    arrive, --timeout for every later collective (a dead peer becomes an error, not a hang)."""
    backend = pick_backend(args.backend)
    with explained_rendezvous(rank, world_size, args.rendezvous_timeout, args.io_timeout):
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout),
                                device_id=device if backend == "nccl" else None,
                                **rendezvous_store(rank, world_size, args.rendezvous_timeout))


def train(args, device, rank=0, world_size=1):
    """Everything after setup, the same for every launch pattern: the data, the model (in DDP under a process
    group: gradients are averaged across ranks inside backward()) and the Trainer."""
    allow_tf32()
    torch.manual_seed(args.seed)  # the same seed on every rank: identical initial weights
    dataset = build_dataset(args, rank)
    loader = build_loader(dataset, args, rank, world_size)
    model = ConvNet(in_channels=dataset.in_channels).to(device)
    if not dist.is_initialized():
        log(0, f"device {device} | {len(dataset)} samples | batch {args.batch_size} | {len(loader)} steps/epoch")
    else:
        model = DDP(model)
        if rank == 0:
            log(0, f"world size {world_size} | backend {dist.get_backend()} | device {device} | "
                   f"{len(dataset)} samples | batch {args.batch_size}/rank | {len(loader)} steps/epoch")
    Trainer(model, loader, args, device, rank, world_size).train()
