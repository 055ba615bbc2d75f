"""What every script in this folder shares (besides the command line, cli.py): the NeMo model, the synthetic
data, exp_manager's checkpoints, preemption and the contract's log lines. The scripts differ only in how they ask
Lightning to distribute the run.

The ConvNet and the synthetic data are the same as in pytorch/, so the benchmarks compare like with like.
"""

import gc
import json
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from nemo.core import ModelPT
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from cli import fail, rank_prefix

NUM_CLASSES = 10
# Exit status of a run that saved a checkpoint because the scheduler asked it to stop (SIGUSR1/SIGTERM).
# 75 is EX_TEMPFAIL from sysexits.h, "try again later": the job scripts requeue on it (CONTRACT.md C4).
PREEMPTED_EXIT_CODE = 75


def ddp(cfg: DictConfig, start_method: str = "popen") -> DDPStrategy:
    """Lightning's DDP with the contract's --backend and --timeout (rendezvous and collectives)."""
    backend = None if cfg.recipe.backend == "auto" else cfg.recipe.backend  # None: nccl with CUDA, gloo without
    return DDPStrategy(start_method=start_method, process_group_backend=backend,
                       timeout=timedelta(seconds=cfg.recipe.timeout))


# ------------------------------------------------------------------------------------------ model and data


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


