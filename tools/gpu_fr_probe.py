#!/usr/bin/env python3
"""A hang on purpose, for tools/gpu_check.py's Flight Recorder check (issue #22): does NCCL's watchdog dump every
rank's last collectives where the multi-node templates tell it to, and does fr_report.py name the rank behind?

    export TORCH_FR_BUFFER_SIZE=2000 TORCH_NCCL_DUMP_ON_TIMEOUT=1 TORCH_FR_DUMP_TEMP_FILE=$PWD/debug/nccl_trace_rank_
    torchrun --standalone --nproc-per-node 2 tools/gpu_fr_probe.py --backend nccl --timeout 10
    python slurm_templates/tools/fr_report.py debug     # rank 1 is behind in process group 0 (default_pg): ...

Under torchrun on 2 GPUs or more every rank does two all_reduces; then rank 1 (--behind) skips the third, in which
the others wait. Their watchdogs time the wait out after --timeout seconds, write their Flight Recorder buffers to
TORCH_FR_DUMP_TEMP_FILE<rank> and signal every rank through the rendezvous store (torchrun's agent keeps it) to
write its own: rank 1's too, outside any collective. The job is meant to fail: the watchdog then aborts the ranks
that wait (torchrun exits 1). Rank 1 leaves once its dump is written; any rank still here after --wait more seconds
says so and exits 3, so that the job always ends. Standard library and torch only.
"""

import argparse
import datetime
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["nccl"], default="nccl",
                   help="nccl only: gloo records collectives too, but nothing dumps them on a timeout")
    p.add_argument("--timeout", type=int, default=10, help="the process group's timeout, seconds")
    p.add_argument("--wait", type=int, default=45,
                   help="seconds after the timeout before a rank gives up waiting (for its dump, for the watchdog)")
    p.add_argument("--behind", type=int, default=1, help="the rank that skips the third all_reduce")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    prefix = os.environ.get("TORCH_FR_DUMP_TEMP_FILE")
    world = int(os.environ.get("WORLD_SIZE", "0"))
    why = ("start it under torchrun" if "LOCAL_RANK" not in os.environ else
           "TORCH_FR_DUMP_TEMP_FILE is not set: where would the dumps go?" if not prefix else
           f"--behind {args.behind} needs a world of {args.behind + 1} ranks or more, not {world}"
           if world <= args.behind else "" if torch.cuda.is_available() else "no CUDA GPU: NCCL needs one per rank")
    if why:
        print(f"error: gpu_fr_probe: {why}", file=sys.stderr)
        return 2
    rank, device = int(os.environ["RANK"]), torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=args.timeout), device_id=device)
    x = torch.ones(1024, device=device)
    for _ in range(2):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    print(f"rank {rank}: 2 all_reduces done", flush=True)
    deadline = time.monotonic() + args.timeout + args.wait
    if rank == args.behind:
        mine = Path(f"{prefix}{rank}")
        print(f"rank {rank}: skipping the third all_reduce", flush=True)
        while time.monotonic() < deadline:
            if mine.exists() and mine.stat().st_size > 0:
                time.sleep(2)  # the writer opens the file, then writes it: give it time to finish
                print(f"rank {rank}: my Flight Recorder dump is written: {mine}", flush=True)
                os._exit(0)  # no destroy_process_group: the others never leave their collective
            time.sleep(0.2)
        print(f"rank {rank}: no dump of mine ({mine}) after {args.timeout + args.wait} s", flush=True)
        os._exit(3)
    dist.all_reduce(x, async_op=True)  # rank --behind never enters it: the watchdog ends this process
    while time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"rank {rank}: still alive {args.timeout + args.wait} s after the third all_reduce began: NCCL's watchdog "
          f"did not end this process", flush=True)
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
