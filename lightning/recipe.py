"""The lesson: one model trained with PyTorch Lightning, read top to bottom. Lightning owns the training loop; this
file gives it the model (a LightningModule), the data (a LightningDataModule whose loader resumes mid-epoch), the
callbacks that save checkpoints and stop on preemption, and the Trainer's options. The scripts differ only in how
they ask Lightning to distribute the run (their setup()); train() is the same for all of them.

The model and the synthetic data are the same as in pytorch/, so the benchmarks compare like with like.
The plumbing (command line, log lines, signals, checkpoint choice, a lost peer) is in cluster.py.
"""

import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster import (TF32, PreemptionSignals, Report, StepTimings, check_dataset_fits, collect_ddp_cycles,
                     parallel_devices, reduce_max, resume_from)
from toolkit import PREEMPTED_EXIT_CODE, PREEMPTION, ignore_preemption_signals, log

NUM_CLASSES = 10


class ConvNet(nn.Module):
    """A small CNN, the same as pytorch/'s, so that the benchmarks compare like with like."""

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
        # (Not trainer.estimated_stepping_batches: it shrinks to --max-steps when that is given, and then a run cut
        # short by --max-steps and resumed would follow another curve.)
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader())
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs * steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def build_dataset(args) -> TensorDataset:
    return synthetic_dataset(args.dataset_size)


def build_loader(dataset, args, rank=0, world_size=1, trainer=None):
    # Each rank reads its own shard; Lightning calls set_epoch every epoch, so the order changes between epochs.
    # Lightning would add this sampler itself, but only under DDP: using it on one device too makes the order a
    # function of (seed, epoch) alone, so a resumed run sees the batches an uninterrupted run would (Lightning's
    # checkpoints do not hold the RNG state a plain shuffle draws from).
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    # Workers ignore SIGUSR1/SIGTERM: Slurm signals every process of the step, and a forked worker would run
    # the signal handler on its stale copy of the trainer (or die and make the main process raise).
    # On a GPU the batches come from pinned memory: their copy to the device is faster and can overlap.
    on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
    return ResumableLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                           num_workers=args.num_workers, persistent_workers=args.num_workers > 0,
                           worker_init_fn=ignore_preemption_signals, pin_memory=on_gpu, trainer=trainer)


class SyntheticData(pl.LightningDataModule):
    def __init__(self, args):
        super().__init__()
        self.args, self.train = args, build_dataset(args)

    def train_dataloader(self):
        return build_loader(self.train, self.args, self.trainer.global_rank, self.trainer.world_size, self.trainer)


class ResumableLoader(DataLoader):
    """A loader Lightning can resume mid-epoch, where a preemption checkpoint is saved (between two steps).

    Without state_dict/load_state_dict Lightning restarts the resumed epoch at its first batch ("your dataloader
    is not resumable"), and the weights differ from an uninterrupted run's (README.md). The state is the optimizer
    step (one batch per step: no gradient accumulation here); the resumed epoch skips the batches before it, as
    pytorch/'s Trainer does. Not a count of the batches handed out: Lightning fetches one batch ahead."""

    def __init__(self, *args, trainer: pl.Trainer, **kwargs):
        super().__init__(*args, **kwargs)
        self.trainer, self.skip = trainer, 0

    def state_dict(self) -> dict:
        return {"global_step": self.trainer.global_step}

    def load_state_dict(self, state: dict) -> None:
        self.skip = state["global_step"] % len(self)  # 0 at an epoch boundary

    def __iter__(self):
        # A generator: nothing is drawn before the first batch is asked for, because Lightning creates the
        # iterator before it calls the sampler's set_epoch (the order depends on (seed, epoch) only).
        skip, self.skip = self.skip, 0  # only the resumed epoch skips
        for i, batch in enumerate(super().__iter__()):
            if i >= skip:
                yield batch


def mixed_precision(args) -> str:
    """--amp: bf16 where the device does it natively, else fp16 with loss scaling (CONTRACT.md C10).
    torch.cuda.is_bf16_supported() also says yes on V100/T4, where bf16 is emulated and slow."""
    if not args.amp:
        return "32-true"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "16-mixed"
    return "bf16-mixed"


def ddp(args, start_method: str = "popen", per_node: int | None = None) -> DDPStrategy:
    """Lightning's DDP with the contract's --backend and --timeout (rendezvous and collectives). per_node: a
    launcher started one process per device (torchrun, srun); each uses the GPU init_distributed chose."""
    backend = None if args.backend == "auto" else args.backend  # None: nccl with CUDA, gloo without
    return DDPStrategy(start_method=start_method, process_group_backend=backend,
                       timeout=timedelta(seconds=args.timeout),
                       parallel_devices=parallel_devices(per_node) if per_node else None)


