"""What every script in this folder shares: the command line, the model, the synthetic data, checkpointing
and reporting. The scripts differ only in how they ask Lightning to distribute the run.

The model and the synthetic data are the same as in pytorch/, so the benchmarks compare like with like.
"""

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

NUM_CLASSES = 10


def parse_args(description: str, *, devices: bool = False, default_devices: int | None = None,
               num_nodes: bool = False) -> argparse.Namespace:
    """The command line shared by every script of every folder, plus --devices/--num-nodes where they apply."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", default=None, help="unused: only synthetic data in this folder")
    p.add_argument("--dataset-size", type=int, default=4096, help="number of synthetic samples")
    p.add_argument("--checkpoint-dir", default="checkpoints")
    p.add_argument("--save-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 mixed precision")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--log-every", type=int, default=50, help="steps between rank-0 progress lines (0: off)")
    p.add_argument("--timings-file", help="rank 0 writes per-step end times here (JSON) for the benchmarks")
    if devices:
        p.add_argument("--devices", type=int, default=default_devices, help="processes (GPUs or CPU workers) per node")
    if num_nodes:
        p.add_argument("--num-nodes", type=int, default=None)
    args = p.parse_args()
    if args.data != "synthetic":
        # Real datasets come through torchvision, and the only torchvision build matching torch 2.13.0 is
        # CUDA-only: merely installed next to CPU torch it breaks `import lightning.pytorch`.
        p.error(f"--data {args.data} is not supported in lightning/ (it needs torchvision, which this folder "
                "leaves out; see README.md). Use --data synthetic, or pytorch/ for MNIST and CIFAR-10.")
    for name in ("epochs", "batch_size", "dataset_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        p.error(f"--max-steps must be at least 1, got {args.max_steps}")
    return args


class ConvNet(nn.Module):
    """A small CNN, the same as pytorch/common.py's, so that the benchmarks compare like with like."""

    def __init__(self, in_channels=1, num_classes=NUM_CLASSES, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def synthetic_dataset(size: int, seed: int = 1234) -> TensorDataset:
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise), as in pytorch/.

    Generated from its own seed, so every rank and every run builds the identical dataset without any file.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(NUM_CLASSES, 1, 28, 28, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=g)
    images = prototypes[labels] + torch.randn(size, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float, epochs: int):
        super().__init__()
        self.save_hyperparameters()
        self.net = ConvNet()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self.net(images)
        loss = F.cross_entropy(logits, labels)
        # The Report callback sums loss and correct predictions on the device and reduces them across ranks once
        # per epoch. (self.log_dict(..., on_epoch=True, sync_dist=True) here computes the same, but its
        # bookkeeping costs about 1 ms every step, 4-6 % of this step: see benchmarks/README.md.)
        return {"loss": loss, "correct": (logits.argmax(dim=1) == labels).sum()}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        # As in pytorch/: the schedule spans --epochs and --max-steps only stops early, so a run cut short and
        # resumed follows the same learning-rate curve as an uninterrupted one.
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs * steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SyntheticData(pl.LightningDataModule):
    def __init__(self, size: int, batch_size: int, num_workers: int, seed: int):
        super().__init__()
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train = synthetic_dataset(size)

    def train_dataloader(self):
        # Each rank reads its own shard; Lightning calls set_epoch every epoch, so the order changes between
        # epochs. Lightning would add this sampler itself, but only under DDP: using it on one device too makes
        # the order a function of (seed, epoch) alone, so a resumed run sees the batches an uninterrupted run
        # would (Lightning's checkpoints do not hold the RNG state a plain shuffle draws from).
        sampler = DistributedSampler(self.train, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=self.seed, drop_last=True)
        return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)


