"""Train with FSDP2 (torch.distributed.fsdp.fully_shard), launched by torchrun.

    torchrun --standalone --nproc_per_node 2 fsdp.py --epochs 3 --checkpoint-dir checkpoints/fsdp

Where DDP keeps a full copy of the weights, gradients and optimizer state on every GPU, FSDP shards all three
across ranks and gathers each layer's weights only while that layer runs. The checkpoint is sharded too:
every rank writes its own shard with torch.distributed.checkpoint (DCP), and a checkpoint written by N ranks
loads on M. To get one ordinary file (for inference, or to compare):
    python -m torch.distributed.checkpoint.format_utils dcp_to_torch <dir>/step-00000064 model.pt
"""

import os
import shutil
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import (
    RecipeError,
    StepTimer,
    autocast_and_scaler,
    build_dataset,
    build_model,
    build_optimizer,
    check_dataset_fits,
    explained_rendezvous,
    log,
    parse_args,
    pick_backend,
    run,
    training_left,
)


def launch_env():
    """RANK, LOCAL_RANK, WORLD_SIZE as torchrun sets them; a clear error when the launcher is missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc_per_node N "
                          f"{os.path.basename(__file__)}` (or set all of {', '.join(names)})")
    return (int(os.environ[n]) for n in names)


def setup_distributed(args):
    rank, local_rank, world_size = launch_env()
    if torch.cuda.is_available():
        # With --gpus-per-task each process may see only one device (always "cuda:0").
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = pick_backend(args.backend)
    # The timeout bounds both the rendezvous and every later collective: a dead peer becomes an error.
    with explained_rendezvous(rank, world_size, args.timeout):
        dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout),
                                device_id=device if backend == "nccl" else None)
    return rank, world_size, device


def build_dataloader(dataset, args, rank, world_size):
    # Each rank reads a disjoint 1/world_size of the data; set_epoch() reshuffles it every epoch.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0)


def shard_model(model):
    """Shard each block on its own, then the root: a block's full weights exist only while that block runs."""
    for block in (*model.features, *model.classifier):
        if any(p.requires_grad for p in block.parameters(recurse=False)):
            fully_shard(block)
    return fully_shard(model)


def train_epoch(model, loader, optimizer, scheduler, state, args, device, timer, skip=0):
    """One pass over this rank's shard; returns summed loss, correct predictions and samples, as tensors.

    Totals stay on the device: reading a value (`.item()`) every step would stall the GPU each time.
    """
    model.train()
    autocast, scaler = state["autocast"], state["scaler"]
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()  # FSDP reduce-scatters gradients: each rank keeps its shard
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()  # FSDP reduce-scatters gradients: each rank keeps the shard it owns
            optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["batch_in_epoch"] = i + 1
        timer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if state["step"] % args.log_every == 0 and state["rank"] == 0:
            log(0, f"epoch {state['epoch'] + 1} | batch {i + 1}/{len(loader)} | step {state['step']} | "
                   f"loss {loss.item():.4f}")
        if args.max_steps and state["step"] >= args.max_steps:
            break
    return loss_sum, correct, seen


def save_checkpoint(model, optimizer, scheduler, state, args):
    """Every rank writes its shard (DCP) into a temporary directory; rank 0 renames it into place once all
    shards are written and then points `latest` at it, so a crash mid-save never leaves a half checkpoint."""
    name = f"step-{state['step']:08d}"
    final = os.path.join(args.checkpoint_dir, name)
    tmp = final + ".tmp"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    extra = {"scheduler": scheduler.state_dict(), "epoch": state["epoch"], "step": state["step"],
             "batch_in_epoch": state["batch_in_epoch"], "rng": torch.get_rng_state()}
    dcp.save({"model": model_sd, "optimizer": optim_sd, "extra": extra}, checkpoint_id=tmp)
    dist.barrier()
    if state["rank"] == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(args.checkpoint_dir, "latest.tmp"), "w") as f:
            f.write(name)
        os.replace(os.path.join(args.checkpoint_dir, "latest.tmp"), os.path.join(args.checkpoint_dir, "latest"))
        # keep the newest two: the one before the latest is the fallback if the latest is ever damaged
        older = sorted(d for d in os.listdir(args.checkpoint_dir) if d.startswith("step-") and d != name)
        for d in older[:-1]:
            shutil.rmtree(os.path.join(args.checkpoint_dir, d), ignore_errors=True)
    dist.barrier()


