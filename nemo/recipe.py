"""The lesson of nemo/, top to bottom: the shared toy CNN as a NeMo model (ModelPT: its config travels with it and
`save_to`/`restore_from` write and read a .nemo archive), its data, and training the NeMo way: @hydra_runner
composes conf/config.yaml, Lightning's Trainer runs the loop (its DDP strategy across processes), exp_manager
saves and resumes the checkpoints. The scripts differ only in the Trainer's launch arguments (their setup()).
The command line, Hydra and the launch checks are in cluster.py; what every folder shares is in toolkit.py."""

import gc
import sys
from datetime import timedelta
from functools import partial

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from nemo.core import ModelPT
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cluster import (ReportHooks, ResumableHooks, TF32Hooks, TimingHooks, check_dataset_fits, last_step,
                     parallel_devices, reduce_max, run_hydra, save_last_checkpoint, settle_last_checkpoints,
                     without_training_step_proxy)
from toolkit import PREEMPTED_EXIT_CODE, PREEMPTION, ignore_preemption_signals, log

NUM_CLASSES = 10

# ------------------------------------------------------------------------------------------ model and data


class ConvNet(nn.Module):
    """A small CNN, the same as pytorch/recipe.py's, so that the benchmarks compare like with like."""

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


def build_dataset(ds: DictConfig) -> TensorDataset:
    return synthetic_dataset(ds.dataset_size)  # --data synthetic is the only choice (cluster.py checks)


class ResumableLoader(ResumableHooks, DataLoader):
    """A DataLoader whose resumed epoch skips the batches trained before the checkpoint (cluster.ResumableHooks)."""


def build_loader(dataset, ds: DictConfig, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 trainer: pl.Trainer | None = None) -> DataLoader:
    """Each rank reads its own shard, reshuffled every epoch from (seed, epoch) (Lightning calls set_epoch); also on
    one device, so that a resumed run, mid-epoch too, sees the batches an uninterrupted run would. Workers ignore
    SIGUSR1/SIGTERM (Slurm signals every process; the parent decides). pin_memory on a GPU: faster copies."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=ds.seed,
                                 drop_last=True)
    return ResumableLoader(dataset, batch_size=ds.batch_size, sampler=sampler, drop_last=True, trainer=trainer,
                           num_workers=ds.num_workers, persistent_workers=ds.num_workers > 0,
                           worker_init_fn=ignore_preemption_signals, pin_memory=pin_memory)


class ToyClassifier(ModelPT):
    """The ConvNet as a NeMo model: its config travels with it (model section of conf/config.yaml), exp_manager
    checkpoints it, and `save_to`/`restore_from` write and read the .nemo archive (config + weights)."""

    def __init__(self, cfg: DictConfig, trainer: pl.Trainer | None = None):
        super().__init__(cfg=cfg, trainer=trainer)
        # ModelPT writes `target: recipe.ToyClassifier` into the config; restore_from refuses a target outside NeMo's
        # approved namespaces (UnsafeTargetError). Without it, ToyClassifier.restore_from builds its own class.
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.pop("target", None)
        self.cfg = cfg  # ModelPT's setter: the config and the checkpoint's hyperparameters
        self.net = ConvNet()

    def __getstate__(self):  # ddp_spawn pickles the model to its workers: ModelPT's training_step proxy cannot go
        return without_training_step_proxy(super().__getstate__())

    def forward(self, images):
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        # Report sums loss and correct predictions on the device and reduces them once per epoch.
        return {"loss": loss, "correct": (logits.argmax(dim=1) == labels).sum()}

    def setup_training_data(self, train_data_config):
        # ModelPT calls this from __init__, before DDP knows this process's rank (under ddp_spawn the model is
        # built in the parent): the loader is built in train_dataloader(), on each rank.
        self.train_config = train_data_config

    def setup_validation_data(self, val_data_config):
        pass  # no validation set: the epoch line reports training accuracy, as in pytorch/

    def train_dataloader(self):
        self.train_set = build_dataset(self.train_config)
        return build_loader(self.train_set, self.train_config, self.trainer.global_rank, self.trainer.world_size,
                            pin_memory=self.trainer.strategy.root_device.type == "cuda", trainer=self.trainer)

    def configure_optimizers(self):
        # The optimizer from NeMo's registry (model.optim: name, lr, momentum). The cosine schedule spans
        # trainer.max_epochs, not max_steps (which only stops early), so a run cut short by --max-steps and
        # resumed follows the same learning-rate curve as an uninterrupted one. (NeMo's `sched` would not.)
        optimizer, _ = self.setup_optimization(self.cfg.optim)
        c = self.train_config
        steps = self.trainer.max_epochs * (c.dataset_size // self.trainer.world_size // c.batch_size)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def list_available_models(cls):
        return None  # no pretrained checkpoints on NGC for a toy model


# ------------------------------------------------------------------------------------------ the loop's hooks


class Report(ReportHooks, Callback):
    """The contract's log lines (CONTRACT.md C3), printed by rank 0: progress, epochs, start, resume, end."""


