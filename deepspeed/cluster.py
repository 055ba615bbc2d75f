"""The plumbing of deepspeed/: what a job on a cluster needs around the lesson in recipe.py. toolkit.py holds what
every folder shares identically; gpt.py the second model (and its text data).

Map:
    parse_args, parameter_count        the command line: the common flags plus --ds-config, --model, --gpt-params
    run, leave_process_group           the entry point's wrapper (toolkit.run); the process group left on the way out
    explain                            a collective that failed because another rank is gone: one line, exit 1
    import_deepspeed                   DeepSpeed imported late and quiet, its accelerator named before the import
    launch_env                         RANK, LOCAL_RANK, WORLD_SIZE from the launcher, or one line naming it
    device_index, pick_device          this rank's GPU from (LOCAL_RANK, GPUs visible), and DeepSpeed told the same
    pick_backend                       nccl with CUDA, gloo without
    init_distributed                   deepspeed.init_distributed from the launcher's variables
    bound_deepspeed_groups             the groups DeepSpeed makes itself (ZeRO's) under --timeout as well
    explained_rendezvous               a rendezvous under a deadline, its failures as one line saying what to check
    reduce_max                         the ranks' agreement on preemption (for toolkit.PREEMPTION.agreed)
    device_sync                        what the benchmarks' StepTimer waits for after each step (the GPU)
    load_ds_config                     the JSON config completed from the flags, checked before DeepSpeed sees it
    learning_rate, SCHEDULER_LR_KEYS   --lr into a JSON optimizer only when given; a JSON scheduler honoured
    config_errors                      DeepSpeed's own rejections of a config (asserts, pydantic) as one line
    precision_of                       bf16, fp16 or fp32: what the engine computes in
    check_dataset_fits                 enough samples for one step of every rank, checked before any rank waits
    read_idx, mnist_dataset            MNIST's raw IDX files, read without torchvision
    TAG_PREFIX, COMPLETE               checkpoint tags are step-NNNNNNNN; complete.json marks a finished one
    mark_complete                      rank 0 marks a tag complete (atomically) and keeps the newest two
    find_snapshot, damaged_files       the newest complete and readable tag; damaged ones skipped with a warning
    snapshot_to_load, to_universal     the tag every rank resumes; written by another number of ranks: DeepSpeed's
                                       universal checkpoint (ds_to_universal, once, by rank 0) or one line, exit 2
    resume_on_another_shape            the data position in samples and the LR schedule, at the new world size
    report_memory, model_state_bytes,
    tensor_bytes, flat_tensors         --memory-report: bytes per rank of parameters, gradients, optimizer states
"""

import argparse
import contextlib
import functools
import gc
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, TensorDataset

import toolkit
from toolkit import OneLineParser, RecipeError, deadline, log, non_negative_int, positive_float, positive_int

HERE = Path(__file__).resolve().parent
TAG_PREFIX = "step-"
COMPLETE = "complete.json"  # written into a checkpoint tag once every rank has written its part
UNIVERSAL = "_universal"  # step-NNNNNNNN_universal: that tag converted by ds_to_universal (any world size loads it)

# ------------------------------------------------------------------------------------------------ command line, run


