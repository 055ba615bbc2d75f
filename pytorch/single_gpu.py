"""Train on one device: the baseline every other recipe in this folder changes as little as possible.

    python single_gpu.py --epochs 3 --checkpoint-dir checkpoints/single
"""

import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler

from common import (
    StepTimer,
    autocast_and_scaler,
    build_dataset,
    build_model,
    build_optimizer,
    capture_rng,
    check_dataset_fits,
    find_snapshot,
    log,
    parse_args,
    read_snapshot,
    restore_rng,
    run,
    save_snapshot,
    training_left,
)


def setup_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_dataloader(dataset, args):
    # The generator is re-seeded every epoch (seed + epoch): a reproducible, different shuffle each epoch,
    # the same permutation a DistributedSampler draws — which is what lets the tests compare against DDP.
    sampler = RandomSampler(dataset, generator=torch.Generator())
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0)


def train_epoch(model, loader, optimizer, scheduler, state, args, device, timer, skip=0):
    """One pass over the data; returns summed loss, correct predictions and samples, as tensors.

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
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        state["step"] += 1
        state["batch_in_epoch"] = i + 1
        timer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if state["step"] % args.log_every == 0:
            log(0, f"epoch {state['epoch'] + 1} | batch {i + 1}/{len(loader)} | step {state['step']} | "
                   f"loss {loss.item():.4f}")
        if args.max_steps and state["step"] >= args.max_steps:
            break
    return loss_sum, correct, seen


def snapshot_of(model, optimizer, scheduler, state):
    snap = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": state["epoch"], "step": state["step"],
            "batch_in_epoch": state["batch_in_epoch"], "rng": capture_rng()}
    if state["scaler"] is not None:
        snap["scaler"] = state["scaler"].state_dict()
    return snap


def resume(model, optimizer, scheduler, state, args, device):
    path = find_snapshot(args.checkpoint_dir)
    if path is None:
        return
    snap = read_snapshot(path, map_location=device)
    model.load_state_dict(snap["model"])
    optimizer.load_state_dict(snap["optimizer"])
    scheduler.load_state_dict(snap["scheduler"])
    if state["scaler"] is not None and "scaler" in snap:
        state["scaler"].load_state_dict(snap["scaler"])
    restore_rng(snap["rng"])
    state.update(epoch=snap["epoch"], step=snap["step"], batch_in_epoch=snap["batch_in_epoch"])
    log(0, f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}")


def main():
    args = parse_args(__doc__)
    torch.manual_seed(args.seed)
    device = setup_device()
    dataset = build_dataset(args, download=True)
    check_dataset_fits(dataset, 1, args.batch_size)
    loader = build_dataloader(dataset, args)
    model = build_model(dataset).to(device)
    optimizer, scheduler = build_optimizer(model, args, len(loader))
    autocast, scaler = autocast_and_scaler(device, args.amp)
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "autocast": autocast, "scaler": scaler}
    resume(model, optimizer, scheduler, state, args, device)
    log(0, f"device {device} | {len(dataset)} samples | batch {args.batch_size} | {len(loader)} steps/epoch")

    timer = StepTimer(args.timings_file, device)
    start = time.perf_counter()
    while training_left(state, args):
        epoch_start = time.perf_counter()
        loader.sampler.generator.manual_seed(args.seed + state["epoch"])
        skip, state["batch_in_epoch"] = state["batch_in_epoch"], 0
        loss_sum, correct, seen = train_epoch(model, loader, optimizer, scheduler, state, args, device, timer, skip)
        elapsed = time.perf_counter() - epoch_start
        if seen:
            log(0, f"epoch {state['epoch'] + 1}/{args.epochs} | step {state['step']} | "
                   f"loss {loss_sum.item() / seen:.4f} | acc {correct.item() / seen:.4f} | "
                   f"{seen / elapsed:.0f} samples/s | {elapsed:.1f} s")
        if state["batch_in_epoch"] == len(loader):  # the epoch ran to its end (not cut by --max-steps)
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
        finished = state["epoch"] == args.epochs or (args.max_steps and state["step"] >= args.max_steps)
        if args.checkpoint_dir and (finished or state["epoch"] % args.save_every == 0):
            save_snapshot(args.checkpoint_dir, snapshot_of(model, optimizer, scheduler, state))
            log(0, f"snapshot saved to {args.checkpoint_dir} (step {state['step']})")
    timer.write(world_size=1, batch_size=args.batch_size)
    log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(main)