class ToyClassifier(ModelPT):
    """The ConvNet as a NeMo model: its config travels with it (model section of conf/config.yaml), exp_manager
    checkpoints it, and `save_to`/`restore_from` write and read the .nemo archive (config + weights)."""

    def __init__(self, cfg: DictConfig, trainer: pl.Trainer | None = None):
        super().__init__(cfg=cfg, trainer=trainer)
        # ModelPT writes `target: common.ToyClassifier` into the config, and restore_from refuses a .nemo whose
        # target lies outside NeMo's approved namespaces (nemo.*, torch.nn.*, ...: UnsafeTargetError). Without
        # it, ToyClassifier.restore_from(path) builds the class it is called on.
        with open_dict(self._cfg):
            self._cfg.pop("target", None)
        self.net = ConvNet()

    def __getstate__(self):
        # ddp_spawn (multigpu.py) pickles the model to its workers, and ModelPT.__init__ replaced training_step
        # with a wrapt proxy, which cannot be pickled ("object proxy must define __reduce__()"). The proxy only
        # forwards a 'log' key this model never returns: the workers use the plain method.
        state = dict(super().__getstate__())
        state.pop("training_step", None)
        return state

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
        self._train_config = train_data_config

    def setup_validation_data(self, val_data_config):
        pass  # no validation set: the epoch line reports training accuracy, as in pytorch/

    def train_dataloader(self):
        c = self._train_config
        self.train_set = synthetic_dataset(c.dataset_size)
        # Each rank reads its own shard, reshuffled every epoch from (seed, epoch) (Lightning calls set_epoch).
        # Also on one device, so that a resumed run sees the batches an uninterrupted run would.
        sampler = DistributedSampler(self.train_set, num_replicas=self.trainer.world_size,
                                     rank=self.trainer.global_rank, shuffle=True, seed=c.seed,
                                     drop_last=True)
        # Workers ignore SIGUSR1/SIGTERM: Slurm signals every process of the step; the parent decides.
        return DataLoader(self.train_set, batch_size=c.batch_size, sampler=sampler, drop_last=True,
                          num_workers=c.num_workers, persistent_workers=c.num_workers > 0,
                          worker_init_fn=ignore_preemption_signals)

    def configure_optimizers(self):
        # The optimizer from NeMo's registry (model.optim: name, lr, momentum). The cosine schedule spans
        # trainer.max_epochs, not max_steps (which only stops early), so a run cut short by --max-steps and
        # resumed follows the same learning-rate curve as an uninterrupted one (as in pytorch/). NeMo's own
        # `sched` would shrink to max_steps when that is set.
        self.setup_optimization(self._cfg.optim)
        c = self._train_config
        steps_per_epoch = c.dataset_size // self.trainer.world_size // c.batch_size
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self._optimizer, T_max=self.trainer.max_epochs * steps_per_epoch)
        return {"optimizer": self._optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def list_available_models(cls):
        return None  # no pretrained checkpoints on NGC for a toy model


def ignore_preemption_signals(worker_id: int) -> None:
    for sig in Preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ------------------------------------------------------------------------------------------ callbacks


class Report(Callback):
    """The contract's log lines (CONTRACT.md C3), printed by rank 0: a progress line every `log_every` steps, one
    line per epoch with the loss and accuracy averaged over all ranks and the samples/s of the whole job, and
    where training starts, resumes and ends."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.last_snapshot_step = cfg, None

    def _print(self, trainer, message):
        if trainer.is_global_zero:
            print(f"[rank0] {message}", flush=True)

    def on_fit_start(self, trainer, pl_module):
        self.fit_start, self.resume_reported = time.perf_counter(), False

    def _report_resume(self, trainer):
        if trainer.ckpt_path and not self.resume_reported:
            self.resume_reported = True
            self._print(trainer, f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch + 1}, "
                                 f"step {trainer.global_step}")

    def on_train_start(self, trainer, pl_module):
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self._print(trainer, f"world size {trainer.world_size} | backend {backend} | device {pl_module.device} | "
                             f"{len(pl_module.train_set)} samples | batch {self.cfg.model.train_ds.batch_size}/rank"
                             f" | {trainer.num_training_batches} steps/epoch")
        self._report_resume(trainer)
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.epoch_first_step = time.perf_counter(), trainer.global_step
        self.sums = torch.zeros(2, device=pl_module.device)  # this rank's loss x samples, correct predictions

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch[1])  # on the device, no sync: nothing is read before the epoch ends
        self.sums += torch.stack([outputs["loss"].detach().float() * n, outputs["correct"].float()])
        if trainer.global_step % self.cfg.recipe.log_every == 0:
            self._print(trainer, f"epoch {trainer.current_epoch + 1} | batch {batch_idx + 1}/"
                                 f"{trainer.num_training_batches} | step {trainer.global_step} | "
                                 f"loss {outputs['loss'].item():.4f}")

    def on_train_epoch_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.epoch_start
        samples = (trainer.global_step - self.epoch_first_step) * self.cfg.model.train_ds.batch_size * \
            trainer.world_size
        totals = trainer.strategy.reduce(self.sums, reduce_op="sum")  # every rank: one collective per epoch
        if samples:
            loss, acc = (totals / samples).tolist()
            self._print(trainer, f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} | step "
                                 f"{trainer.global_step} | loss {loss:.4f} | acc {acc:.4f} | "
                                 f"{samples / seconds:.0f} samples/s | {seconds:.1f} s")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # NeMo's callback writes the top-k file and *-last.ckpt at the same step: one line for both
        if trainer.global_step != self.last_snapshot_step:
            self.last_snapshot_step = trainer.global_step
            self._print(trainer, f"snapshot saved to {self.cfg.exp_manager.explicit_log_dir} "
                                 f"(step {trainer.global_step})")

    def on_fit_end(self, trainer, pl_module):
        self._report_resume(trainer)  # a finished run resumed: Lightning trains nothing and skips on_train_start
        self._print(trainer, f"done: {trainer.global_step} steps in {time.perf_counter() - self.fit_start:.1f} s")


class Preemption(Callback):
    """SIGUSR1/SIGTERM (Slurm's warning before the time limit, preemption, scancel): finish the step, save
    *-last.ckpt through NeMo's checkpoint callback, stop, and exit 75 so the job script requeues (CONTRACT.md C7).

    Why not exp_manager's PreemptionCallback (create_preemption_callback): it runs only with CUDA, listens to
    SIGTERM alone (Slurm's --signal warning is USR1), and ends with sys.exit(0), which tells the job script the run
    finished. Like it, this one saves through the checkpoint callback, so the checkpoint is the *-last.ckpt that
    exp_manager resumes from, and the callback's "already saved at this step" record stops Lightning from writing
    another, epoch-end checkpoint claiming the interrupted epoch ran to its end.

    The handler only sets a flag; every CHECK_EVERY steps all ranks agree (max over ranks) whether to stop, so
    they stop at the same step and the checkpoint is a collective everybody enters.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    CHECK_EVERY = 10

    def __init__(self):
        self.requested, self.preempted = False, False

    def install(self):
        """Called before the Trainer exists (a signal during start-up must not kill the process), and again at
        fit start, after Lightning's own handlers, so that ours are the ones that run."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def on_fit_start(self, trainer, pl_module):
        self.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.CHECK_EVERY:
            return
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        if not trainer.strategy.reduce(flag, reduce_op="max").item():
            return
        self.preempted = True
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            # As NeMo's PreemptionCallback: count this batch as completed (Lightning does so only after this hook),
            # or the resumed run would replay it.
            from nemo.utils.exp_manager import _flush_in_flight_batch_progress

            _flush_in_flight_batch_progress(trainer)
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
        trainer.should_stop = True


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


# ------------------------------------------------------------------------------------------ building and training


def trainer_options(cfg: DictConfig, start_time: float) -> dict:
    """The Trainer arguments from the config's trainer section plus the recipe's callbacks; the script adds
    devices, num_nodes, strategy and plugins (how the run is distributed)."""
    preemption = Preemption()
    preemption.install()
    callbacks = [Report(cfg), preemption]
    if cfg.recipe.timings_file:
        callbacks.append(StepTimings(cfg.recipe.timings_file, start_time, cfg.model.train_ds.batch_size))
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options.pop("devices", None)
    options.pop("num_nodes", None)
    return {**options, "callbacks": callbacks}


def fit(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """Check the run against the world size, let exp_manager set up checkpoints and resume, build the NeMo model
    and train. Exits 75 when a preemption signal stopped the run (after its checkpoint was saved)."""
    from nemo.utils import logging as nemo_logging
    from nemo.utils.exp_manager import exp_manager

    nemo_logging.setLevel(nemo_logging.WARNING)  # NeMo's INFO lines are not the contract's; warnings stay
    world_size = trainer.world_size
    ds = cfg.model.train_ds
    if ds.dataset_size // (world_size * ds.batch_size) == 0:
        fail(f"--dataset-size {ds.dataset_size} is too small for one step of {world_size} processes x "
             f"--batch-size {ds.batch_size}: lower --batch-size or use more data")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.exp_manager.explicit_log_dir:
        # Checkpoints in <dir>/checkpoints; resume_if_exists points trainer.ckpt_path at *-last.ckpt, if any.
        exp_manager(trainer, settle_last_checkpoints(cfg.exp_manager))
    # Resolved: the .nemo archive keeps this section alone, where ${seed} would point nowhere.
    model = ToyClassifier(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)), trainer=trainer)
    trainer.fit(model)  # from trainer.ckpt_path, which exp_manager set
    # A signal received at all means "stop": also in the parent of ddp_spawn's workers, which trained and saved
    # (every process of a Slurm step gets the signal) while this process only waited for them.
    preempted = any(isinstance(c, Preemption) and (c.preempted or c.requested) for c in trainer.callbacks)
    # The DDP wrapper Lightning dropped at teardown sits in reference cycles that hold the gloo process group;
    # free them before Lightning's atexit hook destroys the process group (see pytorch/common.py run()).
    gc.collect()
    if preempted:
        if trainer.is_global_zero:
            saved = "checkpoint saved" if cfg.exp_manager.explicit_log_dir else "no --checkpoint-dir, nothing saved"
            print(f"[rank0] preempted at step {trainer.global_step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} "
                  "so the job script requeues", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def settle_last_checkpoints(exp_cfg: DictConfig) -> DictConfig:
    """exp_manager's settings, with the checkpoint to resume from chosen here when exp_manager would refuse.

    exp_manager resumes from the one *-last.ckpt in <dir>/checkpoints and stops with "Multiple checkpoints ...
    that matches *last.ckpt" when a job was killed between writing the new one and deleting the old one (NeMo
    issue #7948: "manually clean up the checkpoints folder"). Then the readable one with the most progress (its
    stored global_step, never the file time) is resumed, with a warning; none readable is an error naming them.
    """
    from nemo.utils.callbacks import NeMoModelCheckpoint

    directory = Path(exp_cfg.explicit_log_dir) / "checkpoints"
    candidates = sorted(directory.glob("*last.ckpt")) if directory.is_dir() else []
    if len(candidates) <= 1:
        return exp_cfg  # exp_manager's own rule
    best, best_step, problems = None, -1, []
    for path in candidates:
        try:
            if NeMoModelCheckpoint.is_checkpoint_unfinished(path):
                raise ValueError("its save never finished")
            # weights_only=False: a NeMo checkpoint holds its OmegaConf config; these are this run's own files
            step = int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        except Exception as e:  # truncated, unfinished, not a checkpoint
            problems.append(f"{path} is unusable ({type(e).__name__}: {e})")
            continue
        if step > best_step:
            best, best_step = path, step
    if best is None:
        fail("no usable checkpoint: " + "; ".join(problems) + ". Delete or move them to start over.")
    if rank_prefix() == "[rank0] ":
        print(f"[rank0] warning: {len(candidates)} *last.ckpt files in {directory} (a save was interrupted?); "
              f"resuming from the one with the most progress: {best.name} (step {best_step})",
              file=sys.stderr, flush=True)
    exp_cfg = exp_cfg.copy()
    with open_dict(exp_cfg):
        exp_cfg.resume_if_exists, exp_cfg.resume_from_checkpoint = False, str(best)
    return exp_cfg