class Preemption(Callback):
    """SIGUSR1/SIGTERM: at a step all ranks agree on, save *-last.ckpt through NeMo's checkpoint callback and stop;
    train() exits 75, the job script requeues (C7). Not exp_manager's PreemptionCallback: CUDA, SIGTERM, exit 0."""

    preempted = requested = False

    def __getstate__(self):  # ddp_spawn's workers also stop for a signal their parent got before spawning them
        return {**self.__dict__, "requested": PREEMPTION.requested}

    def on_fit_start(self, trainer, pl_module):
        PREEMPTION.requested |= self.requested
        PREEMPTION.install()  # again, after Lightning's own handlers, so that ours are the ones that run

    def on_train_start(self, trainer, pl_module):
        # and again: fit() installs Lightning's SIGTERM handler after on_fit_start (exit 0, no checkpoint: #27)
        PREEMPTION.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not PREEMPTION.agreed(trainer.global_step, reduce_max(trainer, pl_module.device)):
            return
        self.preempted = True
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:  # the checkpoint exp_manager resumes from; Lightning then adds no epoch-end one
            save_last_checkpoint(trainer, checkpoint)  # as NeMo's PreemptionCallback saves it
            # the .nemo archive at the real end only (also when the stop falls on it), not inside the warning
            checkpoint.save_nemo_on_train_end &= last_step(trainer, batch_idx)
        trainer.should_stop = True


class StepSnapshots(Callback):
    """--save-every-steps N: *-last.ckpt after every N-th step, mid-epoch too, by the preemption's path (exp_manager's
    one checkpoint callback counts epochs or steps, not both), as the next batch starts: that batch is fetched, not
    trained, and the loader's state_dict holds the position in the epoch. A step already saved is not saved again."""

    def __init__(self, every: int | None):
        self.every, self.saved = every, None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint=None):
        self.saved = trainer.global_step  # this one, the epoch's end, a preemption: one save per step

    on_train_start = on_save_checkpoint  # a resumed run: its first step is the snapshot's, not saved again

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        due = self.every and trainer.global_step % self.every == 0 and trainer.global_step != self.saved
        if due and trainer.checkpoint_callback is not None:  # (none without --checkpoint-dir)
            save_last_checkpoint(trainer, trainer.checkpoint_callback, batch_in_flight=False)


class StepTimings(TimingHooks, Callback):
    """--timings-file: rank 0 records the wall time after every optimizer step, for the benchmarks."""


class TF32(TF32Hooks, Callback):
    """fp32 runs on a GPU: TF32 matmuls and convolutions (CONTRACT.md C10)."""


# ------------------------------------------------------------------------------------------ training


def ddp(cfg: DictConfig, start_method: str = "popen", per_node: int | None = None) -> DDPStrategy:
    """Lightning's DDP with the contract's --backend and --timeout (rendezvous and collectives). per_node: a
    launcher started one process per device (torchrun, srun); each uses the GPU init_distributed chose."""
    backend = None if cfg.recipe.backend == "auto" else cfg.recipe.backend  # None: nccl with CUDA, gloo without
    return DDPStrategy(start_method=start_method, process_group_backend=backend,
                       timeout=timedelta(seconds=cfg.recipe.timeout),
                       parallel_devices=parallel_devices(per_node) if per_node else None)


def train(args, start_time: float, **launch) -> None:
    """Every script ends here, with its launch arguments for Lightning's Trainer (devices, num_nodes, strategy,
    plugins): @hydra_runner composes the config from the command line's overrides and runs fit()."""
    run_hydra(partial(fit, start_time=start_time, **launch), args)


def fit(cfg: DictConfig, start_time: float, **launch) -> None:
    """Build the Trainer, let exp_manager set up checkpoints and resume, build the NeMo model and train. Exits 75
    when a preemption signal stopped the run (after its checkpoint was saved)."""
    from nemo.utils import logging as nemo_logging
    from nemo.utils.exp_manager import exp_manager

    preemption, ds = Preemption(), cfg.model.train_ds
    callbacks = [Report(cfg), preemption, TF32(), StepSnapshots(cfg.recipe.save_every_steps)]
    if cfg.recipe.timings_file:
        callbacks.append(StepTimings(cfg.recipe.timings_file, start_time, ds.batch_size))
    options = OmegaConf.to_container(cfg.trainer, resolve=True)  # the config's trainer section, less the launch
    options = {k: v for k, v in options.items() if k not in ("devices", "num_nodes")}
    trainer = pl.Trainer(**launch, **options, callbacks=callbacks)
    nemo_logging.setLevel(nemo_logging.WARNING)  # NeMo's INFO lines are not the contract's; warnings stay
    check_dataset_fits(ds.dataset_size, trainer.world_size, ds.batch_size)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.exp_manager.explicit_log_dir:
        # Checkpoints in <dir>/checkpoints; resume_if_exists points trainer.ckpt_path at *-last.ckpt, if any.
        # WORKAROUND(nemo-toolkit 3.0.0, NVIDIA-NeMo/Speech#7948): two *-last.ckpt: resume the most advanced one
        exp_manager(trainer, settle_last_checkpoints(cfg.exp_manager))
    # Resolved: the .nemo archive keeps this section alone, where ${seed} would point nowhere.
    model = ToyClassifier(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)), trainer=trainer)
    trainer.fit(model)  # from trainer.ckpt_path, which exp_manager set
    # WORKAROUND(torch 2.13, pytorch/pytorch#56297): free the DDP wrapper's cycles (they hold the gloo group) now
    gc.collect()  # before Lightning's atexit hook destroys the process group (README.md, troubleshooting)
    # A signal received at all means "stop": also in the parent of ddp_spawn's workers, which trained and saved
    # (every process of a Slurm step gets the signal) while this process only waited for them.
    if preemption.preempted or PREEMPTION.requested:
        if trainer.is_global_zero:
            saved = "checkpoint saved" if cfg.exp_manager.explicit_log_dir else "no --checkpoint-dir, nothing saved"
            log(0, f"preempted at step {trainer.global_step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} "
                   "so the job script requeues")
        sys.exit(PREEMPTED_EXIT_CODE)
