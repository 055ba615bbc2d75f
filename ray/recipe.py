"""The lesson of ray/, top to bottom: the model, the data, the training loop (`Trainer`, the PyTorch DDP tutorial's
shape) run by single_gpu.py's one process and by every Ray Train worker, snapshots reported to Ray Train, and
`train`, which every script calls after its setup: here, or `TorchTrainer(train_worker, ...).fit()` on N workers."""

import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster import (KEEP_SNAPSHOTS, RUN_NAME, SNAPSHOT, DriverPump, LocalSession, WorkerLink, check_dataset_fits,
                     find_snapshot, make_control_actor, mixed_precision, npz_dataset, pick_backend, resumable_snapshot,
                     save_snapshot, scratch_storage, step_timer)
from toolkit import (PREEMPTED_EXIT_CODE, PREEMPTION, adapt_to_another_shape, ignore_preemption_signals, log,
                     snapshot_due)


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


def build_dataset(args):
    dataset = synthetic_dataset(args.dataset_size) if args.data == "synthetic" else npz_dataset(args.data_dir)
    dataset.in_channels = dataset.tensors[0].shape[1]
    return dataset


def build_loader(dataset, args, rank=0, world_size=1):
    """Each rank reads a disjoint shard, reshuffled every epoch from (seed, epoch); the tail that does not divide
    evenly and the last incomplete batch are dropped (CONTRACT.md C5). With one rank: one shard holding all."""
    check_dataset_fits(dataset, world_size, args.batch_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_preemption_signals)


