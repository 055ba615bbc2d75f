"""Train with DistributedDataParallel across nodes, launched either way Slurm clusters do it:

    srun torchrun --nnodes $SLURM_NNODES --nproc_per_node 8 --rdzv-backend c10d \
        --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT multinode.py ...   # one launcher per node
    srun python multinode.py ...                                    # one task per GPU

Under torchrun the usual RANK/LOCAL_RANK/WORLD_SIZE are set; under plain srun they are taken from
SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS. Either way MASTER_ADDR/MASTER_PORT come from the job script.
On SIGUSR1 or SIGTERM (Slurm's warning before a time limit or preemption) every rank finishes the step it
is on, rank 0 saves a snapshot, and the job exits with 75 so its script can requeue it.
"""

import os
import signal
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from common import (
    PREEMPTED_EXIT_CODE,
    RecipeError,
    StepTimer,
    autocast_and_scaler,
    build_dataset,
    build_model,
    build_optimizer,
    capture_rng,
    check_dataset_fits,
    explained_rendezvous,
    find_snapshot,
    log,
    parse_args,
    pick_backend,
    read_snapshot,
    restore_rng,
    run,
    save_snapshot,
    settle_ddp_buckets,
    training_left,
)


def launch_env():
    """(rank, local_rank, world_size) from torchrun's variables, else from srun's; a clear error otherwise."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not any(n in os.environ for n in names) and "SLURM_PROCID" in os.environ:
        # Plain `srun python multinode.py`: one task per GPU. These are per-task values, so they must be read
        # here, in each task, never expanded once in the batch script (that makes every task rank 0).
        os.environ.update(RANK=os.environ["SLURM_PROCID"], LOCAL_RANK=os.environ["SLURM_LOCALID"],
                          WORLD_SIZE=os.environ["SLURM_NTASKS"])
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
        if missing:
            raise RecipeError(f"{' and '.join(missing)} not set: in the job script, export MASTER_ADDR=$(scontrol "
                              f"show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) and a MASTER_PORT derived "
                              f"from $SLURM_JOB_ID")
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: launch with torchrun, or with srun inside a Slurm job "
                          f"(or set all of {', '.join(names)})")
    return (int(os.environ[n]) for n in names)


class PreemptionFlag:
    """Remembers that Slurm asked us to stop; the training loop acts on it at a step boundary.

    Saving inside the signal handler would interrupt a collective half-way; instead every rank checks the
    flag every STOP_CHECK_EVERY steps and all of them agree (all_reduce MAX) on the same step to stop at.
    """

    STOP_CHECK_EVERY = 10  # a tiny all_reduce every 10 steps costs nothing next to the step itself

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, step, device):
        if step % self.STOP_CHECK_EVERY:
            return False
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
        if state["preemption"].agreed(state["step"], device):
            state["preempted"] = True
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


def main():
    args = parse_args(__doc__)
    preemption = PreemptionFlag()  # first: a signal that arrives during start-up must not kill the process
    rank, world_size, device = setup_distributed(args)
    try:
        # One line per rank: where each rank landed is the first question when a multi-node job misbehaves.
        log(rank, f"host {socket.gethostname()} | local rank {os.environ['LOCAL_RANK']} | device {device}")
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
        state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "autocast": autocast, "scaler": scaler, "rank": rank,
                 "preemption": preemption, "preempted": False}
        resume(model, optimizer, scheduler, state, args, device, loader)
        if rank == 0:
            log(0, f"world size {world_size} | nodes {os.environ.get('SLURM_NNODES', '?')} | "
                   f"backend {dist.get_backend()} | device {device} | "
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
            if args.checkpoint_dir and (finished or state["preempted"] or state["epoch"] % args.save_every == 0):
                if rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
                    save_snapshot(args.checkpoint_dir, snapshot_of(model, optimizer, scheduler, state))
                    log(0, f"snapshot saved to {args.checkpoint_dir} (step {state['step']})")
                dist.barrier()  # nobody reads or restarts before the file is complete
            if state["preempted"]:
                if rank == 0:
                    saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                    log(0, f"preempted at step {state['step']}: {saved}; exiting with "
                           f"{PREEMPTED_EXIT_CODE} so the job script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        timer.write(world_size=world_size, batch_size=args.batch_size)
        if rank == 0:
            log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(main)