class Report(Callback):
    """Rank 0 prints a progress line every `log_every` steps and one line per epoch with the loss and accuracy
    averaged over all ranks and the samples/s of the whole job."""

    def __init__(self, batch_size: int, log_every: int):
        self.batch_size, self.log_every = batch_size, log_every

    def on_train_start(self, trainer, pl_module):
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.epoch_first_step = time.perf_counter(), trainer.global_step
        self.sums = torch.zeros(3, device=pl_module.device)  # this rank's loss x samples, correct, samples

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch[1])  # on the device, no sync: nothing is read before the epoch ends
        self.sums[0] += outputs["loss"].detach().float() * n
        self.sums[1] += outputs["correct"]
        self.sums[2] += n
        if self.log_every and trainer.is_global_zero and trainer.global_step % self.log_every == 0:
            # .item() here waits for rank 0's own step only, and only every log_every steps
            print(f"[rank 0] epoch {trainer.current_epoch} step {trainer.global_step} "
                  f"loss {outputs['loss'].item():.4f} (this rank)", flush=True)

    def on_train_epoch_end(self, trainer, pl_module):
        totals = trainer.strategy.reduce(self.sums, reduce_op="sum")  # every rank: one collective per epoch
        if not trainer.is_global_zero or totals[2] == 0:
            return
        loss, acc = (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item()
        seconds = time.perf_counter() - self.epoch_start
        samples = (trainer.global_step - self.epoch_first_step) * self.batch_size * trainer.world_size
        print(f"[rank 0] epoch {trainer.current_epoch} loss {loss:.4f} acc {acc:.3f} "
              f"{samples / seconds:.0f} samples/s {seconds:.1f}s world_size {trainer.world_size}", flush=True)


class StepTimings(Callback):
    """For the benchmark runner: rank 0 records the wall time right after every optimizer step."""

    def __init__(self, path: str, start_time: float, batch_size: int):
        self.path, self.start_time, self.batch_size = path, start_time, batch_size
        self.step_end_times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # the step's kernels, not just their launch (as pytorch/)
            self.step_end_times.append(time.time())

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.path).write_text(json.dumps({
                "step_end_times": self.step_end_times, "world_size": trainer.world_size,
                "batch_size": self.batch_size, "start_time": self.start_time}))


def trainer_options(args: argparse.Namespace, start_time: float) -> dict:
    """Everything about the Trainer that does not depend on how the run is distributed."""
    callbacks = [
        # Keeps the newest epoch=E-step=S.ckpt and last.ckpt, a link to it. (With save_top_k=0 Lightning
        # writes last.ckpt only when training ends, which is no use to a job that gets killed.)
        ModelCheckpoint(dirpath=args.checkpoint_dir, save_last="link", save_top_k=1, every_n_epochs=args.save_every),
        Report(args.batch_size, args.log_every),
    ]
    if args.timings_file:
        callbacks.append(StepTimings(args.timings_file, start_time, args.batch_size))
    return dict(
        max_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        precision="bf16-mixed" if args.amp else "32-true",
        callbacks=callbacks,
        default_root_dir=args.checkpoint_dir,  # where Lightning writes hpc_ckpt_N.ckpt on a Slurm requeue
        logger=False,  # the Report callback prints on rank 0; no log directories to clean up
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(trainer: pl.Trainer, args: argparse.Namespace) -> None:
    """Build the model and the data, then train, resuming from the newest checkpoint in --checkpoint-dir."""
    world_size = trainer.num_devices * trainer.num_nodes
    if args.dataset_size // (world_size * args.batch_size) == 0:
        sys.exit(f"error: --dataset-size {args.dataset_size} is too small for one step of {world_size} "
                 f"processes x --batch-size {args.batch_size}: lower --batch-size or use more data")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = Classifier(args.lr, args.epochs)
    data = SyntheticData(args.dataset_size, args.batch_size, args.num_workers, args.seed)
    trainer.fit(model, datamodule=data, ckpt_path=resume_from(args.checkpoint_dir))
    # The DDP wrapper Lightning dropped at teardown sits in reference cycles that hold the gloo process group.
    # Left to the interpreter's shutdown they can abort the process after a successful run (see
    # pytorch/common.py run()); free them now, before Lightning's atexit hook destroys the process group.
    gc.collect()


def resume_from(checkpoint_dir: str) -> str | None:
    """What to pass as trainer.fit(ckpt_path=...): "last" when last.ckpt is the newest checkpoint, None for a
    fresh start.

    Under Slurm, Lightning also writes hpc_ckpt_N.ckpt when the requeue signal arrives. ckpt_path="last" ignores
    those, and Lightning's own choice (ckpt_path=None under Slurm) takes an hpc checkpoint even when a later
    last.ckpt exists (a stale one from an earlier preemption), so take whichever is newest.
    """
    folder = Path(checkpoint_dir)
    last = folder / "last.ckpt"
    hpc = max(folder.glob("hpc_ckpt_*.ckpt"), key=lambda p: p.stat().st_mtime, default=None)
    if hpc is not None and (not last.exists() or hpc.stat().st_mtime > last.stat().st_mtime):
        return str(hpc)
    return "last" if last.exists() else None