def parameter_count(text):
    """'2M', '500k', '1.5e6' -> an integer number of parameters."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(text[-1:].lower(), 1)
    value = int(float(text[:-1] if scale != 1 else text) * scale)
    if value < 10_000:
        raise argparse.ArgumentTypeError(f"must be at least 10k parameters, got {text}")
    return value


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts, plus DeepSpeed's config and the model."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="per process: DeepSpeed's train_micro_batch_size_per_gpu")
    p.add_argument("--lr", type=positive_float, default=None, help="default: 0.05 (convnet, SGD), 3e-4 (gpt, AdamW)")
    p.add_argument("--data", choices=["synthetic", "mnist", "text"], default="synthetic",
                   help="mnist: the raw IDX files (convnet); text: *.txt files as bytes (gpt)")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="the directory that holds the mnist or text files")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="DeepSpeed checkpoints go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="bf16 (DeepSpeed's bf16 section); fp16 + loss scaling on GPUs without bf16")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    ds = p.add_argument_group("DeepSpeed")
    ds.add_argument("--ds-config", default=str(HERE / "configs" / "zero2.json"),
                    help="DeepSpeed JSON config (ZeRO stage, offload, bf16/fp16, accumulation, clipping); "
                         "default: configs/zero2.json")
    ds.add_argument("--model", choices=["convnet", "gpt"], default="convnet",
                    help="convnet: the shared toy model (SGD); gpt: a small GPT-style transformer (AdamW)")
    ds.add_argument("--gpt-params", type=parameter_count, default=parameter_count("2M"),
                    help="approximate parameter count of the gpt model, e.g. 2M, 125M")
    ds.add_argument("--memory-report", action="store_true",
                    help="print bytes per rank of parameters, gradients and optimizer states after the first step")
    # The `deepspeed` launcher appends --local_rank=N to the script's arguments (the value is also in
    # LOCAL_RANK, which is what the recipes read).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the directory that holds the dataset)")
    wants = {"mnist": "convnet", "text": "gpt"}.get(args.data)
    if wants and args.model != wants:
        p.error(f"--data {args.data} is for --model {wants}")
    args.lr_given = args.lr is not None  # only a given --lr overrides the lr of a config's "optimizer" section
    if args.lr is None:
        args.lr = 0.05 if args.model == "convnet" else 3e-4
    # C12: GPUs given (or --backend nccl) but torch cannot use them: one line, before DeepSpeed's accelerator
    # detection would quietly settle on its CPU accelerator.
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


def leave_process_group():
    """On the way out, whatever happened: the process group destroyed if this process made one, then the last
    references to it collected while gloo's threads can still be joined (README: Troubleshooting)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def explain(error):
    """toolkit.run's verdict on an error that is not a RecipeError: a collective that failed because another rank is
    gone or stopped answering within --timeout (gloo: "Timed out waiting ... for recv", "Connection closed by peer";
    NCCL: a DistBackendError) is not this rank's fault -- one line and exit 1 (the last snapshot is intact). None for
    anything else: a bug, with its traceback."""
    text = str(error).strip()
    if not (isinstance(error, RuntimeError) and dist.is_initialized()
            and (isinstance(error, dist.DistError) or "gloo/transport" in text)):
        return None
    gist = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0])[:200]  # without gloo's "[/.../unbound_buffer.cc:78] "
    return (f"lost contact with another rank ({gist}): a process or node of the job died or stopped answering; see "
            f"its log. The last snapshot is intact: a requeued or resubmitted run resumes from it"), 1


# Every script's entry point: SIGUSR1/SIGTERM caught from the first line, a RecipeError as one line and exit 2, a
# lost peer as one line and exit 1 (explain), the process group left on the way out (toolkit.run).
run = functools.partial(toolkit.run, explain=explain, cleanup=leave_process_group)


# ------------------------------------------------------------------------------------------------ processes


def import_deepspeed():
    """DeepSpeed, imported after the command line and the launch have been checked (its import takes seconds).

    Without CUDA, DeepSpeed detects its CPU accelerator and says so on stdout, without a rank prefix; naming
    it (DS_ACCELERATOR=cpu) is the same choice, silently. DS_ACCELERATOR="" (set but empty) makes it raise.
    """
    cpu = not torch.cuda.is_available()
    if cpu and not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    # WORKAROUND(torch 2.13, pytorch/pytorch#186124): hide the FutureWarning ZeRO's deprecated collectives raise
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    deepspeed.utils.logger.setLevel(logging.ERROR)  # its INFO and WARNING lines have no rank prefix (C3)
    if cpu:  # WORKAROUND(deepspeed 0.19.8, deepspeed/comm/torch.py build_shm_op): no JIT build of an unused op
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a dict DeepSpeed keeps and consults
    return deepspeed


