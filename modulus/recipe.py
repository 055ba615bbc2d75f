"""The lesson of modulus/, top to bottom: PhysicsNeMo's FNO learns Darcy flow -- the data (one shard per rank), the
model, the snapshot file, PhysicsNeMo's own distributed start-up (DistributedManager) and the Trainer (loop,
validation, snapshots, resume, preemption), the same for 1 and N processes. The plumbing is in cluster.py."""

import functools
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import darcy
from cluster import (check_dataset_fits, mixed_precision, physicsnemo, read_darcy, reduce_max, rendezvous,
                     spectral_layers_in_fp32)
from toolkit import (PREEMPTED_EXIT_CODE, PREEMPTION, RecipeError, StepTimer, adapt_to_another_shape, atomic_write,
                     log, snapshot_due)
from toolkit import ignore_preemption_signals  # DataLoader workers leave SIGUSR1/SIGTERM to their parent

SNAPSHOT, PREVIOUS_SNAPSHOT, MODEL_FILE = "snapshot.pt", "snapshot.prev.pt", "fno.mdlus"  # MODEL_FILE: save_model


def build_dataset(args):
    """(train, validation) datasets of normalised (permeability, pressure) pairs, the same on every rank."""
    if args.data == "synthetic":
        train = darcy.generate(args.dataset_size, 32, seed=1234)  # solved in memory from fixed seeds: no files
        val = darcy.generate(max(8, args.dataset_size // 8), 32, seed=4321)
    else:
        train, val = read_darcy(args.data_dir)  # cluster.py: DIR/train.npz and DIR/val.npz (coeff, sol), checked
    return darcy.normalize(*train), darcy.normalize(*val)


def build_loader(dataset, args, rank=0, world_size=1):
    """Each rank reads a disjoint 1/world_size of the data (the uneven tail dropped), reshuffled every epoch by
    set_epoch(). One process reads it all, in the order a 2-rank run interleaves (so the tests can compare them)."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed, drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=args.num_workers > 0,
                      worker_init_fn=ignore_preemption_signals if args.num_workers else None)


def build_model():
    """PhysicsNeMo's Fourier Neural Operator, small enough for a CPU smoke test (~264k parameters)."""
    FNO = physicsnemo().models.fno.FNO
    model = FNO(in_channels=1, out_channels=1, dimension=2, latent_channels=16, num_fno_layers=4, num_fno_modes=8,
                padding=8, decoder_layers=1, decoder_layer_size=32)
    return spectral_layers_in_fp32(model)  # its FFTs in fp32 under --amp (cluster.py: CUDA has no bf16 FFT)


def save_snapshot(checkpoint_dir, snapshot):
    """Atomically: a crash mid-write leaves the last good one; the one before is kept as snapshot.prev.pt."""
    atomic_write(os.path.join(checkpoint_dir, SNAPSHOT), lambda f: torch.save(snapshot, f),
                 previous=os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))


def save_model(checkpoint_dir, module):
    """The trained FNO in PhysicsNeMo's own format: physicsnemo.Module.from_checkpoint(path) rebuilds it."""
    with tempfile.TemporaryDirectory() as scratch:  # Module.save writes the path it is given in place: a scratch
        module.save(staged := os.path.join(scratch, MODEL_FILE))  # copy, then atomic_write: never half a file
        with open(staged, "rb") as f:
            atomic_write(os.path.join(checkpoint_dir, MODEL_FILE), lambda out: out.write(f.read()))


def find_snapshot(checkpoint_dir):
    """The readable snapshot with the most steps (by content, never file time), or None when there is none yet. A
    damaged one is skipped with a warning; none readable is an error (starting over would overwrite the work)."""
    paths = [os.path.join(checkpoint_dir, n) for n in (SNAPSHOT, PREVIOUS_SNAPSHOT)] if checkpoint_dir else []
    steps, problems = {}, []
    for path in filter(os.path.exists, paths):
        try:  # weights_only: a snapshot is data; mmap: a truncated file fails here without reading the weights
            steps[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        except Exception as e:  # truncated zip, wrong format, unexpected pickled objects, missing key ...
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            print(f"warning: {problems[-1]}; trying the other snapshot", file=sys.stderr, flush=True)
    if problems and not steps:
        raise RecipeError(f"no usable snapshot: {'; '.join(problems)}. Delete or move the damaged files to start over.")
    return max(steps, key=steps.get) if steps else None  # a tie: snapshot.pt


def init_distributed(args):
    """PhysicsNeMo's DistributedManager: reads torchrun's variables, else Slurm's, else OpenMPI's, creates the
    process group and picks this rank's device. Returns the manager: rank, world_size, local_rank, device."""
    DistributedManager = physicsnemo().distributed.DistributedManager
    with rendezvous(args):  # cluster.py: --timeout, --backend, a deadline and one-line errors around it
        DistributedManager.initialize()
    manager = DistributedManager()
    if not manager.distributed or manager.world_size < 1:
        raise RecipeError("DistributedManager found no launcher (torchrun, srun or mpirun variables)")
    return manager


class Trainer:
    """Train the FNO (in DDP when distributed) on this rank's shard: Adam with a cosine schedule over --epochs, MSE
    on normalised pressure, validation over all ranks, snapshots, automatic resume and preemption."""

    def __init__(self, model, datasets, args, rank, world_size, device):
        self.model, self.args, self.rank, self.world_size, self.device = model, args, rank, world_size, device
        self.module = getattr(model, "module", model)  # the FNO itself, with or without DDP around it
        train, self.val = datasets
        self.loader = build_loader(train, args, rank, world_size)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # Over --epochs even with --max-steps: a run cut short and resumed follows the uninterrupted LR curve.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, args.epochs * len(self.loader))
        self.autocast, self.scaler = mixed_precision(device, args.amp)
        self.reduce_max = functools.partial(reduce_max, device=device) if world_size > 1 else None
        self.epoch = self.step = self.batch_in_epoch = 0
        sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
        self.timer = StepTimer(args.timings_file, sync) if rank == 0 and args.timings_file else None
        self.log = functools.partial(log, 0) if rank == 0 else (lambda message: None)  # rank 0 speaks for all

    def all_reduce(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    def _save_snapshot(self):
        if self.rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
            snap = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                    "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                    "batch_size": self.args.batch_size, "rng": {"torch": torch.get_rng_state()}}
            if self.scaler.is_enabled():
                snap["scaler"] = self.scaler.state_dict()
            save_snapshot(self.args.checkpoint_dir, snap)
            log(0, f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")
        if self.world_size > 1:
            dist.barrier()  # nobody reads or restarts before the file is complete

    def _resume(self):
        # Rank 0 picks the snapshot and tells the others: ranks can disagree about a file on a shared filesystem.
        choice = [find_snapshot(self.args.checkpoint_dir) if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return
        snap = torch.load(choice[0], map_location="cpu", weights_only=True)  # load_state_dict copies to the device
        self.module.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler.is_enabled() and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        torch.set_rng_state(snap["rng"]["torch"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        adapt_to_another_shape(self, snap, choice[0], self.log)  # written by another world size or batch
        self.log(f"resumed from {choice[0]}: epoch {self.epoch + 1}, step {self.step}")

    def _training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def _run_batch(self, x, y):
        with self.autocast():
            loss = torch.nn.functional.mse_loss(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # with DDP: gradients are averaged across ranks here
        self.scaler.step(self.optimizer)  # the scaler (fp16 only) skips a step whose gradients overflowed
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _run_epoch(self):
        """One pass over this rank's shard (from batch_in_epoch on, after a resume): (loss sum, samples, preempted)."""
        self.model.train()
        self.loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
        loss_sum, seen = torch.zeros((), device=self.device), 0  # on the device: .item() per step stalls a GPU
        for i, (x, y) in enumerate(self.loader):
            if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
                continue
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self._run_batch(x, y)
            self.step, self.batch_in_epoch = self.step + 1, i + 1
            if self.timer:
                self.timer()
            loss_sum, seen = loss_sum + loss * len(y), seen + len(y)
            if self.rank == 0 and self.step % self.args.log_every == 0:  # .item() syncs: rank 0 only
                self.log(f"epoch {self.epoch + 1} | batch {i + 1}/{len(self.loader)} | step {self.step} | "
                         f"loss {loss.item():.4f}")
            if PREEMPTION.agreed(self.step, self.reduce_max):  # SIGUSR1/SIGTERM: every rank stops at this step
                return loss_sum, seen, True
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            if snapshot_due(self.args, self.step) and i + 1 < len(self.loader):  # (an epoch's end saves in train())
                self._save_snapshot()  # --save-every-steps: mid-epoch, with the position in the epoch
        return loss_sum, seen, False

    @torch.no_grad()
    def _validate(self):
        """Mean relative L2 error over the validation set: each rank takes every world_size-th sample."""
        self.model.eval()
        x, y = self.val[self.rank::self.world_size]
        errors = torch.zeros(2, device=self.device)
        for start in range(0, len(x), self.args.batch_size):
            xb, yb = (t[start:start + self.args.batch_size].to(self.device) for t in (x, y))
            with self.autocast():
                errors[0] += darcy.relative_l2(self.module(xb), yb).sum()  # the module: DDP needs no sync in eval
            errors[1] += len(xb)
        total, count = self.all_reduce(errors).tolist()
        return total / max(count, 1)

    def train(self):
        self._resume()
        start = time.perf_counter()
        while self._training_left():
            epoch_start = time.perf_counter()
            loss_sum, seen, preempted = self._run_epoch()
            loss_all, seen_all = self.all_reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))])).tolist()
            elapsed = time.perf_counter() - epoch_start  # after the reduction's .tolist(): the device has finished
            if seen_all and not preempted:
                rel_l2, loss = self._validate(), loss_all / seen_all
                self.log(f"epoch {self.epoch + 1}/{self.args.epochs} | step {self.step} | loss {loss:.4f} "
                         f"| rel_l2 {rel_l2:.4f} | {seen_all / elapsed:.0f} samples/s | {elapsed:.1f} s")
            if self.batch_in_epoch == len(self.loader):  # the epoch ran to its end (not cut short)
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            finished = not self._training_left()
            if snapshot_due(self.args, self.step, self.epoch, last=finished or preempted):
                self._save_snapshot()
            if preempted and not finished:
                saved = "snapshot saved" if self.args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                self.log(f"preempted at step {self.step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} so the job "
                         f"script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        if self.timer:
            self.timer.write(world_size=self.world_size, batch_size=self.args.batch_size)
        if self.rank == 0 and self.args.checkpoint_dir:
            save_model(self.args.checkpoint_dir, self.module)
        self.log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")


def train(args, device, rank=0, world_size=1, launch=None):
    """What every entry script runs once its process has joined the others (launch: how; None: one process alone)."""
    torch.manual_seed(args.seed)  # the same seed on every rank: identical initial weights
    datasets = build_dataset(args)
    check_dataset_fits(datasets[0], world_size, args.batch_size)
    model = build_model().to(device)
    if launch is not None:
        model = DDP(model, device_ids=[device] if device.type == "cuda" else None)
    trainer = Trainer(model, datasets, args, rank, world_size, device)
    data = f"{len(datasets[0])} samples | batch {args.batch_size}"
    if launch is None:
        log(rank, f"device {device} | {data} | {len(trainer.loader)} steps/epoch")
    elif rank == 0:
        log(rank, f"world size {world_size} ({launch}) | backend {dist.get_backend()} | device {device} | "
                  f"{data}/rank | {len(trainer.loader)} steps/epoch")
    trainer.train()
