"""The lesson of this folder, top to bottom: the model and the data, a DeepSpeed engine around them
(deepspeed.initialize: the JSON config chooses the ZeRO stage, offload and precision), the training loop
(engine.backward, engine.step) and DeepSpeed's own sharded checkpoints, saved and resumed. Every script calls
train() once its process has joined the others (its setup()); cluster.py holds the plumbing, gpt.py the GPT.
"""

import contextlib
import functools
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from cluster import (TAG_PREFIX, check_dataset_fits, config_errors, device_sync, import_deepspeed, load_ds_config,
                     mark_complete, mnist_dataset, precision_of, reduce_max, report_memory, resume_on_another_shape,
                     snapshot_to_load)
from gpt import GPT, synthetic_text, text_dataset
from toolkit import (PREEMPTED_EXIT_CODE, PREEMPTION, RecipeError, StepTimer, ignore_preemption_signals, log,
                     snapshot_due)

# ------------------------------------------------------------------------------------------------ model and data


class ConvNet(nn.Module):
    """The shared toy model (identical in every folder, for the benchmarks): a small CNN."""

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


def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise), generated from its
    own seed: every rank and every run builds the identical dataset without any file."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    images = prototypes[labels] + torch.randn(size, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


def build_dataset(args):
    if args.data != "synthetic" and not Path(args.data_dir).is_dir():
        raise RecipeError(f"--data-dir {args.data_dir} is not a directory")
    if args.data == "mnist":
        ds = mnist_dataset(args.data_dir)
    elif args.data == "text":
        ds = text_dataset(args.data_dir)
    else:
        ds = synthetic_dataset(args.dataset_size) if args.model == "convnet" else synthetic_text(args.dataset_size)
    ds.in_channels = 1
    return ds


def build_loader(dataset, args, rank=0, world_size=1):
    # Each rank reads a disjoint 1/world_size, reshuffled by set_epoch(); one process is a one-replica sampler.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_preemption_signals)


def prepare(args, world_size, device):
    """The DeepSpeed config and the dataset, checked before any process waits for another: bad input fails the same
    way on every rank, at once, instead of leaving one rank in a rendezvous that its peer has already left."""
    config = load_ds_config(args, world_size, device)
    dataset = build_dataset(args)
    check_dataset_fits(dataset, world_size, args.batch_size, config["gradient_accumulation_steps"])
    return config, dataset


def build_model_and_optimizer(args, dataset, steps_per_epoch, config):
    """The model (under ZeRO-3 the GPT is built in zero.Init: each rank allocates only its shard of each parameter,
    so a model larger than one device can start); a client optimizer unless the config has an "optimizer" section;
    the recipe's LR schedule, or None where the config has a "scheduler" (DeepSpeed builds it; a client one wins)."""
    zero3_gpt = args.model == "gpt" and config.get("zero_optimization", {}).get("stage") == 3
    with import_deepspeed().zero.Init(config_dict_or_path=config) if zero3_gpt else contextlib.nullcontext():
        model = GPT(args.gpt_params) if args.model == "gpt" else ConvNet(dataset.in_channels, num_classes=10)
    if "optimizer" in config:  # its lr: the file's, unless --lr was given (cluster.learning_rate)
        optimizer = None
    elif args.model == "convnet":  # the same optimizer as pytorch/ and the raw DDP baseline
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:  # Adam's two moments are what the ZeRO paper's 12 bytes per parameter count
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # The cosine spans --epochs (--max-steps only stops early): a run cut short and resumed follows the same curve.
    cosine = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs * steps_per_epoch)
    return model, optimizer, None if "scheduler" in config else cosine


# ------------------------------------------------------------------------------------------------ snapshots, the loop


def save_snapshot(engine, checkpoint_dir, progress):
    """DeepSpeed's collective save: every rank writes its shard of the model and optimizer states."""
    tag = f"{TAG_PREFIX}{progress['step']:08d}"
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state={**progress, "rng": torch.get_rng_state()})
    dist.barrier()  # every rank's files are on disk before the tag is called complete
    if dist.get_rank() == 0:  # complete.json, then all tags but the newest two deleted
        mark_complete(checkpoint_dir, tag, {**progress, "world_size": dist.get_world_size()})
    dist.barrier()


