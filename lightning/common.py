"""What every script in this folder shares: the command line, the model, the synthetic data, checkpointing
and reporting. The scripts differ only in how they ask Lightning to distribute the run.

The model and the synthetic data are the same as in pytorch/, so the benchmarks compare like with like.
"""

import argparse
import gc
import json
import os
import re
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

NUM_CLASSES = 10
# Exit status of a run that saved a checkpoint because the scheduler asked it to stop (SIGUSR1/SIGTERM).
# 75 is EX_TEMPFAIL from sysexits.h, "try again later": the job scripts requeue on it (CONTRACT.md C4).
PREEMPTED_EXIT_CODE = 75


def rank_prefix() -> str:
    """`[rankN] ` for every line (CONTRACT.md C3); the global rank from whichever launcher set it."""
    return f"[rank{os.environ.get('RANK', os.environ.get('SLURM_PROCID', '0'))}] "


def fail(message: str) -> None:
    """Bad input or a bad launch: one line on stderr and exit 2 (CONTRACT.md C4), never a traceback or a hang."""
    print(f"{rank_prefix()}error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def positive_int(text):
    value = int(text)
    if value < 1:
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
    """A bad flag is one line and exit 2, like every other bad input (not argparse's usage block)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(description: str, *, nprocs: bool = False, num_nodes: bool = False) -> argparse.Namespace:
    """The command line shared by every script of every folder (CONTRACT.md C2), plus --nprocs (alias --devices)
    and --num-nodes where they apply."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total (the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic"], default="synthetic",
                   help="only synthetic data in this folder (MNIST/CIFAR-10 need torchvision: see README.md)")
    p.add_argument("--data-dir", default=None, help="unused: only synthetic data in this folder")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="number of synthetic samples")
    p.add_argument("--checkpoint-dir", default=None,
                   help="checkpoints go here and resume from here is automatic (default: none, nothing is saved)")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on CPUs and GPUs that do it natively (compute capability >= 8.0), "
                        "else fp16 with loss scaling")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between rank-0 progress lines")
    p.add_argument("--timings-file", help="rank 0 writes per-step end times here (JSON) for the benchmarks")
    if nprocs:
        p.add_argument("--nprocs", "--devices", dest="nprocs", type=positive_int, default=None,
                       help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")
    if num_nodes:
        p.add_argument("--devices", type=positive_int, default=None,
                       help="devices per node (must equal --ntasks-per-node)")
        p.add_argument("--num-nodes", type=positive_int, default=None)
    return p.parse_args()


def precision(args: argparse.Namespace) -> str:
    """--amp: bf16 where the device does it natively, else fp16 with loss scaling (CONTRACT.md C10).
    torch.cuda.is_bf16_supported() also says yes on V100/T4, where bf16 is emulated and slow."""
    if not args.amp:
        return "32-true"
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 0):
        return "16-mixed"
    return "bf16-mixed"


def ddp(args: argparse.Namespace, start_method: str = "popen") -> DDPStrategy:
    """Lightning's DDP with the contract's --backend and --timeout (rendezvous and collectives)."""
    backend = None if args.backend == "auto" else args.backend  # None: nccl with CUDA, gloo without
    return DDPStrategy(start_method=start_method, process_group_backend=backend,
                       timeout=timedelta(seconds=args.timeout))


def join_restarted_attempt(args: argparse.Namespace) -> None:
    """Under `torchrun --max-restarts` (one agent): create the process group before Lightning does, in the agent's
    store under a key prefix of this attempt's own. Lightning then uses it as it is (it skips its own
    init_process_group when one exists).

    torch 2.13: restarted workers meet in the agent's store, which still holds the keys the failed attempt wrote;
    a new worker can read a dead worker's address from them and fail with "Gloo connectFullMesh failed ...
    Connect timeout/Connection refused" (seen here with Lightning too; the same with NCCL: pytorch/pytorch#167288).
    Across nodes the agents count restarts differently, so there the stock path stays and Slurm requeues."""
    if (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE") != "1"
            or "TORCHELASTIC_RESTART_COUNT" not in os.environ):
        return
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=args.timeout)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                       is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)
    backend = args.backend if args.backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


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
        # (Not trainer.estimated_stepping_batches: it shrinks to --max-steps when that is given, and then a run cut
        # short by --max-steps and resumed would follow another curve.)
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
        # Workers ignore SIGUSR1/SIGTERM: Slurm signals every process of the step, and a forked worker would run
        # the signal handler on its stale copy of the trainer (or die and make the main process raise).
        return ResumableLoader(self.train, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                               worker_init_fn=ignore_preemption_signals, trainer=self.trainer)


class ResumableLoader(DataLoader):
    """A loader Lightning can resume mid-epoch, where a preemption checkpoint is saved (between two steps).

    Lightning restarts the resumed epoch at its first batch unless the loader has state_dict/load_state_dict (it
    warns "your dataloader is not resumable"): the batches before the checkpoint were trained on twice and as many
    at the end of the epoch never, and the weights differed from an uninterrupted run's (found by the fault soak,
    tests/test_soak.py). The state is the optimizer step (one batch per step: no gradient accumulation here); the
    resumed epoch skips the batches before it, as pytorch/'s Trainer does. Not a count of the batches handed out:
    Lightning fetches one batch ahead."""

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


