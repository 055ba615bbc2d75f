"""The lesson of monai/: MONAI's 3-D UNet segments a Medical Segmentation Decathlon task under DDP. Top to bottom: the
process group, the data (transforms, partition_dataset, CacheDataset), the model, the loop (Trainer) and `train`."""

import functools
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from monai.data import CacheDataset, ThreadDataLoader, list_data_collate, partition_dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.transforms import (AsDiscrete, Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd,
                              Orientationd, RandCropByPosNegLabeld, RandFlipd, RandScaleIntensityd,
                              ScaleIntensityRanged, Spacingd, SpatialPadd)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from cluster import (EpochSampler, SeededAugmentation, check_dataset_fits, exit_preempted, find_snapshot,
                     load_snapshot, mixed_precision, pick_backend, prepare_data, read_task, rendezvous, restore_rng,
                     rng_state, save_best_model, save_snapshot, step_timer)
from toolkit import PREEMPTION, ignore_preemption_signals, log, snapshot_due

SPACING = (1.5, 1.5, 1.5)  # EDIT: voxel size (mm) every volume is resampled to; 1.5 mm suits abdominal CT
HU_WINDOW = (-57.0, 164.0)  # EDIT: CT intensity window (Hounsfield units) mapped to [0, 1]: MONAI's spleen tutorial
CROPS_PER_CASE = 4  # foreground-balanced crops drawn from every case per step (RandCropByPosNegLabeld num_samples)
KEYS = ("image", "label")  # the two volumes of every case, as dataset.json names them


def init_distributed(args, rank, world_size, device, store=None):
    """Join the process group; --timeout bounds the rendezvous and every later collective."""
    backend = pick_backend(args.backend)
    with rendezvous(args.timeout, rank, world_size, store) as store:  # a failure or a hang: one line, exit 2
        dist.init_process_group(backend, store=store, rank=rank if store else -1,
                                world_size=world_size if store else -1, timeout=timedelta(seconds=args.timeout),
                                device_id=device if backend == "nccl" else None)


def preprocessing(ct, device=None):
    """Deterministic transforms, cached once per case: read, channel first, orientation, spacing, intensity (CT: a
    fixed Hounsfield window, clipped; other modalities, e.g. MRI, have no absolute scale: each volume normalised)."""
    return Compose([LoadImaged(KEYS, reader="NibabelReader", image_only=True), EnsureChannelFirstd(KEYS),
                    Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
                    Spacingd(KEYS, pixdim=SPACING, mode=("bilinear", "nearest")),
                    ScaleIntensityRanged("image", *HU_WINDOW, b_min=0.0, b_max=1.0, clip=True) if ct
                    else NormalizeIntensityd("image", nonzero=True, channel_wise=True),
                    EnsureTyped(KEYS, track_meta=False, device=device)])  # device: --gpu-cache caches on the GPU


def augmentation(roi):
    """Random transforms, drawn anew for every sample: pad to the crop size, CROPS_PER_CASE crops centred on
    foreground and background voxels 1:1 (a small organ would rarely be hit by uniform crops), flip, intensity."""
    return Compose([SpatialPadd(KEYS, spatial_size=(roi,) * 3),
                    RandCropByPosNegLabeld(KEYS, "label", (roi,) * 3, num_samples=CROPS_PER_CASE, image_key="image"),
                    RandFlipd(KEYS, prob=0.5, spatial_axis=0), RandScaleIntensityd("image", factors=0.1, prob=0.5)])


@dataclass
class Task:
    train: Dataset  # this rank's partition of the training cases: preprocessed once (CacheDataset), augmented
    val_cases: list  # this rank's share of the validation cases (rank, rank + world, ...), preprocessed
    in_channels: int
    num_classes: int
    n_train: int  # training cases over all ranks (dataset.json's, before the partition drops its tail)
    n_val: int  # validation cases over all ranks


def build_dataset(args, ranks):
    """A Decathlon task folder; each rank caches only its own partition of the training cases, as MONAI's DDP
    tutorials do: shuffled once from --seed, split evenly, the tail dropped (README: Data)."""
    train_cases, val_cases, in_channels, num_classes, ct = read_task(prepare_data(args, ranks))
    check_dataset_fits(train_cases, ranks.world_size, args.batch_size)
    ids = partition_dataset(range(len(train_cases)), num_partitions=ranks.world_size, shuffle=True,
                            seed=args.seed % 2**32, drop_last=True, even_divisible=True)[ranks.rank]  # disjoint
    cache = dict(transform=preprocessing(ct, ranks.device if args.gpu_cache else None),  # --gpu-cache: GPU memory
                 num_workers=len(os.sched_getaffinity(0)), progress=False)  # every CPU of the task (MONAI's default: 1)
    cached = CacheDataset([train_cases[i] for i in ids], cache_rate=args.cache_rate, **cache)
    mine = CacheDataset(val_cases[ranks.rank::ranks.world_size], **cache)
    return Task(SeededAugmentation(cached, augmentation(args.roi_size), args.seed, ids),
                [mine[i] for i in range(len(mine))], in_channels, num_classes, len(train_cases), len(val_cases))


