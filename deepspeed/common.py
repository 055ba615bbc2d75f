"""What every deepspeed/ recipe shares: the command line, the DeepSpeed config, the models, the data, the
training loop and the snapshots.

The scripts differ only in how the processes are started and find each other (setup_distributed); once a
process group exists, `train()` below does the same thing in all of them. So `diff single_gpu.py
multigpu_torchrun.py` shows exactly what going multi-process changes.
"""

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
import zipfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

HERE = Path(__file__).resolve().parent
# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
TAG_PREFIX = "step-"
COMPLETE = "complete.json"  # written into a checkpoint tag once every rank has written its part


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback."""


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def parameter_count(text):
    """'2M', '500k', '1.5e6' -> an integer number of parameters."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(text[-1:].lower(), 1)
    value = int(float(text[:-1] if scale != 1 else text) * scale)
    if value < 10_000:
        raise argparse.ArgumentTypeError(f"must be at least 10k parameters, got {text}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line on stderr and exit 2 (argparse's default prints the whole usage first)."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


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
    p.add_argument("--data-dir", default=None, help="the directory that holds the mnist or text files")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="samples of synthetic data")
    p.add_argument("--checkpoint-dir", default=None, help="DeepSpeed checkpoints go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="bf16 (DeepSpeed's bf16 section); fp16 + loss scaling on GPUs without bf16")
    p.add_argument("--num-workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
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
    if args.lr is None:
        args.lr = 0.05 if args.model == "convnet" else 3e-4
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def run(main, *args, rank=None):
    """Call main(*args); turn a RecipeError into one clear line and exit 2 instead of a traceback wall."""
    try:
        main(*args)
        gc.collect()  # free process-group references while gloo's threads can still be joined
    except RecipeError as e:
        if rank is None:
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        log(rank, f"error: {e}", file=sys.stderr)
        sys.exit(2)


@contextlib.contextmanager
def deadline(seconds, rank, what):
    """Exit with a clear message if the block has not finished after `seconds`.

    Some failures block inside C++ where no timeout reaches, e.g. a rank that connected to a MASTER_PORT that
    another program is listening on waits for an answer forever. A dead or missing rank must never hang a job.
    """
    def give_up():
        log(rank, f"error: {what} did not finish within {seconds} s", file=sys.stderr)
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


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


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def pick_device(local_rank):
    if torch.cuda.is_available():
        # With --gpus-per-task each process may see only one device (always "cuda:0").
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def launch_env(how):
    """RANK, LOCAL_RANK, WORLD_SIZE (as integers), after checking that MASTER_ADDR and MASTER_PORT are set too:
    a clear error naming the launcher when any is missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: {how} (or set all of {', '.join(names)})")
    return [int(os.environ[n]) for n in names[:3]]


def import_deepspeed():
    """DeepSpeed, imported after the command line and the launch have been checked (its import takes seconds).

    Without CUDA, DeepSpeed detects its CPU accelerator and says so on stdout, without a rank prefix; naming
    it (DS_ACCELERATOR=cpu) is the same choice, silently. DS_ACCELERATOR="" (set but empty) makes it raise.
    On CPU, DeepSpeed also JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm) the first time a
    process group starts in a fresh environment: about a minute of compiling (3.5 min on a loaded 2-core
    machine) for a kernel only inference_all_reduce uses, never training. The recipes skip it on CPU.
    """
    cpu = not torch.cuda.is_available()
    if cpu and not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    # ZeRO calls torch's all_gather_into_tensor, which torch 2.13 marks deprecated, once per rank per run.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    deepspeed.utils.logger.setLevel(logging.ERROR)  # its INFO and WARNING lines have no rank prefix (C3)
    if cpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a dict DeepSpeed keeps and consults
    return deepspeed


def init_deepspeed_distributed(args, rank, world_size):
    """deepspeed.init_distributed with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT already in the environment.

    auto_mpi_discovery=False: without RANK, DeepSpeed would try MPI discovery (and fail on a missing mpi4py);
    the scripts check the variables themselves, so a missing one is our clear error, not DeepSpeed's.
    """
    deepspeed = import_deepspeed()
    with explained_rendezvous(rank, world_size, args.timeout):
        deepspeed.init_distributed(dist_backend=pick_backend(args.backend), auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=args.timeout), rank=rank, world_size=world_size)


# ---------------------------------------------------------------------------------------------------- models


class ConvNet(nn.Module):
    """The shared toy model (identical in every folder, for the benchmarks): a small CNN."""

    def __init__(self, in_channels=1, num_classes=10, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),  # same head for 28x28 (MNIST) and 32x32 (CIFAR-10) inputs
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


VOCAB = 256  # byte-level tokens: any text file is valid input, no tokenizer to install
CONTEXT = 64


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-style decoder (pre-LN blocks, causal attention, tied embeddings): a model where ZeRO matters,
    because its size is set on the command line (--gpt-params) instead of fixed."""

    LAYERS = 4

    def __init__(self, target_params):
        super().__init__()
        # 12 L d^2 (attention + MLP) + (V + T) d is the parameter count; solve for a width that is a multiple
        # of 32 (so that 4 heads of 8+ dims divide it).
        a, b = 12 * self.LAYERS, VOCAB + CONTEXT
        dim = max(32, round((-b + math.sqrt(b * b + 4 * a * target_params)) / (2 * a) / 32) * 32)
        self.tok = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(CONTEXT, dim)
        self.blocks = nn.ModuleList(Block(dim, heads=4) for _ in range(self.LAYERS))
        self.ln = nn.LayerNorm(dim)
        for emb in (self.tok, self.pos):  # GPT-2's 0.02: with tied output weights, logits start near uniform
            nn.init.normal_(emb.weight, std=0.02)
        self.register_buffer("mask", torch.triu(torch.full((CONTEXT, CONTEXT), float("-inf")), 1), persistent=False)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        for block in self.blocks:
            x = block(x, self.mask[:t, :t].to(x.dtype))
        return self.ln(x) @ self.tok.weight.T  # tied output projection


def build_model(args, dataset):
    if args.model == "gpt":
        return GPT(args.gpt_params)
    return ConvNet(in_channels=dataset.in_channels, num_classes=10)


def loss_and_hits(model, x, y):
    """Cross-entropy and the number of correct predictions (per image, or per next token for the GPT)."""
    logits = model(x)
    if logits.dim() == 3:
        logits, y = logits.flatten(0, 1), y.flatten()
    loss = F.cross_entropy(logits.float(), y)
    return loss, (logits.argmax(1) == y).sum(), y.numel()


# ---------------------------------------------------------------------------------------------------- data


def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a fixed pattern per class plus noise).

    Generated from its own seed, so every rank and every run builds the identical dataset without any file.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(10, 1, 28, 28, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    images = prototypes[labels] + torch.randn(size, 1, 28, 28, generator=g)
    return TensorDataset(images, labels)


def synthetic_text(size, seed=1234):
    """Token sequences with a learnable rule (each next byte = previous + a per-sequence stride, mod 256)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    stride = torch.randint(1, 8, (size, 1), generator=g)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    return TensorDataset(seq[:, :-1], seq[:, 1:])


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


def text_dataset(root):
    """Every *.txt file under root, as bytes, cut into CONTEXT+1 windows: input = bytes, target = next bytes."""
    files = sorted(Path(root).glob("*.txt"))
    if not files:
        raise RecipeError(f"--data text: no *.txt files in {root}")
    data = b"".join(f.read_bytes() for f in files)
    n = len(data) // (CONTEXT + 1)
    if n == 0:
        raise RecipeError(f"--data text: {len(data)} bytes in {root}, fewer than one sequence of {CONTEXT + 1}")
    seq = torch.frombuffer(bytearray(data[:n * (CONTEXT + 1)]), dtype=torch.uint8).long().view(n, CONTEXT + 1)
    return TensorDataset(seq[:, :-1], seq[:, 1:])


def build_dataset(args):
    if args.data != "synthetic" and not Path(args.data_dir).is_dir():
        raise RecipeError(f"--data-dir {args.data_dir} is not a directory")
    if args.data == "mnist":
        ds = mnist_dataset(args.data_dir)
    elif args.data == "text":
        ds = text_dataset(args.data_dir)
    else:
        ds = synthetic_dataset(args.dataset_size) if args.model == "convnet" else synthetic_text(args.dataset_size)
    ds.in_channels = 1
    return ds


def check_dataset_fits(dataset: Dataset, world_size, batch_size, accumulation):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // world_size // batch_size // accumulation == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x batch size "
                          f"{batch_size} x {accumulation} accumulation steps: lower --batch-size or use more data")


def ignore_preemption_signals(_worker_id):
    """DataLoader workers: Slurm signals every process of a step; the training process decides what to do."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_dataloader(dataset, args, rank, world_size):
    # Each rank reads a disjoint 1/world_size of the data; set_epoch() reshuffles it every epoch. With one
    # process this is a seeded shuffle drawn exactly as a DistributedSampler with one replica draws it, which is
    # what lets the tests compare one process with the global batch against N ranks.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0, worker_init_fn=ignore_preemption_signals)


# ---------------------------------------------------------------------------------------------------- config


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
    # DeepSpeed 0.19 clips gradients to norm 1.0 unless the config says otherwise: a silent difference from a
    # plain training loop. Here clipping happens only where a config asks for it (zero2_bf16_accum.json).
    config.setdefault("gradient_clipping", 0.0)
    # The recipes print their own progress; a client optimizer with ZeRO is what this folder tests on CPU.
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config


def zero_stage(config):
    return int(config.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(model, args, steps_per_epoch, config):
    """A client optimizer, unless the config has an "optimizer" section (then DeepSpeed builds it, e.g.
    DeepSpeedCPUAdam for offload, which it compiles on first use), and the LR schedule as a function of the
    optimizer, which DeepSpeed calls with whichever optimizer it ends up stepping."""
    if "optimizer" in config:
        optimizer = None
        config["optimizer"].setdefault("params", {})["lr"] = args.lr
    elif args.model == "convnet":  # the same optimizer as pytorch/ and the raw DDP baseline
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:  # Adam's two moments are what the ZeRO paper's 12 bytes per parameter count
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    # The schedule spans --epochs; --max-steps only stops early, so a run cut short (by it, a crash or a
    # preemption) and then resumed follows the same learning-rate curve as an uninterrupted one.
    def scheduler(opt):
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)

    return optimizer, scheduler


# ---------------------------------------------------------------------------------------------------- memory


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

    Read from DeepSpeed's own bookkeeping: under ZeRO-3 a parameter's local shard is `ds_tensor` (p.data is an
    empty placeholder outside forward/backward); the fp32 master weights are single_partition_of_fp32_groups
    (ZeRO-1/2), fp32_partitioned_groups_flat (ZeRO-3) or fp32_groups (bf16/fp16 without ZeRO); ZeRO-1/2/3 keep
    the reduced gradient shards in averaged_gradients, stage 0 on the parameters.
    """
    params = list(engine.module.parameters())
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    p_bytes = tensor_bytes(p.ds_tensor if stage == 3 else p.data for p in params)
    inner = getattr(opt, "optimizer", opt)  # ZeRO and mixed-precision wrappers keep the torch optimizer inside
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    masters = [t for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups")
               for t in flat_tensors(getattr(opt, name, None))]
    averaged = getattr(opt, "averaged_gradients", None)
    grads = flat_tensors(averaged.values()) if averaged else (p.grad for p in params)
    return {"params": p_bytes, "grads": tensor_bytes(grads), "optimizer": tensor_bytes(states + masters),
            "numel": sum(p.ds_numel if stage == 3 else p.numel() for p in params)}


# ---------------------------------------------------------------------------------------------------- snapshots


def tag_of(step):
    return f"{TAG_PREFIX}{step:08d}"


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


def save_snapshot(engine, checkpoint_dir, state):
    """DeepSpeed's collective save (every rank writes its shard of the model/optimizer states), then rank 0
    marks the tag complete and deletes all but the previous tag."""
    tag = tag_of(state["step"])
    progress = {k: state[k] for k in ("epoch", "step", "batch_in_epoch")}
    engine.save_checkpoint(checkpoint_dir, tag=tag, client_state={**progress, "rng": torch.get_rng_state()})
    dist.barrier()  # every rank's files are on disk before the tag is called complete
    if dist.get_rank() == 0:
        marker = Path(checkpoint_dir) / tag / COMPLETE
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({**progress, "world_size": dist.get_world_size()}))
        os.replace(tmp, marker)
        done = sorted(p.parent for p in Path(checkpoint_dir).glob(f"{TAG_PREFIX}*/{COMPLETE}"))
        for old in done[:-2]:  # keep the newest and the previous one
            for f in sorted(old.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            old.rmdir()
    dist.barrier()


def resume(engine, args, state):
    # Rank 0 decides which tag to use and tells the others: on a shared filesystem ranks can disagree about
    # whether a file exists, and a job where only some ranks resume deadlocks.
    choice = [find_snapshot(args.checkpoint_dir) if state["rank"] == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    tag = choice[0]
    if tag is None:
        return
    path, client = engine.load_checkpoint(args.checkpoint_dir, tag=tag)
    if path is None:
        raise RecipeError(f"DeepSpeed could not load checkpoint {tag} from {args.checkpoint_dir}")
    torch.set_rng_state(client["rng"])
    state.update(epoch=client["epoch"], step=client["step"], batch_in_epoch=client["batch_in_epoch"])
    if state["rank"] == 0:
        log(0, f"resumed from {Path(args.checkpoint_dir) / tag}: epoch {state['epoch'] + 1}, step {state['step']}")


# ---------------------------------------------------------------------------------------------------- training


class PreemptionFlag:
    """Remembers that Slurm asked us to stop; the training loop acts on it at a step boundary.

    Saving inside the signal handler would interrupt a collective half-way; instead every rank checks the flag
    every STOP_CHECK_EVERY steps and all of them agree (all_reduce MAX) on the same step to stop at.
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


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file). Off by default."""

    def __init__(self, path, device):
        self.path, self.device, self.times = path, device, []
        self.start = time.time()

    def step(self):
        if self.path:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # only when timing: a sync per step costs throughput
            self.times.append(time.time())

    def write(self, **info):
        if self.path:
            with open(self.path, "w") as f:
                json.dump({"start_time": self.start, "step_end_times": self.times, **info}, f)


def training_left(state, args):
    return state["epoch"] < args.epochs and not (args.max_steps and state["step"] >= args.max_steps)


def train_epoch(engine, loader, state, args, device, timer):
    """One pass over this rank's shard; returns summed loss, correct predictions and samples, as tensors.

    engine.backward() reduces (ZeRO: reduce-scatters) the gradients; engine.step() steps the optimizer and the
    LR schedule only at the end of each gradient_accumulation_steps micro batches.
    """
    engine.train()
    # With bf16/fp16 DeepSpeed holds the weights in that type and casts nothing for us: images must match.
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    accumulation = engine.gradient_accumulation_steps()
    usable = len(loader) // accumulation * accumulation  # micro batches that make whole optimizer steps
    skip, state["batch_in_epoch"] = state["batch_in_epoch"], 0
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for i, (x, y) in enumerate(loader):
        if i >= usable:
            break
        if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        loss, hits, n = loss_and_hits(engine, x, y)
        engine.backward(loss)
        boundary = (i + 1) % accumulation == 0
        if args.memory_report and state["step"] == 1 and boundary:
            report_memory(engine, state)  # the second step: optimizer states exist, gradients are reduced
        engine.step()  # steps the optimizer and the schedule only at an accumulation boundary
        state["batch_in_epoch"] = i + 1
        loss_sum += loss.detach() * n
        correct += hits
        seen += n
        if not boundary:
            continue
        state["step"] += 1
        timer.step()
        if state["step"] % args.log_every == 0 and state["rank"] == 0:
            log(0, f"epoch {state['epoch'] + 1} | batch {i + 1}/{usable} | step {state['step']} | "
                   f"loss {loss.item():.4f}")
        if args.max_steps and state["step"] >= args.max_steps:
            break
        if state["preemption"].agreed(state["step"], device):
            state["preempted"] = True
            break
    if state["batch_in_epoch"] >= usable:
        state["batch_in_epoch"] = len(loader)
    return loss_sum, correct, seen


def report_memory(engine, state):
    """Bytes per rank of the three model states next to the ZeRO paper's formula for this stage."""
    measured = model_state_bytes(engine)
    totals = torch.tensor([measured[k] for k in ("params", "grads", "optimizer")], dtype=torch.float64)
    gathered = [torch.zeros_like(totals) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, totals)
    if state["rank"] == 0:
        worst = torch.stack(gathered).max(0).values.tolist()
        log(0, "memory per rank | stage {} | world {} | params {} | param bytes {:.0f} | grad bytes {:.0f} | "
               "optimizer bytes {:.0f}".format(engine.zero_optimization_stage(), dist.get_world_size(),
                                               measured["numel"], *worst))


def recipe_main(setup_distributed, description):
    """What every script's main() does: parse the command line, start the processes' group the script's way
    (setup_distributed(args) -> rank, world size, device, checked inputs), train, leave the group."""
    preemption = PreemptionFlag()  # first: a signal that arrives during start-up must not kill the process
    args = parse_args(description)
    rank, world_size, device, inputs = setup_distributed(args)
    try:
        train(args, inputs, rank, world_size, device, preemption)
    finally:
        dist.destroy_process_group()


def prepare(args, world_size, device):
    """The config and the dataset, checked before any process waits for another: bad input fails the same way on
    every rank, at once, instead of leaving one rank in a rendezvous that its peer has already left."""
    config = load_ds_config(args, world_size, device)
    dataset = build_dataset(args)
    check_dataset_fits(dataset, world_size, args.batch_size, config["gradient_accumulation_steps"])
    return config, dataset


def train(args, inputs, rank, world_size, device, preemption):
    """Everything after the process group exists; the same for every launch pattern."""
    deepspeed = import_deepspeed()
    config, dataset = inputs
    accumulation = config["gradient_accumulation_steps"]
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
    loader = build_dataloader(dataset, args, rank, world_size)
    steps_per_epoch = len(loader) // accumulation
    model = build_model(args, dataset)
    optimizer, scheduler = build_optimizer(model, args, steps_per_epoch, config)
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                          model_parameters=model.parameters(), config=config)
    except (AssertionError, ValueError) as e:  # DeepSpeed validates the config with asserts and pydantic
        raise RecipeError(f"DeepSpeed rejected --ds-config {args.ds_config}: "
                          f"{' '.join(str(e).split())[:300]}") from None
    state = {"epoch": 0, "step": 0, "batch_in_epoch": 0, "rank": rank, "preemption": preemption,
             "preempted": False}
    resume(engine, args, state)
    if rank == 0:
        precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
        log(0, f"world size {world_size} | backend {dist.get_backend()} | device {device} | "
               f"ZeRO stage {engine.zero_optimization_stage()} | {precision} | "
               f"{sum(p.numel() for p in model.parameters()) if zero_stage(config) < 3 else 'sharded'} params | "
               f"{len(dataset)} samples | batch {args.batch_size}/rank x {accumulation} accumulation | "
               f"{steps_per_epoch} steps/epoch")

    timer = StepTimer(args.timings_file if rank == 0 else None, device)
    start = time.perf_counter()
    while training_left(state, args):
        epoch_start = time.perf_counter()
        loader.sampler.set_epoch(state["epoch"])  # forget this and every epoch repeats
        loss_sum, correct, seen = train_epoch(engine, loader, state, args, device, timer)
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
        finished = not training_left(state, args)
        if args.checkpoint_dir and (finished or state["preempted"] or state["epoch"] % args.save_every == 0):
            save_snapshot(engine, args.checkpoint_dir, state)  # collective: every rank writes its shard
            if rank == 0:
                log(0, f"snapshot saved to {args.checkpoint_dir} (step {state['step']})")
        if state["preempted"]:
            if rank == 0:
                saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                log(0, f"preempted at step {state['step']}: {saved}; exiting with {PREEMPTED_EXIT_CODE} so the "
                       f"job script requeues")
            raise SystemExit(PREEMPTED_EXIT_CODE)
    timer.write(world_size=world_size, batch_size=args.batch_size)
    if rank == 0:
        log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")
