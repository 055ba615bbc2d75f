"""Train with FSDP2 (torch.distributed.fsdp.fully_shard), launched by torchrun.

    torchrun --standalone --nproc_per_node 2 fsdp.py --epochs 3 --checkpoint-dir checkpoints/fsdp

Where DDP keeps a full copy of the weights, gradients and optimizer state on every GPU, FSDP shards all three
across ranks and gathers each layer's weights only while that layer runs. The model is built on the meta device
(shapes, no memory) and sharded before any weight exists on a GPU, so a model larger than one GPU fits; rank 0
builds the initial weights in host memory and they are scattered to the shards. The checkpoint is sharded too:
every rank writes its own shard with torch.distributed.checkpoint (DCP), and a job requeued onto another number
of GPUs resumes from it: DCP reshards on load, and the data position moves as in recipe.py's Trainer (or the resume is
refused in one line when it cannot continue after the same samples). To get one ordinary file (for inference,
or to compare):
    python -m torch.distributed.checkpoint.format_utils dcp_to_torch <dir>/step-00000064 model.pt
"""

import contextlib
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from cluster import (allow_tf32, bf16_is_native, check_shared_directory, io_group, parse_args, run, wait_for_rank0)
from multigpu_torchrun import setup
from recipe import ConvNet, Trainer, build_dataset, build_loader
from toolkit import RecipeError, adapt_to_another_shape, atomic_write, log


def sharded_model(dataset, args, rank, device):
    """Shard each block on its own, then the root: a block's full weights exist only while that block runs.

    --amp: FSDP's own mixed precision instead of autocast: weights gathered and computed in bf16 (fp16 where
    bf16 is not native), gradients reduced in fp32 so that summing over many ranks loses nothing.
    """
    policy = MixedPrecisionPolicy()
    if args.amp:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16_is_native(device) else torch.float16,
                                      reduce_dtype=torch.float32)
    full = ConvNet(dataset.in_channels).state_dict() if rank == 0 else {}  # initial weights, host memory, rank 0
    with torch.device("meta"):
        model = ConvNet(dataset.in_channels)  # every rank: shapes only, no memory
    for block in (*model.features, *model.classifier):
        if any(p.requires_grad for p in block.parameters(recurse=False)):
            fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    model.to_empty(device=device)  # this rank's shards, uninitialised
    # Rank 0's weights to everybody's shards: the same initial model as DDP's for the same seed.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


class FSDPTrainer(Trainer):
    """The shared loop, with FSDP's precision and a sharded checkpoint in place of snapshot.pt.

    Every rank writes its shard (DCP) into a temporary directory; rank 0 renames it into place once all shards
    are written and then points `latest` at it, so a crash mid-save never leaves a half checkpoint.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        if self.args.amp:  # FSDP casts the weights itself (see sharded_model); fp16 still needs loss scaling
            self.autocast = contextlib.nullcontext
            self.scaler = None if bf16_is_native(self.device) else torch.amp.GradScaler(self.device.type)

    def _state(self):
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        extra = {"scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                 "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                 "batch_size": self.args.batch_size, "rng": torch.get_rng_state()}
        if self.scaler is not None:
            extra["scaler"] = self.scaler.state_dict()
        return {"model": model_sd, "optimizer": optim_sd, "extra": extra}

    def _save_snapshot(self):
        folder, name = self.args.checkpoint_dir, f"step-{self.step:08d}"
        final = os.path.join(folder, name)
        # Collective: every rank writes its shard. DCP's own collectives and the wait after it go over the gloo I/O
        # group: a save to a slow filesystem is bounded by --io-timeout, not by the NCCL watchdog's --timeout.
        dcp.save(self._state(), checkpoint_id=final + ".tmp", process_group=io_group(self.args.io_timeout))
        wait_for_rank0(self.args.io_timeout)
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(final + ".tmp", final)
            atomic_write(os.path.join(folder, "latest"), lambda f: f.write(name.encode()))
            # keep the newest two: the one before the latest is the fallback if the latest is ever damaged
            older = sorted(d for d in os.listdir(folder) if d.startswith("step-") and d != name)
            for d in older[:-1]:
                shutil.rmtree(os.path.join(folder, d), ignore_errors=True)
            log(0, f"sharded checkpoint saved to {folder} (step {self.step})")
        wait_for_rank0(self.args.io_timeout)

    def _resume(self):
        if self.args.checkpoint_dir:
            check_shared_directory(self.args.checkpoint_dir, self.rank)
        latest = os.path.join(self.args.checkpoint_dir or "", "latest")
        # Rank 0 decides and tells the others: ranks must never disagree about whether to resume.
        choice = [open(latest).read().strip() if self.rank == 0 and os.path.exists(latest) else None]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return
        path = os.path.join(self.args.checkpoint_dir, choice[0])
        state = self._state()
        try:
            # in place: each rank reads only the shards it owns
            dcp.load(state, checkpoint_id=path, process_group=io_group(self.args.io_timeout))
        except Exception as e:
            raise RecipeError(f"cannot load the sharded checkpoint {path}: {str(e).splitlines()[0][:300]}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        extra = state["extra"]
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and "scaler" in extra:
            self.scaler.load_state_dict(extra["scaler"])
        torch.set_rng_state(extra["rng"])
        self.epoch, self.step, self.batch_in_epoch = extra["epoch"], extra["step"], extra["batch_in_epoch"]
        adapt_to_another_shape(self, extra, path, self._log)  # DCP resharded the weights; the data position: ours
        self._log(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")


def train_sharded(args, device, rank, world_size):
    """recipe.train with the model sharded (FSDP2) instead of replicated (DDP), and FSDPTrainer's checkpoint."""
    allow_tf32()
    torch.manual_seed(args.seed)  # rank 0 builds the initial weights from it (see sharded_model)
    dataset = build_dataset(args, rank)
    loader = build_loader(dataset, args, rank, world_size)
    model = sharded_model(dataset, args, rank, device)
    if rank == 0:
        log(0, f"world size {world_size} | FSDP2 | backend {dist.get_backend()} | device {device} | "
               f"{len(dataset)} samples | batch {args.batch_size}/rank | {len(loader)} steps/epoch")
    FSDPTrainer(model, loader, args, device, rank, world_size).train()


def main():
    args = parse_args(__doc__)
    rank, world_size, device = setup(args)  # multigpu_torchrun.py's: ranks from torchrun, init_process_group
    train_sharded(args, device, rank, world_size)


if __name__ == "__main__":
    run(main)
