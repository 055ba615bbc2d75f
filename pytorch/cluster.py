"""The plumbing of pytorch/: what a job on a real cluster needs around the lesson in recipe.py. The plumbing every
folder shares (signals, exit codes, validators, deadlines, the atomic write) is toolkit.py's.

Map:
    parse_args                    the command line (C2): bad input is one line and exit 2; no silent CPU (C12)
    run                           the entry point's wrapper: toolkit.run + toolkit.lost_peer + leave_process_group
    leave_process_group           free the DDP model, then destroy the process group (or the exit can hang)
    pick_backend                  --backend auto: nccl with CUDA, gloo without
    torchrun_env                  (rank, local_rank, world_size) from torchrun's variables, or one clear line
    explained_rendezvous          around init_process_group: a deadline, and one line that says what to check
    rendezvous_store              where the ranks meet: MASTER_ADDR:MASTER_PORT (a key prefix per torchrun restart)
    io_group, wait_for_rank0      a gloo group for I/O waits (--io-timeout), connected at start-up; the wait in it
    who_sees                      which ranks see what rank 0 writes into a directory (a probe file)
    check_shared_directory        --checkpoint-dir must be seen by every rank
    torchvision_dataset           MNIST/CIFAR-10 through torchvision, downloaded once per copy of --data-dir
    check_dataset_fits            a world size or a batch larger than the data is one line, not an idle rank
    reduce_max                    the ranks' maximum of a float: PREEMPTION.agreed's way to agree on a step
    bf16_is_native                bf16 on CPUs and on GPUs of compute capability >= 8.0 (C10)
    mixed_precision               --amp: (autocast factory, GradScaler or None)
    allow_tf32                    TF32 matmuls on Ampere+ for fp32 runs
    step_timer                    the benchmarks' step hook (--timings-file, rank 0), or None
    capture_rng, restore_rng      the random state a snapshot holds
    settle_ddp_buckets            a resumed DDP run sums its gradients in the uninterrupted run's order
"""

import argparse
import contextlib
import functools
import gc
import os
import socket
import sys
import traceback
import uuid
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import toolkit
from toolkit import OneLineParser, RecipeError, StepTimer, deadline, non_negative_int, positive_float, positive_int

# ---------------------------------------------------------------------------------------------- the command line


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (CONTRACT.md C2: same in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic", "mnist", "cifar10"], default="synthetic")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="where mnist/cifar10 live (downloaded there if missing)")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="snapshots go here and resume from here is automatic (default: none, nothing is saved)")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on CPUs and GPUs that do it natively (compute capability >= 8.0), "
                        "else fp16 with a GradScaler")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--rendezvous-timeout", type=positive_int, default=None,
                   help="seconds the ranks wait for each other at start-up (default: --timeout). Raise it where "
                        "ranks start far apart (hundreds of nodes, container pulls) and keep --timeout short: "
                        "it then bounds only the collectives, so a dead peer is an error sooner")
    p.add_argument("--io-timeout", type=positive_int, default=1800,
                   help="seconds the other ranks wait while rank 0 alone downloads data or writes a snapshot")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.rendezvous_timeout = args.rendezvous_timeout or args.timeout
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds, or will hold, the dataset)")
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)  # given GPUs it cannot use: stop (C12)
    return args


# ---------------------------------------------------------------------------------------------- the way out


def leave_process_group():
    """toolkit.run's cleanup: free the DDP model, then destroy the process group -- in that order, or a finished
    run can hang at exit (gloo's destructor and the GIL: see the README's Troubleshooting)."""
    if not dist.is_initialized():
        return
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model
    gc.collect()  # DDP's reference cycles
    dist.destroy_process_group()


run = functools.partial(toolkit.run, explain=toolkit.lost_peer, cleanup=leave_process_group)