def launch_env(how):
    """RANK, LOCAL_RANK, WORLD_SIZE (as integers), after checking that MASTER_ADDR and MASTER_PORT are set too:
    a clear error naming the launcher when any is missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: {how} (or set all of {', '.join(names)})")
    return [int(os.environ[n]) for n in names[:3]]


def device_index(local_rank, visible):
    """The GPU (index among the `visible` ones) of the process with this LOCAL_RANK: its local rank where every
    process of the node sees all GPUs, 0 where each sees only its own (srun --gpus-per-task)."""
    return local_rank % visible


def pick_device(local_rank):
    """This rank's device, and DeepSpeed told the same one. DeepSpeed takes the GPU index from LOCAL_RANK itself:
    the engine calls set_device(LOCAL_RANK) and puts the model there, init_process_group binds cuda:LOCAL_RANK,
    ZeRO-3 gathers parameters there. LOCAL_RANK is therefore set to the device index (0 for every task that sees
    only its own GPU): left at the local rank, rank 3 of a node would ask for a cuda:3 it cannot see."""
    if not torch.cuda.is_available():
        os.environ["LOCAL_RANK"] = str(local_rank)  # DeepSpeed insists on it, even for one process
        return torch.device("cpu")
    device = torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    os.environ["LOCAL_RANK"] = str(device.index)
    torch.set_float32_matmul_precision("high")  # fp32 (no bf16/fp16 section): TF32 matmuls on Ampere+ (C10)
    return device


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"



@contextlib.contextmanager
def explained_rendezvous(rank, world_size, timeout):
    """Around init_process_group: turn the ways a rendezvous fails into one line that says what to check."""
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"rendezvous at {addr} (are all {world_size} ranks started, MASTER_ADDR reachable from every node, "
            f"MASTER_PORT used by nothing else?)")
    try:
        with deadline(timeout, rank, what):
            yield
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {timeout}s")
        raise RecipeError(f"rendezvous at {addr} failed: {hint} ({str(e).splitlines()[0][:200]})") from None


def init_distributed(args, rank, world_size):
    """deepspeed.init_distributed with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT already in the environment.

    auto_mpi_discovery=False: without RANK, DeepSpeed would try MPI discovery (and fail on a missing mpi4py);
    the scripts check the variables themselves, so a missing one is our clear error, not DeepSpeed's.
    """
    deepspeed = import_deepspeed()
    with explained_rendezvous(rank, world_size, args.timeout):
        deepspeed.init_distributed(dist_backend=pick_backend(args.backend), auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=args.timeout), rank=rank, world_size=world_size)
    bound_deepspeed_groups(args.timeout)


def bound_deepspeed_groups(timeout):
    """The groups DeepSpeed makes for itself under --timeout too. Its engine and ZeRO run their collectives in
    groups of their own (the data-parallel group is a clone of the world), made by dist.new_group(ranks) without a
    timeout: torch's default, 30 min (10 with NCCL), not the world group's. A rank that stopped answering (alive but
    stuck) held the others inside ZeRO's gradient reduction for that long, far past --timeout."""
    # WORKAROUND(deepspeed 0.19.8, deepspeed/comm/torch.py new_group): DeepSpeed's groups take torch's default timeout
    dist.distributed_c10d.default_pg_timeout = dist.distributed_c10d.default_pg_nccl_timeout = timedelta(
        seconds=timeout)


