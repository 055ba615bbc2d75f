"""The baseline modulus/ is measured against: the smallest correct DDP training loop on PhysicsNeMo's FNO.

    PYTHONPATH=modulus torchrun --standalone --nproc_per_node 2 benchmarks/raw_ddp_fno.py --max-steps 60

Same model (modulus/recipe.py's build_model: physicsnemo's FNO), same synthetic Darcy data, same optimizer
(Adam) and loss (MSE), the same per-rank batch and DistributedSampler + DataLoader as the recipe. Nothing else:
no DistributedManager, no LR schedule, no validation, no logging, no checkpoints, no preemption check. Like
raw_ddp.py it accepts the recipes' command line (unused options are ignored), writes the same --timings-file,
and imports the model and data from the folder it measures (the runner sets PYTHONPATH=modulus).
"""

import time

START_TIME = time.time()  # before the heavy imports, as in raw_ddp.py

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

import darcy  # noqa: E402  (modulus/darcy.py and modulus/recipe.py, via PYTHONPATH)
from recipe import build_model  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dataset-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timings-file", default=None)
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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    torch.manual_seed(args.seed)
    dataset = darcy.normalize(*darcy.generate(args.dataset_size, 32, seed=1234))  # as the recipe's --data synthetic
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    model = DDP(build_model().to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    times, step = [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.mse_loss(model(x), y)
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
    dist.barrier()  # every rank is past its last collective
    # As raw_ddp.py: leave without destructors (gloo teardown at exit can abort after the work is done).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