# ---------------------------------------------------------------------------------------------- rendezvous


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def torchrun_env():
    """(rank, local_rank, world_size) from the variables torchrun sets; a clear error when they are missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    missing = [n for n in names if n not in os.environ]
    if missing:
        script = os.path.basename(sys.argv[0])
        raise RecipeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc_per_node N {script}` "
                          f"(or set all of {', '.join(names)})")
    return tuple(int(os.environ[n]) for n in names)


@contextlib.contextmanager
def explained_rendezvous(rank, world_size, timeout, io_timeout=None):
    """Around init_process_group: turn the ways a rendezvous fails into one line that says what to check. The
    deadline covers failures that block inside C++ where no timeout reaches (a MASTER_PORT that another program
    listens on: the rank waits for an answer forever). With io_timeout, the gloo group of wait_for_rank0 is
    connected here too, at start-up: a node whose hostname resolves to an address the others cannot reach
    (127.0.1.1 in /etc/hosts) fails now, not at the end of the first epoch (then after every requeue)."""
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"rendezvous at {addr} (are all {world_size} ranks started, MASTER_ADDR reachable from every node, "
            f"MASTER_PORT used by nothing else?)")
    try:
        with deadline(timeout, rank, what):
            yield
            if io_timeout is not None and world_size > 1:
                io_group(io_timeout)
    except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --rendezvous-timeout {timeout}s")
        raise RecipeError(f"rendezvous at {addr} failed: {hint} ({str(e).splitlines()[0][:200]})") from None
    except RuntimeError as e:
        if "gloo" not in str(e).lower():
            raise
        raise RecipeError(f"the ranks met at {addr} but cannot connect to each other over gloo: does every node's "
                          f"hostname resolve to an address the others reach (not 127.0.1.1)? Else set "
                          f"GLOO_SOCKET_IFNAME to the interface they share ({str(e).splitlines()[0][:200]})") from None


def rendezvous_store(rank, world_size, timeout):
    """init_process_group's keyword arguments: the store where the ranks meet at MASTER_ADDR:MASTER_PORT, waiting
    up to `timeout` (--rendezvous-timeout) for each other; the collectives get init_process_group's own timeout.
    Under torchrun the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE) and every worker is a client; without
    torchrun (srun), rank 0 hosts it."""
    addr, port, wait = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timedelta(seconds=timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = (toolkit.attempt_store(world_size, timeout)  # one agent: a key prefix per restart
                 or dist.TCPStore(addr, port, world_size, is_master=False, timeout=wait))
    else:
        store = dist.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=wait, multi_tenant=True)
    return {"store": store, "rank": rank, "world_size": world_size}


@functools.cache
def io_group(io_timeout):
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=io_timeout))


def wait_for_rank0(io_timeout):
    """Where the other ranks wait while rank 0 alone downloads the data or writes a snapshot. Not a barrier on
    the training process group: its --timeout is the watchdog for collectives (a dead peer must be an error
    within it), and a download or a save to a slow shared filesystem can take longer. A gloo group of its own,
    connected at start-up by explained_rendezvous (else on first use: every rank gets here at the same points),
    waits up to --io-timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    dist.barrier(group=io_group(io_timeout))


# ---------------------------------------------------------------------------------------------- shared directories


def who_sees(path, rank):
    """Which ranks see what rank 0 writes into `path`: [(sees it, hostname)] for every rank. Collective: rank 0
    writes a probe file, every rank looks for it."""
    token = [f".probe-{uuid.uuid4().hex}" if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    probe = os.path.join(path, token[0])
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write(socket.gethostname())
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (os.path.exists(probe), socket.gethostname()))
    dist.barrier()
    if rank == 0:
        os.remove(probe)
    return seen


def check_shared_directory(path, rank):
    """Every rank must see what rank 0 writes into --checkpoint-dir: after a requeue each rank loads the snapshot
    from there. A node-local path (/tmp, a local scratch disk) would give the other nodes a FileNotFoundError
    while rank 0 waits in the next collective until --timeout. Checked once, collectively, with a probe file."""
    seen = who_sees(path, rank)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        raise RecipeError(f"--checkpoint-dir {path} is not shared: {', '.join(blind)} cannot see what rank 0 on "
                          f"{seen[0][1]} writes there; use a directory on a filesystem every node mounts")


# ---------------------------------------------------------------------------------------------- data


def _load_torchvision(name, root, download):
    """MNIST or CIFAR-10 training split through torchvision, in its standard on-disk format."""
    import torchvision  # imported here: synthetic runs do not need torchvision at all
    from torchvision import transforms

    if name == "mnist":
        cls, norm = torchvision.datasets.MNIST, transforms.Normalize((0.1307,), (0.3081,))
    else:
        cls, norm = torchvision.datasets.CIFAR10, transforms.Normalize((0.4914, 0.4822, 0.4465),
                                                                        (0.2470, 0.2435, 0.2616))
    try:
        return cls(root, train=True, download=download, transform=transforms.Compose([transforms.ToTensor(), norm]))
    except (RuntimeError, OSError) as e:  # torchvision says "Dataset not found" or the download failed
        hint = "" if download else " (only rank 0 and the first rank of each node that cannot see rank 0's copy " \
                                   "download; it failed or has not run)"
        raise RecipeError(f"cannot load {name} from {root!r}: {e}{hint}") from None


