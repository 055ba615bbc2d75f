"""All-reduce bandwidth benchmark with nccl-tests' definitions (gloo on CPU, nccl on GPU).

For a message of S bytes that takes t seconds to all-reduce across n ranks:
    algbw = S / t                      (what the application sees)
    busbw = algbw * 2 * (n - 1) / n    (per-link traffic of a ring all-reduce: comparable across n and with
                                        the hardware's peak bandwidth; same as nccl-tests' all_reduce_perf)
t is the mean over --iters timed runs after --warmup, taken as the maximum over ranks.

Launch like training (srun one task per GPU, or torchrun); rank 0 prints the table, --json writes it.
"""

import argparse
import datetime
import json
import os
import socket
import sys
import time


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text and text[-1] in units else ""
    return int(float(text[: len(text) - len(unit)]) * units[unit])


def sizes(min_bytes: int, max_bytes: int, factor: int) -> list[int]:
    out, size = [], min_bytes
    while size <= max_bytes:
        out.append(size)
        size *= factor
    return out


def bus_bandwidth(algbw: float, world_size: int) -> float:
    return algbw * 2 * (world_size - 1) / world_size if world_size > 1 else algbw


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    parser.add_argument("--min-bytes", default="4K")
    # Up to 1 GB by default, as nccl-tests' usual sweep: an InfiniBand/NVLink fabric reaches its bus bandwidth only
    # with messages of tens to hundreds of MB; a sweep that stops at a few MB makes a healthy fabric look broken.
    # On CPUs (gloo) pass a smaller --max-bytes.
    parser.add_argument("--max-bytes", default="1G")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--json", help="rank 0 writes the results here")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    import torch
    import torch.distributed as dist

    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    hosts = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    rows = []
    if rank == 0:
        print("# ranks: " + " ".join(f"rank{r}={h}" for r, h in enumerate(hosts)), flush=True)
        print(f"# all-reduce benchmark: {world} ranks, backend {backend}, float32, sum, "
              f"{args.iters} iters after {args.warmup} warmup", flush=True)
        print(f"# {'size(B)':>12} {'count':>10} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} "
              f"{'#wrong':>6}", flush=True)
    for size in sizes(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor):
        count = max(1, size // 4)
        x = torch.ones(count, dtype=torch.float32, device=device)
        for _ in range(args.warmup):
            dist.all_reduce(x)
        x.fill_(rank + 1)
        dist.barrier()
        sync()
        start = time.perf_counter()
        for _ in range(args.iters):
            dist.all_reduce(x)
        sync()
        elapsed = torch.tensor([(time.perf_counter() - start) / args.iters], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank defines the collective's time
        # After `iters` sums starting from rank+1 on every rank: world*(world+1)/2 * world**(iters-1).
        expected = world * (world + 1) / 2 * world ** (args.iters - 1)
        wrong = int((~torch.isclose(x, torch.full_like(x, expected), rtol=1e-4)).sum().item())
        t = elapsed.item()
        algbw = count * 4 / t / 1e9
        row = dict(bytes=count * 4, count=count, time_us=t * 1e6, algbw_GBps=algbw,
                   busbw_GBps=bus_bandwidth(algbw, world), wrong=wrong)
        rows.append(row)
        if rank == 0:
            print(f"  {row['bytes']:>12} {count:>10} {row['time_us']:>11.1f} {algbw:>12.3f} "
                  f"{row['busbw_GBps']:>12.3f} {wrong:>6}", flush=True)
    total_wrong = sum(r["wrong"] for r in rows)
    if rank == 0:
        peak = max(rows, key=lambda r: r["busbw_GBps"])
        print(f"# peak busbw {peak['busbw_GBps']:.3f} GB/s at {peak['bytes']} B, {world} ranks on "
              f"{len(set(hosts))} host(s)", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(world_size=world, backend=backend, hosts=hosts, rows=rows), f, indent=1)
    dist.destroy_process_group()
    if total_wrong:
        print(f"[bench] FAIL: rank {rank}: {total_wrong} wrong values after all-reduce", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