class Preemption(PreemptionSignals):
    """SIGUSR1/SIGTERM (Slurm's warning before the time limit, preemption, scancel): finish the step, save a
    checkpoint, stop; train() then exits 75 so the job script requeues (CONTRACT.md C7).

    The handler only sets a flag (toolkit.PREEMPTION, kept ours while Lightning runs by PreemptionSignals); every
    CHECK_EVERY steps, or as often as BUDGET_S seconds of the slowest rank's steps allow, all ranks agree (max over
    ranks) whether to stop, so they stop at the same step and the checkpoint is a collective that everybody enters.
    Saving inside the handler, as Lightning's own Slurm requeue does, can interrupt a collective half-way.
    """

    def __init__(self, checkpoint_dir: str | None):
        self.checkpoint_dir, self.preempted = checkpoint_dir, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not PREEMPTION.agreed(trainer.global_step, reduce_max(trainer, pl_module.device)):
            return
        self.preempted = True
        trainer.callback_metrics["preempted_at_step"] = torch.tensor(trainer.global_step)  # ddp_spawn: to the parent
        if self.checkpoint_dir:
            trainer.save_checkpoint(str(Path(self.checkpoint_dir) / f"preempted-step={trainer.global_step}.ckpt"))
        trainer.should_stop = True


def trainer_options(args, start_time: float) -> dict:
    """Everything about the Trainer that does not depend on how the run is distributed."""
    callbacks = [Report(args), Preemption(args.checkpoint_dir), TF32()]
    if args.checkpoint_dir:
        # Keeps the newest epoch=E-step=S.ckpt and last.ckpt, a link to it. (With save_top_k=0 Lightning
        # writes last.ckpt only when training ends, which is no use to a job that gets killed.) No version
        # counter: one run per directory, so a resumed run moves last.ckpt on instead of adding last-v1.ckpt.
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last="link", save_top_k=1,
                                         every_n_epochs=args.save_every, enable_version_counter=False))
    if args.checkpoint_dir and args.save_every_steps:
        # --save-every-steps: a second ModelCheckpoint (one may count epochs or steps, not both), mid-epoch too
        # (the loader's state_dict holds the position in the epoch), its newest steps-S.ckpt kept beside the other.
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, filename="steps-{step}", save_top_k=1,
                                         every_n_train_steps=args.save_every_steps, enable_version_counter=False))
    if args.timings_file:
        callbacks.append(StepTimings(args.timings_file, start_time, args.batch_size))
    return dict(
        max_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        precision=mixed_precision(args),
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoint_dir),
        default_root_dir=args.checkpoint_dir,
        logger=False,  # the Report callback prints on rank 0; no log directories to clean up
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def train(args, trainer: pl.Trainer) -> None:
    """Build the model and the data, then train, resuming from the furthest checkpoint in --checkpoint-dir.
    Exits 75 when a preemption signal stopped the run (after its checkpoint was saved)."""
    data = SyntheticData(args)
    check_dataset_fits(data.train, trainer.num_devices * trainer.num_nodes, args.batch_size)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = Classifier(args.lr, args.epochs)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=resume_from(args.checkpoint_dir))
    except SIGTERMException:  # SIGTERM in Lightning's handler, before on_train_start: nothing saved since the last
        pass  # checkpoint; our handler ran too (Lightning calls it), so this exits 75 below and the job resumes
    # (A peer lost mid-training raises out of fit: cluster.run turns that into one line and exit 1.)
    # A signal received at all means "stop": also in the parent of ddp_spawn's workers, which trained and saved
    # (every process of a Slurm step gets the signal) while this process only waited for them.
    preempted = PREEMPTION.requested or any(isinstance(c, Preemption) and c.preempted for c in trainer.callbacks)
    collect_ddp_cycles()
    if preempted:
        if trainer.is_global_zero:
            step = int(trainer.callback_metrics.get("preempted_at_step", trainer.global_step))
            log(0, f"preempted at step {step}: "
                   f"{'checkpoint saved' if args.checkpoint_dir else 'no --checkpoint-dir, nothing saved'}; "
                   f"exiting with {PREEMPTED_EXIT_CODE} so the job script requeues")
        sys.exit(PREEMPTED_EXIT_CODE)