class Trainer:
    """The tutorial's loop (`_run_batch`, `_run_epoch`, `_save_snapshot`) plus exact resume (even mid-epoch),
    preemption and metrics over all ranks. The session: who this process is, where lines, snapshots, stops go."""

    def __init__(self, model, loader, args, device, session):
        self.model, self.loader, self.args, self.device, self.session = model, loader, args, device, session
        self.rank, self.world_size, self.log = session.rank, session.world_size, session.log  # rank 0 speaks
        self.optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs * len(loader))
        self.autocast, self.scaler = mixed_precision(device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0  # progress: what a snapshot must restore
        self.preempted, self.timer = False, step_timer(args, device, self.rank, self.world_size)  # benchmarks' or None

    def train(self):
        """Train what is left; returns "done" or "preempted" (the driver turns the latter into exit 75)."""
        self._resume()
        start = time.perf_counter()
        while self._training_left():
            self._run_epoch()
            if snapshot_due(self.args, self.step, self.epoch, last=self.preempted or not self._training_left()):
                self._save_snapshot()
            if self.preempted:
                self.log(f"preempted at step {self.step}: "
                         f"{'snapshot saved' if self.args.checkpoint_dir else 'no --checkpoint-dir, nothing saved'}"
                         f"; exiting with {PREEMPTED_EXIT_CODE} so the job script requeues")
                return "preempted"
        if self.timer:
            self.timer.write()
        self.log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")
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
                self.log(f"epoch {self.epoch + 1} | batch {i + 1}/{len(self.loader)} | step {self.step} | "
                         f"loss {loss.item():.4f}")
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            self.preempted = PREEMPTION.agreed(self.step, self.session.reduce_max)
            if self.preempted:  # a stop was requested: every rank stops after the same step
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
        if self.world_size > 1:
            dist.all_reduce(totals)  # one collective per epoch: metrics over all ranks, not just rank 0's
        loss_sum, correct, seen = totals.tolist()
        if seen:
            self.log(f"epoch {self.epoch + 1}/{self.args.epochs} | step {self.step} | loss {loss_sum / seen:.4f} | "
                     f"acc {correct / seen:.4f} | {seen / elapsed:.0f} samples/s | {elapsed:.1f} s")

    def _save_snapshot(self):
        model = self.model.module if isinstance(self.model, DDP) else self.model  # prepare_model wrapped it
        snap = {"model": model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                "batch_size": self.args.batch_size, "rng": {"torch": torch.get_rng_state()}}
        if self.scaler is not None:
            snap["scaler"] = self.scaler.state_dict()
        self.session.save(snap)
        self.log(f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")

    def _resume(self):
        path = self.session.resume_from()
        if path is None:
            return
        snap = torch.load(os.path.join(path, SNAPSHOT), map_location="cpu", weights_only=True)  # data only
        (self.model.module if isinstance(self.model, DDP) else self.model).load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        torch.set_rng_state(snap["rng"]["torch"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        adapt_to_another_shape(self, snap, path, self.log, "worker(s)")  # written by another number of workers or batch
        self.log(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")


class RaySession(WorkerLink):
    """A Ray Train worker: rank, lines, stop requests from WorkerLink; snapshots through Ray Train (self.train)."""

    def resume_from(self):
        """The furthest along of the driver's choice, Ray's after a restart, the newest on disk (README: why)."""
        def candidates():
            checkpoint = self.train.get_checkpoint()
            return [self.resume_path, checkpoint.path if checkpoint else None, find_snapshot(self.args.checkpoint_dir)]

        return self.rank0_chooses(candidates)

    def save(self, snapshot):
        with tempfile.TemporaryDirectory(prefix="ray-snapshot-") as tmp:  # Ray copies it into its storage_path
            checkpoint = None
            if self.rank == 0:  # every rank calls report at the same points (Ray requires it); rank 0 saves
                save_snapshot(tmp, snapshot)
                checkpoint = self.train.Checkpoint.from_directory(tmp)
            self.train.report({"step": snapshot["step"], "epoch": snapshot["epoch"]}, checkpoint=checkpoint)


def train_worker(config):
    """What each Ray Train worker runs (TorchTrainer's train_loop_per_worker): Ray has already started this
    process, set up the process group and chosen its device; the rest is the single-process recipe."""
    import ray.train.torch

    args, device = config["args"], ray.train.torch.get_device()
    session = RaySession(config, device)
    torch.manual_seed(args.seed)
    dataset = build_dataset(args)
    loader = build_loader(dataset, args, session.rank, session.world_size)
    model = ray.train.torch.prepare_model(ConvNet(in_channels=dataset.in_channels))  # to its device, in DDP
    session.log_placement(device)
    with session.reporting_hangs():  # a peer that stops answering: this worker's stacks on disk, one line (C13)
        session.close(Trainer(model, loader, args, device, session).train())


def train(args, device=None, workers=None):
    """After setup: the loop in this process on `device`, no Ray (single_gpu.py); or TorchTrainer runs train_worker
    on `workers` Ray Train workers (multigpu.py, multinode.py) and restarts them from a snapshot when one dies."""
    if workers is None:
        torch.manual_seed(args.seed)
        dataset = build_dataset(args)
        loader = build_loader(dataset, args)
        model = ConvNet(in_channels=dataset.in_channels).to(device)
        log(0, f"device {device} | {len(dataset)} samples | batch {args.batch_size} | {len(loader)} steps/epoch")
        if Trainer(model, loader, args, device, LocalSession(args.checkpoint_dir)).train() == "preempted":
            sys.exit(PREEMPTED_EXIT_CODE)
        return
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Bad input fails here, in the driver, before any worker starts: one line instead of a worker's traceback.
    check_dataset_fits(build_dataset(args), workers, args.batch_size)
    backend = pick_backend(args.backend)
    control = make_control_actor()  # the workers' lines to this driver, a stop request to them
    with scratch_storage(args.checkpoint_dir) as storage:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"args": args, "control": control, "resume_from": resumable_snapshot(args, workers)},
            torch_config=TorchConfig(backend=backend, timeout_s=args.timeout),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=backend == "nccl",
                                         resources_per_worker={"CPU": 1}, placement_strategy="PACK"),
            run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=args.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=KEEP_SNAPSHOTS)))
        with DriverPump(control):  # prints the workers' lines, passes SIGUSR1/SIGTERM on to them
            trainer.fit()
    if ray.get(control.result.remote()) == "preempted":
        sys.exit(PREEMPTED_EXIT_CODE)