class Trainer:
    """The PyTorch DDP tutorial's loop (_run_batch, _run_epoch, _save_snapshot) with a DeepSpeed engine where DDP and
    the optimizer were, plus exact resume (even mid-epoch), preemption and metrics over all ranks."""

    def __init__(self, args, inputs, rank, world_size, device):
        deepspeed = import_deepspeed()
        config, self.dataset = inputs
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.accumulation = config["gradient_accumulation_steps"]
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
        self.loader = build_loader(self.dataset, args, rank, world_size)
        self.steps_per_epoch = len(self.loader) // self.accumulation
        self.model, optimizer, scheduler = build_model_and_optimizer(args, self.dataset, self.steps_per_epoch, config)
        self.snapshot = snapshot_to_load(args.checkpoint_dir, world_size, config, rank)  # another world size: universal
        with config_errors(args.ds_config):  # the engine owns optimizer, schedule, precision and ZeRO's partitions
            self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   model_parameters=self.model.parameters(), config=config)
        # With bf16/fp16 DeepSpeed holds the weights in that type and casts nothing for us: images must match.
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_of(self.engine))
        self.epoch = self.step = self.batch_in_epoch = 0  # progress: what a snapshot must restore
        self.preempted, self.timer = False, None

    def train(self):
        self._resume()
        engine, args, stage = self.engine, self.args, self.engine.zero_optimization_stage()
        params = sum(p.numel() for p in self.model.parameters()) if stage < 3 else "sharded"
        self._log(f"world size {self.world_size} | backend {dist.get_backend()} | device {self.device} | ZeRO stage "
                  f"{stage} | {precision_of(engine)} | {params} params | {len(self.dataset)} samples | batch "
                  f"{args.batch_size}/rank x {self.accumulation} accumulation | {self.steps_per_epoch} steps/epoch")
        if args.timings_file and self.rank == 0:  # a device sync per step, only when timing: it costs throughput
            self.timer = StepTimer(args.timings_file, device_sync(self.device))
        start = time.perf_counter()
        while self._training_left():
            self._run_epoch()
            if snapshot_due(args, self.step, self.epoch, last=self.preempted or not self._training_left()):
                self._save_snapshot()
            if self.preempted:
                saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                self._log(f"preempted at step {self.step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} so the job "
                          f"script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        if self.timer:
            self.timer.write(world_size=self.world_size, batch_size=args.batch_size)
        self._log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")

    def _training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def _run_epoch(self):
        epoch_start = time.perf_counter()
        self.loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats
        self.engine.train()
        usable = len(self.loader) // self.accumulation * self.accumulation  # micro batches of whole steps
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
        loss_sum, seen = torch.zeros((), device=self.device), 0  # totals stay on the device: no sync per step
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i, (x, y) in enumerate(self.loader):
            if i >= usable:
                break
            if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
                continue
            boundary = (i + 1) % self.accumulation == 0
            loss, hits, n = self._run_batch(x, y, boundary)
            self.batch_in_epoch, loss_sum, correct, seen = i + 1, loss_sum + loss * n, correct + hits, seen + n
            if not boundary:
                continue
            self.step += 1
            if self.timer:
                self.timer()
            if self.step % self.args.log_every == 0 and self.rank == 0:  # .item() syncs: rank 0 only
                log(0, f"epoch {self.epoch + 1} | batch {i + 1}/{usable} | step {self.step} | loss {loss.item():.4f}")
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            if PREEMPTION.agreed(self.step, lambda flag: reduce_max(flag, self.device)):
                self.preempted = True
                break
            if snapshot_due(self.args, self.step) and i + 1 < usable:  # (an epoch's end saves in train())
                self._save_snapshot()  # --save-every-steps: mid-epoch, with the position in the epoch
        totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=self.device)])
        dist.all_reduce(totals)  # one collective per epoch: metrics over all ranks, not just rank 0's
        elapsed = time.perf_counter() - epoch_start
        loss_sum, correct, seen = totals.tolist()
        if seen:
            self._log(f"epoch {self.epoch + 1}/{self.args.epochs} | step {self.step} | loss {loss_sum / seen:.4f} | "
                      f"acc {correct / seen:.4f} | {seen / elapsed:.0f} samples/s | {elapsed:.1f} s")
        if self.batch_in_epoch >= usable:  # the epoch ran to its end (not cut short by --max-steps or preemption)
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _run_batch(self, x, y, boundary):
        """engine.backward() reduces (ZeRO: reduce-scatters) the gradients; engine.step() steps the optimizer and
        the LR schedule only at the end of each gradient_accumulation_steps micro batches."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.dtype is not None and x.is_floating_point():
            x = x.to(self.dtype)
        logits = self.engine(x)
        if logits.dim() == 3:  # the GPT: one prediction per next token
            logits, y = logits.flatten(0, 1), y.flatten()
        loss = F.cross_entropy(logits.float(), y)
        hits = (logits.argmax(1) == y).sum()
        self.engine.backward(loss)
        if self.args.memory_report and self.step == 1 and boundary:
            report_memory(self.engine, self.rank)  # the second step: optimizer states exist, gradients reduced
        self.engine.step()
        return loss.detach(), hits, y.numel()

    def _save_snapshot(self):
        samples = self.batch_in_epoch * self.args.batch_size * self.world_size  # of this epoch, by all ranks
        progress = {"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                    "batch_size": self.args.batch_size, "samples_in_epoch": samples}
        save_snapshot(self.engine, self.args.checkpoint_dir, progress)  # collective: every rank writes its shard
        self._log(f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")

    def _resume(self):
        if self.snapshot is None:  # (tag, progress): chosen by rank 0 for every rank, in __init__
            return
        tag, saved = self.snapshot
        path, client = self.engine.load_checkpoint(self.args.checkpoint_dir, tag=tag)
        if path is None:
            raise RecipeError(f"DeepSpeed could not load checkpoint {tag} from {self.args.checkpoint_dir}")
        torch.set_rng_state(client["rng"].cpu())  # the CPU generator takes a CPU ByteTensor, wherever it loaded
        self.epoch, self.step, self.batch_in_epoch = client["epoch"], client["step"], client["batch_in_epoch"]
        resume_on_another_shape(self, saved, Path(self.args.checkpoint_dir) / tag)  # another world size or batch
        self._log(f"resumed from {Path(self.args.checkpoint_dir) / tag}: epoch {self.epoch + 1}, step {self.step}")

    def _log(self, message):
        if self.rank == 0:
            log(0, message)


def train(args, inputs, rank, world_size, device):
    """Everything after the process group exists; the same for every launch pattern."""
    Trainer(args, inputs, rank, world_size, device).train()
