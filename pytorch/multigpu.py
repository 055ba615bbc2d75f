"""Train with DistributedDataParallel on one node: this process spawns one worker per GPU (mp.spawn).

    python multigpu.py --epochs 3 --checkpoint-dir checkpoints/spawn            # every visible GPU
    python multigpu.py --nprocs 2 --epochs 3                                      # CPU: 2 gloo workers

No launcher is involved: the parent picks the world size, hosts the rendezvous store and gives each worker
its rank. That is simple on one node; across nodes, use torchrun or srun (multinode.py).
"""

import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import (
    RecipeError,
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
    positive_int,
    pick_backend,
    read_snapshot,
    restore_rng,
    run,
    save_snapshot,
    settle_ddp_buckets,
    training_left,
)


def setup_distributed(rank, world_size, port, args):
    if torch.cuda.is_available():
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = pick_backend(args.backend)
    # Connect to the store the parent process is hosting (see main) instead of a fixed MASTER_PORT.
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=args.timeout))
    # The timeout bounds every later collective too: a dead peer becomes an error, not a hang.
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout), device_id=device if backend == "nccl" else None)
    return device


def build_dataloader(dataset, args, rank, world_size):
    # Each rank reads a disjoint 1/world_size of the data; set_epoch() reshuffles it every epoch.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0)


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
            scaler.scale(loss).backward()  # DDP averages gradients across ranks during backward
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()  # DDP averages gradients across ranks during backward
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


def snapshot_of(model, optimizer, scheduler, state):
    snap = {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": state["epoch"], "step": state["step"],
            "batch_in_epoch": state["batch_in_epoch"], "rng": capture_rng()}
    if state["scaler"] is not None:
        snap["scaler"] = state["scaler"].state_dict()
    return snap


def resume(model, optimizer, scheduler, state, args, device, loader):
    # Rank 0 decides which snapshot to use and tells the others: on a shared filesystem ranks can disagree
    # about whether a file exists, and a job where only some ranks resume deadlocks.
    choice = [find_snapshot(args.checkpoint_dir) if state["rank"] == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    path = choice[0]
    if path is None:
        return
    snap = read_snapshot(path, map_location=device)  # each rank onto its own device, not all onto cuda:0
    model.module.load_state_dict(snap["model"])
    optimizer.load_state_dict(snap["optimizer"])
    scheduler.load_state_dict(snap["scheduler"])
    if state["scaler"] is not None and "scaler" in snap:
        state["scaler"].load_state_dict(snap["scaler"])
    restore_rng(snap["rng"])
    state.update(epoch=snap["epoch"], step=snap["step"], batch_in_epoch=snap["batch_in_epoch"])
    if training_left(state, args):
        settle_ddp_buckets(model, loader, device)  # gradients summed in the same order as without a restart
    if state["rank"] == 0:
        log(0, f"resumed from {path}: epoch {state['epoch'] + 1}, step {state['step']}")


def worker(rank, world_size, port, args):
    """What each spawned process runs; mp.spawn passes the rank as the first argument."""
    run(train, rank, world_size, port, args, rank=rank)


def train(rank, world_size, port, args):
    device = setup_distributed(rank, world_size, port, args)
    try:
        torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
        if rank == 0:  # one rank downloads; the others wait, then read the files it wrote
            dataset = build_dataset(args, download=True)
        dist.barrier()
        if rank != 0:
            dataset = build_dataset(args, download=False)
        check_dataset_fits(dataset, world_size, args.batch_size)
        loader = build_dataloader(dataset, args, rank, world_size)
        model = DDP(build_model(dataset).to(device))
        optimizer, scheduler = build_optimizer(model, args, len(loader))
        autocast, scaler = autocast_and_scaler(device, args.amp)
        state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "autocast": autocast, "scaler": scaler, "rank": rank}
        resume(model, optimizer, scheduler, state, args, device, loader)
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
                if rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
                    save_snapshot(args.checkpoint_dir, snapshot_of(model, optimizer, scheduler, state))
                    log(0, f"snapshot saved to {args.checkpoint_dir} (step {state['step']})")
                dist.barrier()  # nobody reads or restarts before the file is complete
        timer.write(world_size=world_size, batch_size=args.batch_size)
        if rank == 0:
            log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")
    finally:
        dist.destroy_process_group()


def add_nprocs(parser):
    parser.add_argument("--nprocs", type=positive_int, default=None,
                        help="worker processes (default: one per visible GPU; 2 on a machine without CUDA)")


def main():
    args = parse_args(__doc__, extra=add_nprocs)
    world_size = args.nprocs or torch.cuda.device_count() or 2
    if torch.cuda.is_available() and world_size > torch.cuda.device_count():
        raise RecipeError(f"--nprocs {world_size} but only {torch.cuda.device_count()} GPUs are visible")
    # The parent hosts the rendezvous store on a port the OS picks (port 0) and keeps it open while the
    # workers run: no fixed 12355 to collide with another job, and no window between "find a free port" and
    # "bind it" in which someone else can take it.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=args.timeout))
    try:
        mp.spawn(worker, args=(world_size, store.port, args), nprocs=world_size, join=True)
    except mp.ProcessExitedException as e:  # the worker printed its own error; mp.spawn stopped the others
        raise RecipeError(f"worker {e.error_index} exited with code {e.exit_code}; "
                          "the other workers were stopped") from None


if __name__ == "__main__":
    run(main)
