"""monai/'s plumbing: what running on a cluster needs around the lesson in recipe.py, and the synthetic data.

Map:
    parse_args                  the command line (CONTRACT.md C2, plus --roi-size, --cache-rate, --val-every and
                                --gpu-cache; batch 2 per rank by default: 3-D volumes), then no silent CPU (C12:
                                toolkit.refuse_silent_cpu) and no --gpu-cache without a GPU
    run                         toolkit.run that leaves the process group on the way out (no try/finally in scripts);
                                a peer that died is one line (toolkit.lost_peer)
    leave_process_group         the DDP model freed, then the process group destroyed (README: Troubleshooting)
    torchrun_env                (rank, local_rank, world_size) from RANK, LOCAL_RANK, WORLD_SIZE, or one line on how
    pick_backend, pick_device   nccl with CUDA, gloo without; this process's device
    rendezvous                  init_process_group's deadline, and its failures as one line saying what to check; the
                                store to meet in (toolkit.attempt_store under torchrun's one agent: a key prefix per
                                restart)
    Ranks                       where this process sits, and the collectives the loop needs; `max` is the
                                reduce_max of the ranks' agreement on preemption (toolkit.PREEMPTION.agreed)
    prepare_data                the task folder to read; --data synthetic: one rank per node writes it, the rest wait
    write_synthetic_decathlon   data preparation: a Decathlon task folder of balls in noise (moved from the lesson)
    read_task                   a Decathlon task folder's cases, checked from the NIfTI headers: each problem one line;
                                whether it is CT (dataset.json's modality: recipe.preprocessing windows its intensities)
    check_dataset_fits          enough training cases for the world size and the batch size: ⌊⌊N / world⌋ / batch⌋ >= 1
    save_snapshot               snapshot.pt written atomically, the previous one kept as snapshot.prev.pt
    save_best_model             best_model.pt (weights, Dice, step) written atomically when the validation Dice improves
    exit_preempted              the preemption line, then exit 75 (after the snapshot; no validation in between)
    find_snapshot               the newest readable snapshot; a damaged one named, the other one used
    load_snapshot               a snapshot read for resuming; one of another world size refused in one line
    rng_state, restore_rng      the CPU's and this process's GPU's random state, saved in and restored from a snapshot
    EpochSampler                this rank's cached partition in a new order every epoch from (seed, epoch, rank), whole
                                batches only; a mid-epoch resume starts at its batch (skipped cases never loaded)
    SeededAugmentation          random augmentation seeded per (seed, epoch, case): crops independent of ranks/workers
    mixed_precision             --amp's autocast and GradScaler: bf16 where the device has it, else fp16 (C10)
    step_timer                  toolkit.StepTimer for --timings-file on rank 0 (None otherwise)
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.data import load_decathlon_datalist
from torch.utils.data import Dataset, Sampler

import toolkit
from toolkit import (OneLineParser, RecipeError, StepTimer, atomic_write, deadline, non_negative_int, positive_float,
                     positive_int)

# ---------------------------------------------------------------------------------------------------- command line


def roi_size(text):
    value = positive_int(text)
    if value % 4:
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 (the UNet halves it twice), got {value}")
    return value


def fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    # 2, not the contract's 64: a 3-D volume is a batch of its own (2 cases x 4 crops fill a GPU at 96^3), and the
    # bare command of every launch pattern must fit the 64 default cases at 16 ranks: 64 // 16 // 2 = 2 steps.
    p.add_argument("--batch-size", type=positive_int, default=2,
                   help="cases per process and step, each giving recipe.CROPS_PER_CASE crops (default 2)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--data", choices=["synthetic", "decathlon"], default="synthetic",
                   help="decathlon: a Medical Segmentation Decathlon task folder (dataset.json, imagesTr/, "
                        "labelsTr/); synthetic: such a folder written first, so the same loader runs")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="the task folder (--data decathlon), or where synthetic data is written "
                        "(default: the system's temporary directory, per node)")
    p.add_argument("--dataset-size", type=positive_int, default=64,
                   help="training cases of synthetic data (plus a quarter as many for validation)")
    p.add_argument("--roi-size", type=roi_size, default=32,
                   help="edge of the random training crops and of the sliding window (voxels, multiple of 4)")
    p.add_argument("--cache-rate", type=fraction, default=1.0,
                   help="fraction of the preprocessed training volumes each rank keeps in memory")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
    p.add_argument("--val-every", type=positive_int, default=2,
                   help="epochs between validations (whole volumes, sliding window); the last epoch always validates")
    p.add_argument("--gpu-cache", action="store_true",
                   help="cache the preprocessed cases in GPU memory and augment them there, in a thread "
                        "(ThreadDataLoader): no host-to-device copy per step; needs a GPU and --num-workers 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (fp16 + GradScaler on GPUs without bf16)")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress lines")
    p.add_argument("--timings-file", default=None,
                   help="write per-step wall-clock times here (JSON, rank 0) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} needs --data-dir (the task folder that holds dataset.json)")
    # C12: given GPUs (or --backend nccl) that torch cannot use: one line, before a script picks the CPU as device
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    if args.gpu_cache and not torch.cuda.is_available():
        p.error("--gpu-cache keeps the training cases in GPU memory, but no GPU is visible: drop the flag to cache "
                "in host memory")
    if args.gpu_cache and args.num_workers:  # a worker process cannot use CUDA tensors made before it was forked
        p.error("--gpu-cache augments on the GPU in a thread of this process (ThreadDataLoader): "
                "--num-workers must be 0")
    return args


# ---------------------------------------------------------------------------------------------------- processes


def leave_process_group():
    """Free the DDP model, then destroy the process group -- in that order, or a finished run can hang at exit
    (README: Troubleshooting, "a finished run hangs at exit"). Nothing to do without a process group."""
    if not dist.is_initialized():
        return
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model
    gc.collect()  # DDP's reference cycles
    dist.destroy_process_group()


run = functools.partial(toolkit.run, explain=toolkit.lost_peer, cleanup=leave_process_group)


def torchrun_env(how):
    """(rank, local_rank, world_size) from RANK, LOCAL_RANK, WORLD_SIZE (set by torchrun, or by multinode.py from
    srun's variables); a clear error saying `how` to launch when they are missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: {how}")
    return tuple(int(os.environ[n]) for n in names)


def pick_backend(choice):
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def pick_device(local_rank):
    if not torch.cuda.is_available():
        return torch.device("cpu")
    # With --gpus-per-task each process may see only one device (always "cuda:0").
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def rendezvous(timeout, rank, world_size, store=None):
    """Around init_process_group: a deadline (a rank that reached a port some other program listens on waits in
    C++ forever), and the ways a rendezvous fails turned into one line that says what to check. Yields the store to
    meet in: `store` (multigpu.py's parent hosts one), else toolkit.attempt_store's, else None (env://)."""
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"rendezvous at {addr} (are all {world_size} ranks started, MASTER_ADDR reachable from every node, "
            f"MASTER_PORT used by nothing else?)")
    try:
        with deadline(timeout, rank, what):
            yield store or toolkit.attempt_store(world_size, timeout)
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {timeout}s")
        raise RecipeError(f"rendezvous at {addr} failed: {hint} ({str(e).splitlines()[0][:200]})") from None


