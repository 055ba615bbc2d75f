"""The baseline the framework recipes are measured against: the smallest correct DDP training loop.

    PYTHONPATH=pytorch torchrun --standalone --nproc_per_node 2 benchmarks/raw_ddp.py --max-steps 60

Same model (pytorch/recipe.py's ConvNet), same synthetic data, same optimizer (SGD, momentum 0.9), same
per-rank batch and the same DistributedSampler + DataLoader as the recipes. Nothing else: no LR schedule, no
metrics, no logging, no checkpoints. It accepts the recipes' command line (the options it has no use for,
such as --checkpoint-dir, are accepted and ignored) and writes the same --timings-file, so the runner
launches it exactly like a recipe. The model and data are imported from pytorch/recipe.py (the runner sets
PYTHONPATH=pytorch), not copied, so they cannot drift apart.

With --no-ddp every rank trains alone (no process group, no all-reduce): the runner's "ceiling" entry, i.e. the
scaling this machine allows at all when W processes share it (cores, memory bandwidth, caches).
"""

import time

START_TIME = time.time()  # before the heavy imports, as in lightning/: only the runner's launch time is used

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torch.utils.data.distributed import DistributedSampler  # noqa: E402

from recipe import ConvNet, synthetic_dataset  # noqa: E402  (pytorch/recipe.py, via PYTHONPATH)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dataset-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timings-file", default=None)
    p.add_argument("--no-ddp", action="store_true",
                   help="every rank trains alone: no process group, no gradient all-reduce (the machine's ceiling "
                        "for scaling: what W ranks achieve when they do not communicate at all)")
    # accepted so that every entry of the runner gets one command line; unused here (the runner passes the
    # backend it measures, gloo or nccl, and the device follows from CUDA being there)
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    return p.parse_args()


def main():
    args = parse_args()
    rank, local_rank, world_size = (int(os.environ[n]) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not args.no_ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(args.seed)
    dataset = synthetic_dataset(args.dataset_size)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    model = ConvNet().to(device) if args.no_ddp else DDP(ConvNet().to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    times, step = [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # as the recipes do when timing: the step has really ended
            times.append(time.time())
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        if args.max_steps and step >= args.max_steps:
            break
    if rank == 0 and args.timings_file:
        with open(args.timings_file, "w") as f:
            json.dump({"start_time": START_TIME, "step_end_times": times, "world_size": world_size,
                       "batch_size": args.batch_size}, f)
    if not args.no_ddp:
        dist.barrier()  # every rank is past its last collective
    # torch 2.13 + gloo: a DDP model freed after the process group (here: at interpreter exit) drops the group's
    # last reference with the GIL held, and gloo's destructor can then abort ("terminate called without an active
    # exception") or deadlock (the recipes free the model first: pytorch/cluster.py, leave_process_group). A
    # baseline has nothing to clean up, so it leaves without running any destructor.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