def build_loader(dataset, args, rank=0, world_size=1):
    """This rank's partition in a new order every epoch, whole batches only; the crops of a batch's cases go
    into one tensor (list_data_collate). A resumed epoch starts at its batch in the sampler: nothing re-loaded."""
    loader = ThreadDataLoader if args.gpu_cache else DataLoader  # --gpu-cache: augmented on the GPU, in a thread
    return loader(dataset, batch_size=args.batch_size, sampler=EpochSampler(len(dataset), args, rank),
                  num_workers=args.num_workers, drop_last=True, collate_fn=list_data_collate,
                  pin_memory=torch.cuda.is_available() and not args.gpu_cache, worker_init_fn=ignore_preemption_signals)


def build_model(task):
    """MONAI's 3-D UNet: residual units, instance norm (no running statistics), no biases (README: Training)."""
    return UNet(spatial_dims=3, in_channels=task.in_channels, out_channels=task.num_classes,
                channels=(8, 16, 32), strides=(2, 2), num_res_units=1, bias=False)


class Trainer:
    """The training loop every script runs; `model` is the bare UNet or its DDP wrapper."""

    def __init__(self, model, loader, task, args, ranks):
        self.model, self.loader, self.task, self.args, self.ranks = model, loader, task, args, ranks
        self.net = getattr(model, "module", model)  # the UNet itself: saved, loaded, used for validation
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # Over --epochs even with --max-steps: a run cut short and resumed follows the uninterrupted LR curve.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs * len(loader))
        self.autocast, self.scaler = mixed_precision(ranks.device, args.amp)
        self.epoch, self.step, self.batch_in_epoch, self.best_dice, self.preempted = 0, 0, 0, -1.0, False
        self.timer = step_timer(args.timings_file if ranks.rank == 0 else None, ranks.device)  # --timings-file
        self._log = functools.partial(log, 0) if ranks.rank == 0 else (lambda message: None)  # rank 0 speaks for all

    def train(self):
        args, task, loader = self.args, self.task, self.loader
        self._resume()
        self._log(f"world size {self.ranks.world_size} | device {self.ranks.device} | {task.n_train} training + "
                  f"{task.n_val} validation cases | {len(task.train)} cached per rank | batch {args.batch_size}/rank "
                  f"x {CROPS_PER_CASE} crops | {len(loader)} steps/epoch")
        start = time.perf_counter()
        while self._training_left():
            epoch_start = time.perf_counter()
            loss_all, seen_all = self.ranks.sum(self._run_epoch())  # metrics over all ranks, not rank 0's
            elapsed = time.perf_counter() - epoch_start
            ended = self.epoch + (self.batch_in_epoch == len(loader))  # epochs run to their end, this one included
            finished = ended >= args.epochs or bool(args.max_steps and self.step >= args.max_steps)
            validate = finished or ended % args.val_every == 0
            # Save first, validate after the requeue: the seconds before the kill are for the snapshot. Before a
            # validation the ranks also agree on a signal that came after the loop's last check (PREEMPTION.agreed).
            if self.preempted or (validate and self.ranks.max(PREEMPTION.requested)):
                if args.checkpoint_dir:
                    self._save_snapshot(float("nan"))
                exit_preempted(self.ranks.rank, self.step, args.checkpoint_dir)  # exit 75: the job script requeues
            if self.batch_in_epoch == len(loader):  # the epoch ran to its end
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            dice = self._validate() if validate else float("nan")  # nan: not validated this epoch (--val-every)
            if seen_all:
                self._log(f"epoch {self.epoch + (self.batch_in_epoch > 0)}/{args.epochs} | step {self.step} | "
                          f"loss {loss_all / seen_all:.4f} | dice {dice:.4f} | {seen_all / elapsed:.0f} samples/s | "
                          f"{elapsed:.1f} s")
            if validate:
                self._log(f"validation dice {dice:.8f} over {task.n_val} cases")
            if snapshot_due(args, self.step, self.epoch, last=finished):
                self._save_snapshot(dice)
        if self.timer:
            self.timer.write(world_size=self.ranks.world_size, batch_size=args.batch_size)
        self._log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")

    def _training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def _run_epoch(self):
        """One pass over this rank's shard; returns (summed loss, samples)."""
        loader, skip = self.loader, self.batch_in_epoch
        loader.sampler.set_epoch(self.epoch, skip=skip * self.args.batch_size)  # resumed: trained batches not loaded
        loader.dataset.set_epoch(self.epoch)  # new random crops every epoch
        loss_sum, seen = torch.zeros((), device=self.ranks.device), 0
        for i, batch in enumerate(loader, start=skip):
            loss = self._run_batch(batch["image"], batch["label"])
            self.step, self.batch_in_epoch = self.step + 1, i + 1
            if self.timer:
                self.timer()
            loss_sum, seen = loss_sum + loss * len(batch["image"]), seen + len(batch["image"])
            if self.ranks.rank == 0 and self.step % self.args.log_every == 0:  # .item() syncs: rank 0 only
                self._log(f"epoch {self.epoch + 1} | batch {i + 1}/{len(loader)} | step {self.step} | "
                          f"loss {loss.item():.4f}")
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            if PREEMPTION.agreed(self.step, self.ranks.max):  # all ranks stop at the same step (all_reduce MAX)
                self.preempted = True
                break
            if snapshot_due(self.args, self.step) and i + 1 < len(loader):  # (an epoch's end saves in train())
                self._save_snapshot(float("nan"))  # --save-every-steps: mid-epoch, with the position in the epoch
        return [loss_sum.item(), seen]

    def _run_batch(self, image, label):
        image, label = image.to(self.ranks.device, non_blocking=True), label.to(self.ranks.device, non_blocking=True)
        with self.autocast():
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)  # the Dice ratio in fp32: bf16 has 3 significant digits
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # under DDP the gradients are averaged across ranks here
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _validate(self):
        """Mean Dice over all validation cases (whole volumes, background excluded, NaN classes left out, as
        DiceMetric does): each rank scores its own, the sums are added over ranks (README: Training)."""
        total, count, device, n = 0.0, 0.0, self.ranks.device, self.task.num_classes
        to_pred, to_label = AsDiscrete(argmax=True, to_onehot=n), AsDiscrete(to_onehot=n)
        self.net.eval()
        with torch.no_grad(), self.autocast():
            for case in self.task.val_cases:
                logits = sliding_window_inference(case["image"].unsqueeze(0).to(device), (self.args.roi_size,) * 3,
                                                  sw_batch_size=4, predictor=self.net, overlap=0.25)
                pred = to_pred(logits[0].float()).unsqueeze(0)
                label = to_label(case["label"].to(device)).unsqueeze(0)
                dice = compute_dice(pred, label, include_background=False)  # shape (1, classes - 1)
                valid = ~torch.isnan(dice)
                total, count = total + dice[valid].double().sum().item(), count + valid.sum().item()
        self.net.train()
        total, count = self.ranks.sum([total, count])
        return total / count if count else float("nan")

    def _save_snapshot(self, dice):
        """Rank 0 writes (every rank holds the same weights); the others wait until the files are complete."""
        ckpt = self.args.checkpoint_dir
        if self.ranks.rank == 0:
            if dice > self.best_dice:  # the best model by validation Dice, kept apart from the snapshots
                save_best_model(ckpt, {"model": self.net.state_dict(), "dice": dice, "step": self.step})
            self.best_dice = max(self.best_dice, dice)
            snap = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                    "batch_in_epoch": self.batch_in_epoch, "world_size": self.ranks.world_size,
                    "best_dice": self.best_dice, "rng": rng_state(self.ranks.device)}
            save_snapshot(ckpt, {**snap, "scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else snap)
            log(0, f"snapshot saved to {ckpt} (step {self.step})")
        self.best_dice = self.ranks.from_rank0(self.best_dice)
        self.ranks.barrier()  # nobody reads or restarts before the files are complete

    def _resume(self):
        # Rank 0 picks the snapshot for all: ranks can disagree about a file on a shared filesystem (then deadlock).
        path = self.ranks.from_rank0(find_snapshot(self.args.checkpoint_dir) if self.ranks.rank == 0 else None)
        if path is None:
            return
        snap = load_snapshot(path, self.ranks.world_size)  # to the CPU; another world size is refused (cluster.py)
        self.net.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler.is_enabled() and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        restore_rng(snap["rng"], self.ranks.device)
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        self.best_dice = snap["best_dice"]
        self._log(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")


def train(args, ranks):
    """Everything after setup, the same for every launch pattern: data, model (DDP when distributed), the loop."""
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
    task = build_dataset(args, ranks)
    loader = build_loader(task.train, args, ranks.rank, ranks.world_size)
    model = build_model(task).to(ranks.device)
    model = DDP(model) if ranks.distributed else model  # DDP: gradients averaged over ranks in every backward
    Trainer(model, loader, task, args, ranks).train()