@dataclass
class Ranks:
    """Where this process sits in the job. world_size 1 and distributed False: a plain single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def sum(self, values):
        """Element-wise sum over all ranks of a list of floats (one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()

    def max(self, value):
        """The largest `value` (a flag or a float) over all ranks: true on every rank when any rank's flag is set;
        PREEMPTION.agreed's inf (a rank got the signal) or the slowest rank's seconds per step."""
        if not self.distributed:
            return value
        t = torch.tensor(float(value), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def from_rank0(self, value):
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------------------------- data preparation

SYNTHETIC_SEED = 1234  # the synthetic dataset is the same for every run and every rank
SYNTHETIC_SPACING = (1.5, 1.5, 1.5)  # voxel size (mm) the synthetic volumes are written with


def synthetic_folder(args):
    """Where the synthetic task folder lives: named after its size, so different sizes never mix."""
    parent = args.data_dir or os.path.join(tempfile.gettempdir(), "monai-recipes")
    n = args.dataset_size
    return os.path.join(parent, f"synthetic-{n}+{validation_size(n)}cases-{volume_edge(args)}vox")


def volume_edge(args):
    return args.roi_size + args.roi_size // 4  # a bit larger than the crop: crops and sliding windows vary


def validation_size(n_train):
    return max(1, n_train // 4)


def write_synthetic_decathlon(folder, cases, edge):
    """A Medical Segmentation Decathlon task folder with `cases` training volumes and a quarter as many validation
    volumes (listed under "validation", as MONAI's own dataset.json files do): a bright ball in noise, labelled.

    Written exactly in the real layout (dataset.json, imagesTr/*.nii.gz, labelsTr/*.nii.gz), so the real loader
    always runs. Built in a temporary folder and renamed into place: when several nodes write the same shared
    folder at once, one rename wins and the others throw their copy away; a reader never sees half a folder.
    """
    if os.path.exists(os.path.join(folder, "dataset.json")):
        return
    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder) or ".")
    rng = np.random.default_rng(SYNTHETIC_SEED)
    affine = np.diag([*SYNTHETIC_SPACING, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(edge)] * 3, indexing="ij"), axis=-1)
    entries = []
    for i in range(cases + validation_size(cases)):
        center = rng.uniform(edge * 0.3, edge * 0.7, size=3)
        radius = rng.uniform(edge * 0.12, edge * 0.25)
        label = (np.linalg.norm(grid - center, axis=-1) < radius).astype(np.uint8)
        image = (label * 1.0 + rng.normal(0.0, 0.35, size=label.shape)).astype(np.float32)
        name = f"ball_{i:03d}.nii.gz"
        for sub, volume in (("imagesTr", image), ("labelsTr", label)):
            os.makedirs(os.path.join(tmp, sub), exist_ok=True)
            nib.save(nib.Nifti1Image(volume, affine), os.path.join(tmp, sub, name))
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    # The description names the file that first wrote this format; kept so the written bytes do not change.
    meta = {"name": "SyntheticBalls", "description": "synthetic, written by monai/common.py",
            "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "ball"},
            "numTraining": cases, "numTest": 0, "training": entries[:cases], "validation": entries[cases:],
            "test": []}
    with open(os.path.join(tmp, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:  # another node's writer got there first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_data(args, ranks):
    """The task folder to read. The first rank of each node writes synthetic data; the others wait for it."""
    if args.data != "synthetic":
        return args.data_dir
    folder = synthetic_folder(args)
    if ranks.local_rank == 0:
        write_synthetic_decathlon(folder, args.dataset_size, volume_edge(args))
    ranks.barrier()
    return folder


def read_task(folder):
    """The (image, label) cases of a Decathlon task folder, checked so that every problem is one clear line.

    Returns (training cases, validation cases, in_channels, num_classes, ct): ct when every modality of
    dataset.json is "CT" (Hounsfield units: an absolute scale, windowed rather than normalised per volume).
    The validation cases are dataset.json's "validation" list where it has one, else the last fifth of "training"
    (the Decathlon's own files list only "training"). Only NIfTI headers are read here, not the voxels. Every rank
    finds a problem alike, so only rank 0 reports it (every_rank=False): one line per job, not one per rank.
    """
    def bad(message):
        return RecipeError(message, every_rank=False)

    if not os.path.isdir(folder):
        raise bad(f"data directory {folder!r} does not exist")
    if not os.listdir(folder):
        raise bad(f"data directory {folder!r} is empty: expected a Medical Segmentation Decathlon task "
                  f"folder (dataset.json, imagesTr/, labelsTr/)")
    index = os.path.join(folder, "dataset.json")
    if not os.path.isfile(index):
        raise bad(f"{folder!r} has no dataset.json: expected a Medical Segmentation Decathlon task "
                  f"folder (dataset.json, imagesTr/, labelsTr/)")
    try:
        with open(index) as f:
            meta = json.load(f)
        train = load_decathlon_datalist(index, is_segmentation=True, data_list_key="training", base_dir=folder)
        val = (load_decathlon_datalist(index, is_segmentation=True, data_list_key="validation", base_dir=folder)
               if meta.get("validation") else None)
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no "training" list, entries without image/label
        raise bad(f"{index} is not a Decathlon dataset.json ({type(e).__name__}: {e})") from None
    if val is None:  # the last fifth (at least one case) validates: a fixed split every rank agrees on
        if len(train) < 2:
            raise bad(f"{index} lists {len(train)} training case(s): at least 2 are needed (one validates)")
        train, val = train[:-max(1, len(train) // 5)], train[-max(1, len(train) // 5):]
    shapes = {}
    for case in train + val:
        for key in ("image", "label"):
            path = case[key]
            if not os.path.isfile(path):
                raise bad(f"{index} names {os.path.relpath(path, folder)}, which does not exist")
            try:
                shapes[key] = nib.load(path).shape
            except Exception as e:  # nibabel's ImageFileError, a truncated header, ...
                raise bad(f"{path} is not a NIfTI file nibabel can read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:150]})") from None
        if shapes["image"][:3] != shapes["label"][:3] or len(shapes["label"]) != 3:
            raise bad(f"label {os.path.relpath(case['label'], folder)} has shape {shapes['label']} but its "
                      f"image {os.path.relpath(case['image'], folder)} has {shapes['image']}: "
                      f"they must cover the same voxels")
    in_channels = shapes["image"][3] if len(shapes["image"]) == 4 else 1  # multi-modal tasks are 4-D
    num_classes = max(2, len(meta.get("labels", {})))
    modalities = list((meta.get("modality") or {}).values())
    return train, val, in_channels, num_classes, bool(modalities) and all(m.upper() == "CT" for m in modalities)


def check_dataset_fits(dataset, world_size, batch_size):
    """Every rank gets data, and at least one full step (the loader drops the tail)."""
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} training cases but the world size is {world_size}: "
                          f"some ranks would get no data", every_rank=False)
    if n // world_size // batch_size == 0:
        raise RecipeError(f"the dataset has {n} training cases, too few for one step of {world_size} ranks "
                          f"x batch size {batch_size}: lower --batch-size or use more data", every_rank=False)


# ---------------------------------------------------------------------------------------------------- snapshots


SNAPSHOT, PREVIOUS_SNAPSHOT, BEST_MODEL = "snapshot.pt", "snapshot.prev.pt", "best_model.pt"


def save_snapshot(checkpoint_dir, snapshot):
    """Atomically (temporary file, fsync, rename); the previous snapshot is kept as snapshot.prev.pt, so a snapshot
    damaged later still leaves one to use."""
    atomic_write(os.path.join(checkpoint_dir, SNAPSHOT), lambda f: torch.save(snapshot, f),
                 previous=os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))


def save_best_model(checkpoint_dir, best):
    """best_model.pt: the weights of the best validation Dice so far, beside the snapshots (rank 0)."""
    path = os.path.join(checkpoint_dir, BEST_MODEL)
    atomic_write(path, lambda f: torch.save(best, f))
    toolkit.log(0, f"best model so far (dice {best['dice']:.4f}) saved to {path}")


def exit_preempted(rank, step, checkpoint_dir):
    """After the snapshot (recipe.Trainer.train saves before anything else): say so, exit 75 so the job requeues."""
    saved = "snapshot saved" if checkpoint_dir else "no --checkpoint-dir, nothing saved"
    if rank == 0:
        toolkit.log(0, f"preempted at step {step}: {saved}; exiting with {toolkit.PREEMPTED_EXIT_CODE} "
                       f"so the job script requeues")
    raise SystemExit(toolkit.PREEMPTED_EXIT_CODE)


def find_snapshot(checkpoint_dir):
    """The newest readable snapshot (by its stored step, never by file time), or None when there is none yet.

    A damaged snapshot is named in a warning and the other one is used; if none is readable, that is an error
    (starting from scratch silently would throw the finished work away and then overwrite it).
    """
    if not checkpoint_dir:
        return None
    found, problems = [], []
    for path in (os.path.join(checkpoint_dir, n) for n in (SNAPSHOT, PREVIOUS_SNAPSHOT)):
        if not os.path.exists(path):
            continue
        try:
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        except Exception as e:  # truncated zip, wrong format, unexpected pickled objects, ...
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            print(f"warning: {problems[-1]}; trying the other snapshot", file=sys.stderr, flush=True)
            continue
        found.append((step, path))
    if found:
        return max(found)[1]
    if problems:
        raise RecipeError("no usable snapshot: " + "; ".join(problems) +
                          ". Delete or move the damaged file(s) to start over.")
    return None


def load_snapshot(path, world_size):
    """The snapshot at `path`, to the CPU (load_state_dict copies it to the device), if this world size can resume
    it. Each rank caches its own partition of the training cases (partition_dataset, CONTRACT.md C5's exception),
    and the partitions depend on the world size: under another one, the cases an epoch has already trained on are
    spread over other ranks, and no position in the new partitions skips exactly them. Refused in one line."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if snap["world_size"] != world_size:
        raise RecipeError(f"{path} was written by {snap['world_size']} rank(s), this job has {world_size}: each rank "
                          f"caches a partition of the training cases that depends on the world size, so the run "
                          f"cannot continue after the cases it trained on. Resubmit with {snap['world_size']} "
                          f"rank(s), or start a new --checkpoint-dir", every_rank=False)
    return snap


def rng_state(device):
    """The CPU generator's state and this process's own GPU's (not every visible GPU's: a job requeued with fewer
    GPUs, or one GPU per task, has fewer to restore, and touching the others puts a CUDA context on each)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state, device):
    """From CPU tensors (torch.set_rng_state takes nothing else); the GPU state onto this process's device only."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # written by an older release: every visible GPU's state, in order
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda.cpu(), device)


# ---------------------------------------------------------------------------------------------------- training aids


class EpochSampler(Sampler):
    """This rank's partition (its cached cases, 0..n-1) in a new order every epoch, drawn from (seed, epoch, rank),
    cut to whole batches (the tail dropped: every rank takes the same number of steps).

    The partition is fixed (each rank caches only its own cases): the epochs reshuffle *within* it, never across
    ranks. set_epoch(epoch, skip) starts the epoch `skip` cases in, so a mid-epoch resume takes up the same order
    where the snapshot left it without loading (reading, augmenting) the cases it had already trained on.
    """

    def __init__(self, n, args, rank):
        self.n, self.batch_size, self.seed, self.rank, self.epoch, self.skip = n, args.batch_size, args.seed, rank, 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __len__(self):  # the whole epoch, also when resumed mid-way: len(loader) is the epoch's steps
        return self.n // self.batch_size * self.batch_size

    def __iter__(self):
        order = np.random.default_rng([self.seed % 2**32, self.epoch, self.rank]).permutation(self.n)
        return iter(order[self.skip:len(self)].tolist())


class SeededAugmentation(Dataset):
    """The cached, preprocessed cases with random augmentation drawn from (seed, epoch, case); `ids` are the cases'
    indices in the whole training list (this rank caches its partition only).

    MONAI's random transforms draw from their own numpy generator, which is per process and per DataLoader
    worker: the crops would depend on the number of ranks and workers, and a resumed run would crop differently
    from an uninterrupted one. Seeding them per sample makes a sample's crop the same wherever it is loaded.
    """

    def __init__(self, cached, transform, seed, ids=None):
        self.cached, self.transform, self.seed, self.epoch = cached, transform, seed, 0
        self.ids = list(range(len(cached))) if ids is None else list(ids)

    def set_epoch(self, epoch):
        self.epoch = epoch  # DataLoader workers are started anew every epoch (not persistent) and see this

    def __len__(self):
        return len(self.cached)

    def __getitem__(self, index):
        case = self.ids[index]
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 10_007 + case) % 2**32)
        return self.transform(self.cached[index])  # CacheDataset hands out a copy: the cache stays clean


def mixed_precision(device, enabled):
    """--amp as (autocast, scaler) (CONTRACT.md C10): bf16 autocast where bf16 exists (CPUs, Ampere+ GPUs); fp16 on
    older GPUs, the only case with an enabled GradScaler (a disabled one passes the loss and the step through)."""
    fp16 = enabled and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    if not enabled:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # fp32: matmuls and convolutions in TF32 on Ampere+ (C10)
        return contextlib.nullcontext, scaler
    return (lambda: torch.autocast(device.type, dtype=torch.float16 if fp16 else torch.bfloat16)), scaler


def step_timer(path, device):
    """toolkit.StepTimer for --timings-file (rank 0 passes the path, the others None: no timer). On CUDA it waits
    for the device before each time (only when timing: a sync per step costs throughput)."""
    if not path:
        return None
    return StepTimer(path, sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