def torchvision_dataset(args, rank=0):
    """--data mnist/cifar10 from --data-dir, downloaded once per copy of it before any rank reads it. One process
    alone downloads. With a process group, rank 0 downloads, and so does the first rank of every node that cannot
    see rank 0's directory (a node-local disk: /tmp, a local scratch, a per-node copy staged by the job); everybody
    else waits (up to --io-timeout), then reads. torchvision skips the download where the files are already there."""
    if not dist.is_initialized():
        return _load_torchvision(args.data, args.data_dir, download=True)
    shared = who_sees(args.data_dir, rank)[rank][0]
    if rank == 0 or (int(os.environ.get("LOCAL_RANK", "0")) == 0 and not shared):
        _load_torchvision(args.data, args.data_dir, download=True)
    wait_for_rank0(args.io_timeout)  # a barrier: waits for every downloader, not only rank 0
    return _load_torchvision(args.data, args.data_dir, download=False)


def check_dataset_fits(dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // (world_size * batch_size) == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


# ---------------------------------------------------------------------------------------------- the loop's helpers


def reduce_max(device):
    """PREEMPTION.agreed's reduce_max: the largest of the ranks' values (a float: inf from a rank that got the
    signal, else its seconds per step), one tiny all_reduce MAX on the device, so that every rank stops at the same
    step when any of them got the signal and all pick the same next check."""
    def reduce(value):
        largest = torch.tensor(float(value), device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        return largest.item()
    return reduce


def bf16_is_native(device):
    """bf16 on CPUs and on GPUs of compute capability >= 8.0 (Ampere+). torch.cuda.is_bf16_supported() also
    says yes on V100/T4, where bf16 is emulated and slower than fp16 (CONTRACT.md C10)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)


def mixed_precision(device, enabled):
    """(autocast context factory, GradScaler or None) for --amp: bf16 where native, else fp16 + GradScaler
    (fp16's narrow range underflows small gradients unless the loss is scaled)."""
    if not enabled:
        return contextlib.nullcontext, None
    if bf16_is_native(device):
        return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None
    return (lambda: torch.autocast(device.type, dtype=torch.float16)), torch.amp.GradScaler(device.type)


def allow_tf32():
    """fp32 matmuls and convolutions in TF32 on Ampere+ GPUs: inputs rounded to a 10-bit mantissa, accumulation
    in fp32 -- about twice the matmul throughput for a precision loss training does not notice. No effect on
    CPUs or older GPUs."""
    # The one call that sets matmuls and convolutions alike: a per-backend fp32_precision (torch >= 2.9) mixed with
    # the defaults makes torch.get_float32_matmul_precision() raise, and Lightning and torch.compile call it.
    torch.set_float32_matmul_precision("high")


def step_timer(args, device, rank, world_size):
    """The benchmarks' step hook: a toolkit.StepTimer on rank 0 when --timings-file is given, else None. On a GPU
    it waits for the device after each step (only when timing: a sync per step costs throughput)."""
    if not (args.timings_file and rank == 0):
        return None
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else None
    return StepTimer(args.timings_file, sync, world_size=world_size, batch_size=args.batch_size)


def capture_rng():
    """The CPU generator and this process's own GPU generator (not every GPU's: a process that resumes may see
    fewer devices than the one that saved, e.g. with --gpus-per-task)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def settle_ddp_buckets(model, loader, device, autocast):
    """One throw-away backward pass before a resumed DDP run trains, so that its gradients are summed in the
    same order as in the uninterrupted run (nothing to do without DDP).

    DDP lays its gradient buckets out anew after the first backward of every process. An uninterrupted run
    has done that long before step k; a run resumed at step k would do its first step with the initial
    layout, and with more than 2 ranks a different layout adds the same numbers in a different order: the
    weights differ in the last bits, and training can amplify that. The gradients of this pass are discarded
    and the optimizer is not stepped. (This model has no BatchNorm or dropout; with those, mind their state.)
    """
    if not isinstance(model, DDP):
        return
    x, y = next(iter(loader))
    with autocast():  # as in training: fp32 activations would need twice the memory once
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        model.zero_grad(set_to_none=True)