def resume(model, optimizer, scheduler, state, args, device):
    latest = os.path.join(args.checkpoint_dir or "", "latest")
    # Rank 0 decides and tells the others: ranks must never disagree about whether to resume.
    choice = [open(latest).read().strip() if state["rank"] == 0 and os.path.exists(latest) else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return
    path = os.path.join(args.checkpoint_dir, choice[0])
    model_sd, optim_sd = get_state_dict(model, optimizer)
    extra = {"scheduler": scheduler.state_dict(), "epoch": 0, "step": 0, "batch_in_epoch": 0,
             "rng": torch.get_rng_state()}
    loaded = {"model": model_sd, "optimizer": optim_sd, "extra": extra}
    try:
        dcp.load(loaded, checkpoint_id=path)  # in place: each rank reads only the shards it owns
    except Exception as e:
        raise RecipeError(f"cannot load the sharded checkpoint {path}: {str(e).splitlines()[0][:300]}") from None
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
    extra = loaded["extra"]
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    state.update(epoch=extra["epoch"], step=extra["step"], batch_in_epoch=extra["batch_in_epoch"])
    if state["rank"] == 0:
        log(0, f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}")


def main():
    args = parse_args(__doc__)
    rank, world_size, device = setup_distributed(args)
    try:
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
        if rank == 0:  # one rank downloads; the others wait, then read the files it wrote
            dataset = build_dataset(args, download=True)
        dist.barrier()
        if rank != 0:
            dataset = build_dataset(args, download=False)
        check_dataset_fits(dataset, world_size, args.batch_size)
        loader = build_dataloader(dataset, args, rank, world_size)
        model = shard_model(build_model(dataset).to(device))
        optimizer, scheduler = build_optimizer(model, args, len(loader))
        autocast, scaler = autocast_and_scaler(device, args.amp)
        state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "autocast": autocast, "scaler": scaler, "rank": rank}
        resume(model, optimizer, scheduler, state, args, device)
        if rank == 0:
            log(0, f"world size {world_size} | backend {dist.get_backend()} | device {device} | "
                   f"{len(dataset)} samples | batch {args.batch_size}/rank | {len(loader)} steps/epoch")

        timer = StepTimer(args.timings_file if rank == 0 else None, device)
        start = time.perf_counter()
        while training_left(state, args):
            epoch_start = time.perf_counter()
            loader.sampler.set_epoch(state["epoch"])  # forget this and every epoch repeats
            skip, state["batch_in_epoch"] = state["batch_in_epoch"], 0
            loss_sum, correct, seen = train_epoch(model, loader, optimizer, scheduler, state, args, device,
                                                  timer, skip)
            totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=device)])
            dist.all_reduce(totals)  # one collective per epoch: metrics over all ranks, not just rank 0's
            elapsed = time.perf_counter() - epoch_start
            loss_all, correct_all, seen_all = totals.tolist()
            if rank == 0 and seen_all:
                log(0, f"epoch {state['epoch'] + 1}/{args.epochs} | step {state['step']} | "
                       f"loss {loss_all / seen_all:.4f} | acc {correct_all / seen_all:.4f} | "
                       f"{seen_all / elapsed:.0f} samples/s | {elapsed:.1f} s")
            if state["batch_in_epoch"] == len(loader):  # the epoch ran to its end (not cut by --max-steps)
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            finished = state["epoch"] == args.epochs or (args.max_steps and state["step"] >= args.max_steps)
            if args.checkpoint_dir and (finished or state["epoch"] % args.save_every == 0):
                save_checkpoint(model, optimizer, scheduler, state, args)  # collective: every rank saves its shard
                if rank == 0:
                    log(0, f"sharded checkpoint saved to {args.checkpoint_dir} (step {state['step']})")
        timer.write(world_size=world_size, batch_size=args.batch_size)
        if rank == 0:
            log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
