"""The baseline the monai/ recipe is measured against: the smallest correct DDP loop on the same 3-D UNet.

    PYTHONPATH=monai torchrun --standalone --nproc_per_node 2 benchmarks/raw_ddp_monai.py --max-steps 60 \
        --batch-size 2 --roi-size 16

Same model, data pipeline (Decathlon folder, each rank's cached partition, seeded crops, its EpochSampler), loss
(DiceCELoss) and optimizer (Adam) as monai/, imported from monai/recipe.py and monai/cluster.py (the runner sets
PYTHONPATH=monai) so they cannot drift apart. Nothing else: no LR schedule, no loss totals, no validation, no
checkpoints, no preemption check. It takes monai/'s command line and writes the same --timings-file.
"""

import time

START_TIME = time.time()  # before the heavy imports, as in raw_ddp.py: only the runner's launch time is used

import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from cluster import Ranks, parse_args, pick_backend, pick_device  # noqa: E402  (monai/)
from recipe import build_dataset, build_loader, build_model  # noqa: E402  (monai/)


def main():
    args = parse_args(__doc__)
    rank, local_rank, world_size = (int(os.environ[n]) for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = pick_device(local_rank)
    dist.init_process_group(pick_backend(args.backend))
    torch.manual_seed(args.seed)
    data = build_dataset(args, Ranks(rank, local_rank, world_size, device, distributed=True))
    loader = build_loader(data.train, args, rank, world_size)
    model = DDP(build_model(data).to(device))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ends, step = [], 0
    for epoch in range(args.epochs):
        loader.sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ends.append(time.time())
            if args.max_steps and step >= args.max_steps:
                break
    if rank == 0 and args.timings_file:
        with open(args.timings_file, "w") as f:
            json.dump({"start_time": START_TIME, "step_end_times": ends, "world_size": world_size,
                       "batch_size": args.batch_size}, f)
    # The DDP model first, then the group: freed after destroy_process_group(), DDP's Reducer would drop the
    # group's last reference with the GIL held, and gloo's destructor can deadlock at exit (see
    # monai/README.md, Troubleshooting).
    del model, optimizer
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