def ignore_preemption_signals(worker_id: int) -> None:
    for sig in Preemption.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Report(Callback):
    """The contract's log lines (CONTRACT.md C3), printed by rank 0: a progress line every `log_every` steps, one
    line per epoch with the loss and accuracy averaged over all ranks and the samples/s of the whole job, and
    where training starts, resumes and ends.

    Kept instead of self.log_dict(..., sync_dist=True): that computes the same averages but its bookkeeping costs
    about 1 ms every step (4-6 % of this step on CPU, measured: see benchmarks/README.md)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

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
        batches = trainer.num_training_batches
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self._print(trainer, f"world size {trainer.world_size} | backend {backend} | device "
                             f"{pl_module.device} | {len(trainer.datamodule.train)} samples | batch "
                             f"{self.args.batch_size}/rank | {batches} steps/epoch")
        self._report_resume(trainer)
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start, self.epoch_first_step = time.perf_counter(), trainer.global_step
        self.sums = torch.zeros(2, device=pl_module.device)  # this rank's loss x samples, correct predictions

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch[1])  # on the device, no sync: nothing is read before the epoch ends
        self.sums += torch.stack([outputs["loss"].detach().float() * n, outputs["correct"].float()])
        if trainer.global_step % self.args.log_every == 0:
            # .item() here waits for rank 0's own step only, and only every log_every steps
            self._print(trainer, f"epoch {trainer.current_epoch + 1} | batch {batch_idx + 1}/"
                                 f"{trainer.num_training_batches} | step {trainer.global_step} | "
                                 f"loss {outputs['loss'].item():.4f}")

    def on_train_epoch_end(self, trainer, pl_module):
        seconds = time.perf_counter() - self.epoch_start
        samples = (trainer.global_step - self.epoch_first_step) * self.args.batch_size * trainer.world_size
        totals = trainer.strategy.reduce(self.sums, reduce_op="sum")  # every rank: one collective per epoch
        if samples:
            loss, acc = (totals / samples).tolist()
            self._print(trainer, f"epoch {trainer.current_epoch + 1}/{self.args.epochs} | step "
                                 f"{trainer.global_step} | loss {loss:.4f} | acc {acc:.4f} | "
                                 f"{samples / seconds:.0f} samples/s | {seconds:.1f} s")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self._print(trainer, f"snapshot saved to {self.args.checkpoint_dir} (step {trainer.global_step})")

    def on_fit_end(self, trainer, pl_module):
        self._report_resume(trainer)  # a finished run resumed: Lightning trains nothing and skips on_train_start
        self._print(trainer, f"done: {trainer.global_step} steps in {time.perf_counter() - self.fit_start:.1f} s")


class Preemption(Callback):
    """SIGUSR1/SIGTERM (Slurm's warning before the time limit, preemption, scancel): finish the step, save a
    checkpoint, stop, and exit 75 so the job script requeues (CONTRACT.md C7).

    The handler only sets a flag; every CHECK_EVERY steps all ranks agree (max over ranks) whether to stop, so
    they stop at the same step and the checkpoint is a collective that everybody enters. Saving inside the
    handler, as Lightning's own Slurm requeue does, can interrupt a collective half-way.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    CHECK_EVERY = 10

    def __init__(self, checkpoint_dir: str | None):
        self.checkpoint_dir, self.requested, self.preempted = checkpoint_dir, False, False

    def install(self):
        """Called before the Trainer exists: a signal during start-up must not kill the process. Installed again
        at fit start, after Lightning's own handlers, so that ours are the ones that run."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def on_fit_start(self, trainer, pl_module):
        self.install()

    def on_train_start(self, trainer, pl_module):
        # Lightning installs its own SIGTERM handler after on_fit_start (Trainer._run, register_signal_handlers). It
        # stops the run at the next batch with SIGTERMException, a SystemExit(None): exit 0 without a checkpoint, so
        # the job script saw success and never requeued (found by the fault soak). Ours again: SIGTERM is a
        # preemption like SIGUSR1.
        self.install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.CHECK_EVERY:
            return
        flag = torch.tensor(float(self.requested), device=pl_module.device)
        if not trainer.strategy.reduce(flag, reduce_op="max").item():
            return
        self.preempted = True
        if self.checkpoint_dir:
            trainer.save_checkpoint(str(Path(self.checkpoint_dir) / f"preempted-step={trainer.global_step}.ckpt"))
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


def trainer_options(args: argparse.Namespace, start_time: float) -> dict:
    """Everything about the Trainer that does not depend on how the run is distributed."""
    preemption = Preemption(args.checkpoint_dir)
    preemption.install()
    callbacks = [Report(args), preemption]
    if args.checkpoint_dir:
        # Keeps the newest epoch=E-step=S.ckpt and last.ckpt, a link to it. (With save_top_k=0 Lightning
        # writes last.ckpt only when training ends, which is no use to a job that gets killed.) No version
        # counter: one run per directory, so a resumed run moves last.ckpt on instead of adding last-v1.ckpt.
        callbacks.append(ModelCheckpoint(dirpath=args.checkpoint_dir, save_last="link", save_top_k=1,
                                         every_n_epochs=args.save_every, enable_version_counter=False))
    if args.timings_file:
        callbacks.append(StepTimings(args.timings_file, start_time, args.batch_size))
    return dict(
        max_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        precision=precision(args),
        callbacks=callbacks,
        enable_checkpointing=bool(args.checkpoint_dir),
        default_root_dir=args.checkpoint_dir,
        logger=False,  # the Report callback prints on rank 0; no log directories to clean up
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def fit(trainer: pl.Trainer, args: argparse.Namespace) -> None:
    """Build the model and the data, then train, resuming from the furthest checkpoint in --checkpoint-dir.
    Exits 75 when a preemption signal stopped the run (after its checkpoint was saved)."""
    world_size = trainer.num_devices * trainer.num_nodes
    if args.dataset_size // (world_size * args.batch_size) == 0:
        fail(f"--dataset-size {args.dataset_size} is too small for one step of {world_size} "
             f"processes x --batch-size {args.batch_size}: lower --batch-size or use more data")
    pl.seed_everything(args.seed, workers=True, verbose=False)
    model = Classifier(args.lr, args.epochs)
    data = SyntheticData(args.dataset_size, args.batch_size, args.num_workers, args.seed)
    try:
        trainer.fit(model, datamodule=data, ckpt_path=resume_from(args.checkpoint_dir))
    except SIGTERMException:  # SIGTERM in Lightning's handler, before on_train_start: nothing saved since the last
        pass  # checkpoint; our handler ran too (Lightning calls it), so this exits 75 below and the job resumes
    except RuntimeError as e:
        if not (gist := lost_a_peer(e)):
            raise
        # Not this rank's fault: another process of the job (or its node) died and this rank's next all-reduce
        # failed. The checkpoints on disk are whole (Lightning writes them atomically); a requeued or resubmitted
        # run resumes from them.
        print(f"{rank_prefix()}error: lost contact with another rank ({gist}): a process or node of the "
              f"job died; see its log. The checkpoints are intact: a requeued or resubmitted run resumes from them",
              file=sys.stderr, flush=True)
        sys.exit(1)
    # A signal received at all means "stop": also in the parent of ddp_spawn's workers, which trained and saved
    # (every process of a Slurm step gets the signal) while this process only waited for them.
    preempted = any(isinstance(c, Preemption) and (c.preempted or c.requested) for c in trainer.callbacks)
    # The DDP wrapper Lightning dropped at teardown sits in reference cycles that hold the gloo process group.
    # Left to the interpreter's shutdown they can abort the process after a successful run (see
    # pytorch/common.py run()); free them now, before Lightning's atexit hook destroys the process group.
    gc.collect()
    if preempted:
        if trainer.is_global_zero:
            print(f"[rank0] preempted at step {trainer.global_step}: "
                  f"{'checkpoint saved' if args.checkpoint_dir else 'no --checkpoint-dir, nothing saved'}; "
                  f"exiting with {PREEMPTED_EXIT_CODE} so the job script requeues", flush=True)
        sys.exit(PREEMPTED_EXIT_CODE)


def lost_a_peer(error: RuntimeError) -> str:
    """The gist of a collective that failed because a peer is gone (gloo: "Connection reset/closed by peer",
    "Timed out waiting ... for recv"; NCCL: a DistBackendError), or "" for any other error."""
    text = str(error).strip()
    if not (torch.distributed.is_initialized()
            and (isinstance(error, torch.distributed.DistError) or "gloo/transport" in text)):
        return ""
    text = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else type(error).__name__)  # "[pair.cc:537] "
    return text.split(". This is typically")[0][:200]


def resume_from(checkpoint_dir: str | None) -> str | None:
    """The checkpoint to resume from: the one that holds the most progress (its stored global_step), or None for a
    fresh start.

    Never by file time: a checkpoint written late can hold old progress (e.g. one written by a process with a
    stale copy of the trainer), and copies or restores change mtimes. On a tie the preemption checkpoint wins:
    after it, Lightning ends the stopped epoch early and ModelCheckpoint saves epoch=E-step=S.ckpt as if that
    epoch had run to its end, so resuming from that one would skip the rest of the epoch. An unreadable file is
    skipped with a warning (the next best is used); if none is readable that is an error, not a silent fresh
    start.
    """
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None
    best, best_key, problems = None, None, []
    for path in Path(checkpoint_dir).glob("*.ckpt"):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = int(ckpt["global_step"])
        except Exception as e:  # truncated, not a checkpoint, ...
            problems.append(f"{path} is unreadable ({type(e).__name__})")
            print(f"{rank_prefix()}warning: {problems[-1]}", file=sys.stderr, flush=True)
            continue
        key = (step, path.name.startswith("preempted-"))
        if best_key is None or key > best_key:
            best, best_key = str(path), key
    if best is None and problems:
        fail("no usable checkpoint: " + "; ".join(problems) + ". Delete or move the damaged file(s) to start over.")
    return best