def reduce_max(value, device):
    """The largest `value` (a float) over all ranks (one all_reduce MAX): the ranks agree to stop when any one was
    asked to (inf), else on the slowest rank's seconds per step (PREEMPTION.agreed picks its next check from it)."""
    largest = torch.tensor(float(value), device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest.item()


def device_sync(device):
    """What the benchmarks' StepTimer calls after each step: wait for the GPU's queued work (nothing on a CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ config, data


def load_ds_config(args, world_size, device):
    """The DeepSpeed config file, completed from the command line and checked before DeepSpeed sees it.

    Batch sizes: --batch-size is the micro batch per process; the file may set gradient_accumulation_steps and,
    if it sets train_batch_size, that must equal micro x accumulation x world size (DeepSpeed would stop with an
    assertion deep inside initialize; here it is one line that names the three numbers).
    """
    path = Path(args.ds_config)
    if not path.is_file():
        raise RecipeError(f"--ds-config {path}: no such file (the configs/ folder has zero0.json ... zero3.json)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"--ds-config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise RecipeError(f"--ds-config {path} must hold a JSON object")
    micro = config.setdefault("train_micro_batch_size_per_gpu", args.batch_size)
    if micro != args.batch_size:
        raise RecipeError(f"--ds-config {path} sets train_micro_batch_size_per_gpu {micro} but --batch-size is "
                          f"{args.batch_size}: remove it from the file (--batch-size sets it)")
    accumulation = config.setdefault("gradient_accumulation_steps", 1)
    total = config.setdefault("train_batch_size", micro * accumulation * world_size)
    if total != micro * accumulation * world_size:
        raise RecipeError(f"--ds-config {path}: train_batch_size {total} != micro batch {micro} x "
                          f"gradient_accumulation_steps {accumulation} x world size {world_size} "
                          f"(= {micro * accumulation * world_size}); fix one of the three or drop train_batch_size")
    fp16 = config.get("fp16", {}).get("enabled") is True
    if args.amp and not fp16:
        # C10: bf16 where the hardware has it natively (CPUs, compute capability >= 8.0), else fp16.
        native_bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 8
        section = "bf16" if native_bf16 else "fp16"
        fp16 = not native_bf16
        config[section] = {**config.get(section, {}), "enabled": True}
    if fp16 and device.type != "cuda":
        raise RecipeError(f"fp16 (in {path.name if not args.amp else '--amp'}) needs a CUDA GPU: DeepSpeed has no "
                          f"fp16 on {device.type}; use bf16 (--amp, or \"bf16\": {{\"enabled\": true}}) instead")
    if config.get("bf16", {}).get("enabled") and config.get("fp16", {}).get("enabled"):
        raise RecipeError(f"--ds-config {path} enables both bf16 and fp16: choose one")
    learning_rate(args, config, path)
    # DeepSpeed 0.19 clips gradients to norm 1.0 unless the config says otherwise: a silent difference from a
    # plain training loop. Here clipping happens only where a config asks for it (zero2_bf16_accum.json).
    config.setdefault("gradient_clipping", 0.0)
    # The recipes print their own progress; a client optimizer with ZeRO is what this folder tests on CPU.
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


# The scheduler sections of DeepSpeed's own schedules that set the learning rate themselves (WarmupCosineLR scales
# the optimizer's lr instead); a WarmupLR without warmup_max_lr warms up to the optimizer's lr.
SCHEDULER_LR_KEYS = {"WarmupLR": "warmup_max_lr", "WarmupDecayLR": "warmup_max_lr", "OneCycle": "cycle_max_lr",
                     "LRRangeTest": "lr_range_test_min_lr"}


def learning_rate(args, config, path):
    """--lr merged into the config, never silently: an "optimizer" section keeps its own lr unless --lr was given
    on the command line (it gets the recipe's default only if it names none); a "scheduler" section is left to
    DeepSpeed, and --lr together with one that sets the lr itself is refused rather than ignored."""
    if isinstance(config.get("optimizer"), dict):
        params = config["optimizer"].setdefault("params", {})
        if args.lr_given or "lr" not in params:
            params["lr"] = args.lr
    scheduler = config.get("scheduler")
    if scheduler is None:
        return
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("params", {}), dict):
        raise RecipeError(f"--ds-config {path}: \"scheduler\" must be an object with \"type\" and \"params\"")
    key = SCHEDULER_LR_KEYS.get(scheduler.get("type"))
    if args.lr_given and key in scheduler.get("params", {}):
        raise RecipeError(f"--ds-config {path}: its {scheduler['type']} scheduler sets the learning rate itself "
                          f"({key}), which would replace --lr {args.lr}: drop --lr or {key}")


@contextlib.contextmanager
def config_errors(path):
    """Around deepspeed.initialize: DeepSpeed validates the config with asserts and pydantic; one line instead."""
    try:
        yield
    except (AssertionError, ValueError) as e:
        raise RecipeError(f"DeepSpeed rejected --ds-config {path}: {' '.join(str(e).split())[:300]}") from None


def precision_of(engine):
    return "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"


def check_dataset_fits(dataset: Dataset, world_size, batch_size, accumulation=1):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // world_size // batch_size // accumulation == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x batch size "
                          f"{batch_size} x {accumulation} accumulation steps: lower --batch-size or use more data")


def read_idx(path, magic, shape_tail):
    """One MNIST IDX file (big-endian header: magic, count, dims), checked against what it must hold."""
    import numpy as np

    data = path.read_bytes()
    header = 4 * (2 + len(shape_tail))
    if len(data) < header:
        raise RecipeError(f"{path} is not an MNIST IDX file (only {len(data)} bytes)")
    fields = np.frombuffer(data[:header], dtype=">u4")
    n = int(fields[1])
    if int(fields[0]) != magic or tuple(int(v) for v in fields[2:]) != shape_tail or len(data) != header + n * \
            math.prod(shape_tail):
        raise RecipeError(f"{path} is not an MNIST IDX file of shape (N, {', '.join(map(str, shape_tail))}) "
                          f"(magic {int(fields[0])}, header {fields.tolist()}, {len(data)} bytes)")
    return torch.from_numpy(np.frombuffer(data[header:], dtype=np.uint8).copy()).reshape(n, *shape_tail)


def mnist_dataset(root):
    """MNIST's raw training files as torchvision downloads them (root/MNIST/raw/*-ubyte), read directly: the
    only torchvision matching torch 2.13.0 is a CUDA build, so this folder does not depend on it."""
    raw = Path(root) / "MNIST" / "raw"
    files = [raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RecipeError(f"--data mnist: {', '.join(missing)} not found (put MNIST's raw IDX files under "
                          f"{raw})")
    images = read_idx(files[0], 2051, (28, 28)).float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1)
    labels = read_idx(files[1], 2049, ()).long()
    if len(images) != len(labels):
        raise RecipeError(f"--data mnist: {len(images)} images but {len(labels)} labels in {raw}")
    return TensorDataset(images, labels)


# ------------------------------------------------------------------------------------------------ checkpoint tags


def mark_complete(checkpoint_dir, tag, progress):
    """Rank 0, once every rank has saved its part: complete.json into the tag (written atomically), then every
    tag but the newest two deleted."""
    marker = json.dumps(progress).encode()
    toolkit.atomic_write(str(Path(checkpoint_dir) / tag / COMPLETE), lambda f: f.write(marker))
    done = sorted(p.parent for p in Path(checkpoint_dir).glob(f"{TAG_PREFIX}*/{COMPLETE}"))
    for old in done[:-2]:  # keep the newest and the previous one (and their universal conversions)
        for folder in filter(Path.is_dir, (old, old.with_name(old.name + UNIVERSAL))):
            shutil.rmtree(folder)


def damaged_files(tag_dir):
    """The checkpoint files of a tag that cannot be opened (a truncated torch.save zip has no central
    directory). Cheap: nothing is unpickled, no weights are read."""
    bad = []
    for f in sorted(tag_dir.glob("*.pt")):
        try:
            with zipfile.ZipFile(f):
                pass
        except (zipfile.BadZipFile, OSError) as e:
            bad.append(f"{f} ({type(e).__name__}: {e})")
    return bad


def find_snapshot(checkpoint_dir):
    """The newest complete and readable checkpoint tag (by the step stored in it), or None if there is none.

    A tag counts only once complete.json is in it (written after every rank finished its part), so a save cut
    short is never resumed from. A damaged newest tag is named in a warning and the previous one is used; if
    none is usable, that is an error (starting over silently would overwrite the finished work).
    """
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None
    tags = []
    for marker in Path(checkpoint_dir).glob(f"{TAG_PREFIX}*/{COMPLETE}"):
        try:
            tags.append((json.loads(marker.read_text())["step"], marker.parent))
        except (ValueError, KeyError, OSError):
            continue
    problems = []
    for _, tag_dir in sorted(tags, reverse=True):
        bad = damaged_files(tag_dir)
        if not bad:
            return tag_dir.name
        problems.append(f"{tag_dir.name}: {'; '.join(bad)}")
        print(f"warning: checkpoint {problems[-1]} unreadable; trying the previous one", file=sys.stderr, flush=True)
    if problems:
        raise RecipeError("no usable checkpoint: " + " | ".join(problems) +
                          ". Delete or move the damaged tag(s) to start over.")
    return None


# ------------------------------------------------------------------------------------------------ another world size


def snapshot_to_load(checkpoint_dir, world_size, config, rank):
    """(tag, progress from its complete.json) of the snapshot every rank resumes, or None. Rank 0 decides and tells
    the others: on a shared filesystem ranks can disagree about whether a file exists, and a job where only some
    ranks resume deadlocks.

    A tag whose optimizer states were partitioned over another number of ranks (ZeRO-1/2/3, and bf16's optimizer
    at stage 0: one *zero_pp_rank_* file per rank) cannot be loaded as it is (DeepSpeed raises
    ZeRORuntimeException): rank 0 converts it once into DeepSpeed's universal checkpoint, which any world size
    loads ("checkpoint": {"load_universal": true}, set here in the config). Stage 0 in fp32 saved one whole copy
    (mp_rank_00): it loads as it is."""
    choice = [None]
    if rank == 0 and (tag := find_snapshot(checkpoint_dir)):
        progress = json.loads((Path(checkpoint_dir) / tag / COMPLETE).read_text())
        shards = len(list((Path(checkpoint_dir) / tag).glob("*zero_pp_rank_*optim_states.pt")))
        try:
            if shards and shards != world_size:
                tag = to_universal(Path(checkpoint_dir), tag, shards, world_size)
            choice = [(tag, progress)]
        except RecipeError as e:
            choice = [str(e)]  # every rank stops, none waits for a rank that has left; rank 0 says why
    dist.broadcast_object_list(choice, src=0)
    if isinstance(choice[0], str):
        raise RecipeError(choice[0], every_rank=False)
    if choice[0] and choice[0][0].endswith(UNIVERSAL):
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    return choice[0]


def to_universal(checkpoint_dir, tag, saved_ranks, world_size):
    """DeepSpeed's own converter (python -m deepspeed.checkpoint.ds_to_universal), run in this process with its
    output kept off the log, into a temporary folder renamed when complete: a conversion cut short is never used."""
    from deepspeed.checkpoint import ds_to_universal

    target = checkpoint_dir / (tag + UNIVERSAL)
    if target.is_dir():  # converted by an earlier attempt at this world size
        return target.name
    scratch = checkpoint_dir / f".converting-{tag}"
    shutil.rmtree(scratch, ignore_errors=True)
    options = argparse.Namespace(input_folder=str(checkpoint_dir / tag), output_folder=str(scratch / target.name),
                                 num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                                 inject_missing_state=True)  # universal_checkpoint_info: what Megatron saves
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(options)
    except Exception as e:  # the converter's asserts, KeyErrors, ...: what it could not convert
        shutil.rmtree(scratch, ignore_errors=True)
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if "exp_avg" in why:
            why += ", the converter knows only Adam's optimizer states"
        raise RecipeError(f"checkpoint {checkpoint_dir / tag} was written by {saved_ranks} rank(s), this job has "
                          f"{world_size}, and DeepSpeed's ds_to_universal could not convert it ({why}): resume "
                          f"with {saved_ranks} rank(s)") from None
    os.replace(scratch / target.name, target)
    shutil.rmtree(scratch)
    return target.name


def resume_on_another_shape(trainer, saved, path):
    """The progress of a snapshot written by another number of ranks or another per-rank batch, in this run's
    terms. Every layout reads an epoch's samples in the same seeded order (rank r takes every world_size-th), so
    the samples trained so far are a prefix of that order, counted in samples: skip the same prefix when it is a
    whole number of this run's optimizer steps, and continue the learning-rate curve at the same point; otherwise
    refuse. Counting the old per-rank batches under the new layout would silently train on the wrong samples."""
    t, args = trainer, trainer.args
    old = (saved.get("world_size", t.world_size), saved.get("batch_size", args.batch_size))
    done = saved.get("samples_in_epoch", saved["batch_in_epoch"] * old[0] * old[1])
    if old == (t.world_size, args.batch_size):
        return
    per_step = t.world_size * args.batch_size * t.accumulation
    if done % per_step:
        raise RecipeError(f"{path} was written by {old[0]} rank(s) x batch {old[1]} after {done} samples of epoch "
                          f"{t.epoch + 1}, not a whole number of steps of {t.world_size} x {args.batch_size} x "
                          f"{t.accumulation} accumulation: resume with {old[0]} rank(s) x batch {old[1]}",
                          every_rank=False)  # every rank finds the same: rank 0 says it
    t.batch_in_epoch, t.step = done // (t.world_size * args.batch_size), t.epoch * t.steps_per_epoch + done // per_step
    schedule = t.engine.lr_scheduler
    if isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR):  # the recipe's: it spans --epochs
        schedule.T_max, schedule.last_epoch = args.epochs * t.steps_per_epoch, t.step
        at = (1 + math.cos(math.pi * t.step / schedule.T_max)) / 2  # its closed form; step() goes on from there
        for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
            group["lr"] = schedule.eta_min + (base - schedule.eta_min) * at
    t._log(f"snapshot written by {old[0]} rank(s) x batch {old[1]}, resuming as {t.world_size} x {args.batch_size}: "
           f"epoch {t.epoch + 1} after {done} samples (step {t.step})")


# ------------------------------------------------------------------------------------------------ memory report


def tensor_bytes(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def flat_tensors(groups):
    for g in groups or []:
        yield from (flat_tensors(g) if isinstance(g, (list, tuple)) else [g])


def model_state_bytes(engine):
    """Bytes this rank holds of parameters, gradients and optimizer states (after backward, before step).

    Read from DeepSpeed's own bookkeeping: under ZeRO-3 a parameter's local shard is `ds_tensor`, and p.data is an
    empty placeholder outside forward/backward -- except for the parameters of at most
    stage3_param_persistence_threshold elements (ds_persist), which every rank keeps whole besides its shard: both
    are resident, both counted ("whole": the elements held so); with hpZ (zero_hpz_partition_size) also the second
    partition over the node's ranks, ds_secondary_tensor, alive from forward to the optimizer step. The fp32 master
    weights are single_partition_of_fp32_groups (ZeRO-1/2), fp32_partitioned_groups_flat (ZeRO-3) or fp32_groups
    (bf16/fp16 without ZeRO); ZeRO-1/2/3 keep the reduced gradient shards in averaged_gradients, stage 0 on the
    parameters.
    """
    params = list(engine.module.parameters())
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    zero3 = ("ds_tensor", "data", "ds_secondary_tensor")  # shard, whole (persistent), hpZ's partition in the node
    resident = [getattr(p, name, None) for p in params for name in (zero3 if stage == 3 else ("data",))]
    whole = sum(p.ds_numel for p in params if p.data.numel() > 0) if stage == 3 else 0
    inner = getattr(opt, "optimizer", opt)  # ZeRO and mixed-precision wrappers keep the torch optimizer inside
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups")
               for t in flat_tensors(getattr(opt, name, None))]
    averaged = getattr(opt, "averaged_gradients", None)
    grads = flat_tensors(averaged.values()) if averaged else (p.grad for p in params)
    return {"params": tensor_bytes(resident), "grads": tensor_bytes(grads), "optimizer": tensor_bytes(states + masters),
            "numel": sum(p.ds_numel if stage == 3 else p.numel() for p in params), "whole": whole}


def report_memory(engine, rank):
    """Bytes per rank of the three model states (the most any rank holds), to set beside the ZeRO paper's formula;
    under ZeRO-3 also the parameter elements every rank keeps whole (stage3_param_persistence_threshold)."""
    measured = model_state_bytes(engine)
    totals = torch.tensor([measured[k] for k in ("params", "grads", "optimizer")], dtype=torch.float64,
                          device=engine.device)  # NCCL gathers CUDA tensors only
    gathered = [torch.zeros_like(totals) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, totals)
    if rank == 0:
        worst = torch.stack(gathered).max(0).values.tolist()
        log(0, "memory per rank | stage {} | world {} | params {} | param bytes {:.0f} | grad bytes {:.0f} | "
               "optimizer bytes {:.0f} | params held whole {}".format(
                   engine.zero_optimization_stage(), dist.get_world_size(), measured["numel"], *worst,
                   measured["whole"]))
