"""What every monai/ recipe shares: the command line, the Decathlon data, the 3-D UNet, training, validation
and snapshots.

The scripts only decide *how the processes are started* (one process, mp.spawn, torchrun, srun) and hand a
`Ranks` description to `fit()`, so that `diff single_gpu.py multigpu_torchrun.py` shows exactly what going
multi-process changes.

Note: this file is `common.py`, not `monai.py`: a script named monai.py here would shadow the monai package.
"""

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset, load_decathlon_datalist
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.transforms import (
    AsDiscrete,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
SNAPSHOT = "snapshot.pt"
PREVIOUS_SNAPSHOT = "snapshot.prev.pt"
BEST_MODEL = "best_model.pt"
SPACING = (1.5, 1.5, 1.5)  # EDIT: voxel size (mm) every volume is resampled to; 1.5 mm suits abdominal CT
SYNTHETIC_SEED = 1234  # the synthetic dataset is the same for every run and every rank
KEYS = ("image", "label")
STOP_CHECK_EVERY = 5  # steps between the ranks' agreement on whether a preemption signal arrived


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback."""


class InputError(RecipeError):
    """Bad input that every rank finds alike (the data directory, the sizes): only rank 0 reports it, so a
    job prints one line, not one per rank."""


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


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


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2 (CONTRACT.md C4), not a usage block: with 512 ranks each
    printing the usage, the actual complaint is lost."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="crops per process and step (real 3-D volumes need 2-4 per GPU)")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--data", choices=["synthetic", "decathlon"], default="synthetic",
                   help="decathlon: a Medical Segmentation Decathlon task folder (dataset.json, imagesTr/, "
                        "labelsTr/); synthetic: such a folder written first, so the same loader runs")
    p.add_argument("--data-dir", default=None,
                   help="the task folder (--data decathlon), or where synthetic data is written "
                        "(default: the system's temporary directory, per node)")
    p.add_argument("--dataset-size", type=positive_int, default=64,
                   help="training cases of synthetic data (plus a quarter as many for validation)")
    p.add_argument("--roi-size", type=roi_size, default=32,
                   help="edge of the random training crops and of the sliding window (voxels, multiple of 4)")
    p.add_argument("--cache-rate", type=fraction, default=1.0,
                   help="fraction of the preprocessed training volumes each rank keeps in memory")
    p.add_argument("--checkpoint-dir", default=None, help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
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
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def env_rank():
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))


class PreemptionFlag:
    """Remembers that Slurm asked us to stop (SIGUSR1 before the time limit, SIGTERM on preemption); the
    training loop acts on it at a step boundary, where all ranks agree to stop at the same step. Saving inside
    the handler would interrupt a collective half-way."""

    requested = False

    def install(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


PREEMPTION = PreemptionFlag()


def leave_process_group():
    """Free the DDP model, then destroy the process group -- in that order, or a finished run can hang or abort
    at exit. DDP's C++ Reducer holds the process group. Freed last (by the interpreter's shutdown, or by DDP's
    reference cycles collected after the destroy), gloo's destructor runs with the GIL held and joins its
    threads, while one of them may wait for the GIL to free the tensors of the last collective: a deadlock
    (seen with one CPU core per torchrun step in Slurm). destroy_process_group() drops the last reference
    without holding the GIL."""
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model
    gc.collect()  # DDP's reference cycles
    dist.destroy_process_group()


def run(main, *args, rank=None):
    """Call main(*args); turn a RecipeError into one clear line and exit 2 instead of a traceback wall.

    The preemption handlers go in first: a signal during start-up (rendezvous, data caching) must not kill the
    process before it can save anything.
    """
    PREEMPTION.install()
    try:
        main(*args)
    except RecipeError as e:
        rank = env_rank() if rank is None else rank
        if not isinstance(e, InputError) or str(rank) == "0":
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


def launch_env(how):
    """(rank, local_rank, world_size) from RANK, LOCAL_RANK, WORLD_SIZE (set by torchrun, or by multinode.py from
    srun's variables); a clear error saying `how` to launch when they are missing."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: {how}")
    return (int(os.environ[n]) for n in names)


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


def init_distributed(args, rank, world_size, device, store=None):
    """init_process_group with --timeout on the rendezvous and on every later collective, and the ways a
    rendezvous fails turned into one line that says what to check."""
    backend = pick_backend(args.backend)
    addr = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    what = (f"rendezvous at {addr} (are all {world_size} ranks started, MASTER_ADDR reachable from every node, "
            f"MASTER_PORT used by nothing else?)")
    try:
        with deadline(args.timeout, rank, what):
            dist.init_process_group(backend, store=store, rank=rank if store else -1,
                                    world_size=world_size if store else -1,
                                    timeout=timedelta(seconds=args.timeout),
                                    device_id=device if backend == "nccl" else None)
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {args.timeout}s")
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

    def any(self, flag):
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def from_rank0(self, value):
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------------------------------------------- data


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
    affine = np.diag([*SPACING, 1.0])
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

    Returns (training cases, validation cases, in_channels, num_classes). The validation cases are dataset.json's
    "validation" list where it has one, else the last fifth of "training" (the Decathlon's own files list only
    "training"). Only NIfTI headers are read here, not the voxels.
    """
    if not os.path.isdir(folder):
        raise InputError(f"data directory {folder!r} does not exist")
    if not os.listdir(folder):
        raise InputError(f"data directory {folder!r} is empty: expected a Medical Segmentation Decathlon task "
                         f"folder (dataset.json, imagesTr/, labelsTr/)")
    index = os.path.join(folder, "dataset.json")
    if not os.path.isfile(index):
        raise InputError(f"{folder!r} has no dataset.json: expected a Medical Segmentation Decathlon task "
                         f"folder (dataset.json, imagesTr/, labelsTr/)")
    try:
        with open(index) as f:
            meta = json.load(f)
        train = load_decathlon_datalist(index, is_segmentation=True, data_list_key="training", base_dir=folder)
        val = (load_decathlon_datalist(index, is_segmentation=True, data_list_key="validation", base_dir=folder)
               if meta.get("validation") else None)
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no "training" list, entries without image/label
        raise InputError(f"{index} is not a Decathlon dataset.json ({type(e).__name__}: {e})") from None
    if val is None:  # the last fifth (at least one case) validates: a fixed split every rank agrees on
        if len(train) < 2:
            raise InputError(f"{index} lists {len(train)} training case(s): at least 2 are needed (one validates)")
        train, val = train[:-max(1, len(train) // 5)], train[-max(1, len(train) // 5):]
    shapes = {}
    for case in train + val:
        for key in KEYS:
            path = case[key]
            if not os.path.isfile(path):
                raise InputError(f"{index} names {os.path.relpath(path, folder)}, which does not exist")
            try:
                shapes[key] = nib.load(path).shape
            except Exception as e:  # nibabel's ImageFileError, a truncated header, ...
                raise InputError(f"{path} is not a NIfTI file nibabel can read ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:150]})") from None
        if shapes["image"][:3] != shapes["label"][:3] or len(shapes["label"]) != 3:
            raise InputError(f"label {os.path.relpath(case['label'], folder)} has shape {shapes['label']} but its "
                             f"image {os.path.relpath(case['image'], folder)} has {shapes['image']}: "
                             f"they must cover the same voxels")
    in_channels = shapes["image"][3] if len(shapes["image"]) == 4 else 1  # multi-modal tasks are 4-D
    num_classes = max(2, len(meta.get("labels", {})))
    return train, val, in_channels, num_classes


def preprocessing():
    """Deterministic transforms, cached once per case: read, channel first, orientation, spacing, intensity."""
    return Compose([
        LoadImaged(KEYS, reader="NibabelReader", image_only=True),
        EnsureChannelFirstd(KEYS),
        Orientationd(KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(KEYS, pixdim=SPACING, mode=("bilinear", "nearest")),
        NormalizeIntensityd("image", nonzero=False, channel_wise=True),
        EnsureTyped(KEYS, track_meta=False),
    ])


def augmentation(roi):
    """Random transforms, drawn anew for every sample: pad to the crop size, random crop, flip, intensity."""
    return Compose([
        SpatialPadd(KEYS, spatial_size=(roi,) * 3),
        RandSpatialCropd(KEYS, roi_size=(roi,) * 3, random_size=False),
        RandFlipd(KEYS, prob=0.5, spatial_axis=0),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
    ])


class SeededAugmentation(Dataset):
    """The cached, preprocessed cases with random augmentation drawn from (seed, epoch, case).

    MONAI's random transforms draw from their own numpy generator, which is per process and per DataLoader
    worker: the crops would depend on the number of ranks and workers, and a resumed run would crop differently
    from an uninterrupted one. Seeding them per sample makes a sample's crop the same wherever it is loaded.
    """

    def __init__(self, cached, roi, seed):
        self.cached, self.transform, self.seed, self.epoch = cached, augmentation(roi), seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch  # DataLoader workers are started anew every epoch (not persistent) and see this

    def __len__(self):
        return len(self.cached)

    def __getitem__(self, index):
        self.transform.set_random_state(seed=(self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**32)
        return self.transform(self.cached[index])  # CacheDataset hands out a copy: the cache stays clean


def ignore_preemption_signals(worker_id):
    """DataLoader workers leave SIGUSR1/SIGTERM to the training process (Slurm signals every process of a
    step): a worker killed by it would crash the training process instead of letting it snapshot."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_sizes(n_train, world_size, batch_size):
    if n_train < world_size:
        raise InputError(f"the dataset has {n_train} training cases but the world size is {world_size}: "
                         f"some ranks would get no data")
    if n_train // world_size // batch_size == 0:
        raise InputError(f"the dataset has {n_train} training cases, too few for one step of {world_size} ranks "
                         f"x batch size {batch_size}: lower --batch-size or use more data")


@dataclass
class Data:
    train_loader: DataLoader
    val_cases: list  # this rank's share of the validation cases (preprocessed)
    in_channels: int
    num_classes: int
    n_train: int
    n_val: int


def build_data(args, ranks):
    """Every rank caches the preprocessed training set and reads its shard of it through DistributedSampler:
    a new global shuffle every epoch from (seed, epoch), the tail dropped (see README: memory vs. shuffle)."""
    train_cases, val_cases, in_channels, num_classes = read_task(prepare_data(args, ranks))
    check_sizes(len(train_cases), ranks.world_size, args.batch_size)
    cached = CacheDataset(train_cases, preprocessing(), cache_rate=args.cache_rate, progress=False)
    train = SeededAugmentation(cached, args.roi_size, args.seed)
    # A DistributedSampler also for one process (num_replicas=1): the same permutation as the sum of the
    # ranks' shards, which is what makes 2 ranks x batch B train exactly like 1 process x batch 2B.
    sampler = DistributedSampler(train, num_replicas=ranks.world_size, rank=ranks.rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True, pin_memory=torch.cuda.is_available(),
                        worker_init_fn=ignore_preemption_signals)
    # Validation: whole volumes, each rank its own cases (rank, rank + world, ...); Dice summed over ranks.
    mine = CacheDataset(val_cases[ranks.rank::ranks.world_size], preprocessing(), progress=False)
    return Data(loader, [mine[i] for i in range(len(mine))], in_channels, num_classes, len(train_cases),
                len(val_cases))


# ---------------------------------------------------------------------------------------------------- model


def build_model(data):
    """A small 3-D UNet (MONAI's, residual units, instance norm: no running statistics to keep in sync).

    No biases: instance norm cancels a bias, so its gradient is zero plus rounding noise, and Adam (which
    divides by the gradient's size) would turn that noise into full-size steps that differ between runs.
    """
    return UNet(spatial_dims=3, in_channels=data.in_channels, out_channels=data.num_classes,
                channels=(8, 16, 32), strides=(2, 2), num_res_units=1, bias=False)


def autocast_and_scaler(device, enabled):
    """bf16 autocast where bf16 exists (CPUs, Ampere+ GPUs); fp16 + GradScaler on older GPUs."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


def dice_totals(net, cases, args, device, num_classes, autocast):
    """(sum of per-case, per-class Dice, number of those values) over `cases`, background excluded.

    Sums, not a mean, so that ranks can add theirs with one all_reduce: the mean over all ranks then equals
    DiceMetric's mean over the union of the shards in one process. Not DiceMetric.aggregate() here: under DDP
    it all-gathers, and a rank without validation cases (more ranks than cases) never joins -- the others hang.
    A class absent from both prediction and label gives NaN and is left out, as DiceMetric's mean does.
    """
    to_pred, to_label = AsDiscrete(argmax=True, to_onehot=num_classes), AsDiscrete(to_onehot=num_classes)
    total, count = 0.0, 0.0
    net.eval()
    with torch.no_grad(), autocast():
        for case in cases:
            image = case["image"].unsqueeze(0).to(device)
            logits = sliding_window_inference(image, (args.roi_size,) * 3, sw_batch_size=4, predictor=net,
                                              overlap=0.25)
            pred = to_pred(logits[0].float()).unsqueeze(0)
            label = to_label(case["label"].to(device)).unsqueeze(0)
            dice = compute_dice(pred, label, include_background=False)  # shape (1, classes - 1)
            valid = ~torch.isnan(dice)
            total += dice[valid].double().sum().item()
            count += valid.sum().item()
    net.train()
    return total, count


# ---------------------------------------------------------------------------------------------------- snapshots


def capture_rng():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj, path):
    """Temporary file, fsync, rename: a crash mid-write leaves the last good file in place, never half a file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_snapshot(checkpoint_dir, snapshot):
    """The previous snapshot is kept as snapshot.prev.pt: a snapshot damaged later still leaves one to use."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, SNAPSHOT)
    atomic_save(snapshot, final + ".new")
    if os.path.exists(final):
        os.replace(final, os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))
    os.replace(final + ".new", final)


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


# ---------------------------------------------------------------------------------------------------- training


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file, rank 0). Off by default."""

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


class Trainer:
    """The training loop every script runs; `model` is the bare UNet or its DDP wrapper."""

    def __init__(self, args, ranks, data, model):
        self.args, self.ranks, self.data, self.model = args, ranks, data, model
        self.net = getattr(model, "module", model)  # the UNet itself: saved, loaded, used for validation
        self.loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        steps_per_epoch = len(data.train_loader)
        # The schedule spans --epochs; --max-steps only stops early, so a run cut short (by it, a crash or
        # preemption) and then resumed follows exactly the same learning-rate curve as an uninterrupted one.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=args.epochs * steps_per_epoch)
        self.autocast, self.scaler = autocast_and_scaler(ranks.device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.best_dice, self.preempted = -1.0, False
        self.timer = StepTimer(args.timings_file if ranks.rank == 0 else None, ranks.device)

    def log0(self, message):
        if self.ranks.rank == 0:
            log(0, message)

    def training_left(self):
        return self.epoch < self.args.epochs and not (self.args.max_steps and self.step >= self.args.max_steps)

    def train_step(self, batch):
        device = self.ranks.device
        image, label = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with self.autocast():
            logits = self.model(image)
        loss = self.loss_fn(logits.float(), label)  # the Dice ratio in fp32: bf16 has 3 significant digits
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()  # under DDP the gradients are averaged across ranks here
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()  # under DDP the gradients are averaged across ranks here
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def train_epoch(self):
        """One pass over this rank's shard; returns (summed loss, samples)."""
        loader, skip = self.data.train_loader, self.batch_in_epoch
        loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats the same order
        loader.dataset.set_epoch(self.epoch)  # new random crops every epoch
        self.batch_in_epoch = 0
        loss_sum, seen = torch.zeros((), device=self.ranks.device), 0
        for i, batch in enumerate(loader):
            if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
                continue
            loss = self.train_step(batch)
            self.step, self.batch_in_epoch = self.step + 1, i + 1
            self.timer.step()
            loss_sum += loss * len(batch["image"])
            seen += len(batch["image"])
            if self.step % self.args.log_every == 0:
                self.log0(f"epoch {self.epoch + 1} | batch {i + 1}/{len(loader)} | step {self.step} | "
                          f"loss {loss.item():.4f}")
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
            # Every rank must stop at the same step: they agree with a tiny all_reduce every STOP_CHECK_EVERY
            # steps (each one costs a collective; a signal 90 s before the limit can wait a few steps).
            if self.step % STOP_CHECK_EVERY == 0 and self.ranks.any(PREEMPTION.requested):
                self.preempted = True
                break
        return loss_sum.item(), seen

    def validate(self):
        """Mean Dice over all validation cases: each rank scores its own, the sums are added up."""
        dice_sum, count = dice_totals(self.net, self.data.val_cases, self.args, self.ranks.device,
                                      self.data.num_classes, self.autocast)
        dice_sum, count = self.ranks.sum([dice_sum, count])
        return dice_sum / count if count else float("nan")

    def snapshot(self):
        snap = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.ranks.world_size,
                "best_dice": self.best_dice, "rng": capture_rng()}
        if self.scaler is not None:
            snap["scaler"] = self.scaler.state_dict()
        return snap

    def resume(self):
        # Rank 0 decides which snapshot to use and tells the others: on a shared filesystem ranks can disagree
        # about whether a file exists, and a job where only some ranks resume deadlocks.
        path = self.ranks.from_rank0(find_snapshot(self.args.checkpoint_dir) if self.ranks.rank == 0 else None)
        if path is None:
            return
        snap = torch.load(path, map_location=self.ranks.device, weights_only=True)  # a snapshot is data only
        self.net.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        restore_rng(snap["rng"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        self.best_dice = snap["best_dice"]
        self.log0(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")

    def save(self, dice):
        """Rank 0 writes (every rank holds the same weights); the others wait until the files are complete."""
        ckpt = self.args.checkpoint_dir
        if self.ranks.rank == 0:
            if dice > self.best_dice:  # the best model by validation Dice, kept apart from the snapshots
                os.makedirs(ckpt, exist_ok=True)
                atomic_save({"model": self.net.state_dict(), "dice": dice, "step": self.step},
                            os.path.join(ckpt, BEST_MODEL))
                log(0, f"best model so far (dice {dice:.4f}) saved to {os.path.join(ckpt, BEST_MODEL)}")
            self.best_dice = max(self.best_dice, dice)
            save_snapshot(ckpt, self.snapshot())
            log(0, f"snapshot saved to {ckpt} (step {self.step})")
        self.best_dice = self.ranks.from_rank0(self.best_dice)
        self.ranks.barrier()  # nobody reads or restarts before the files are complete

    def fit(self):
        args, data = self.args, self.data
        self.resume()
        self.log0(f"world size {self.ranks.world_size} | device {self.ranks.device} | {data.n_train} training + "
                  f"{data.n_val} validation cases | batch {args.batch_size}/rank | "
                  f"{len(data.train_loader)} steps/epoch")
        start = time.perf_counter()
        while self.training_left():
            epoch_start = time.perf_counter()
            loss_sum, seen = self.train_epoch()
            loss_all, seen_all = self.ranks.sum([loss_sum, seen])  # metrics over all ranks, not rank 0's
            elapsed = time.perf_counter() - epoch_start
            dice = self.validate()
            if seen_all:
                self.log0(f"epoch {self.epoch + 1}/{args.epochs} | step {self.step} | "
                          f"loss {loss_all / seen_all:.4f} | dice {dice:.4f} | "
                          f"{seen_all / elapsed:.0f} samples/s | {elapsed:.1f} s")
                self.log0(f"validation dice {dice:.8f} over {data.n_val} cases")
            if self.batch_in_epoch == len(data.train_loader):  # the epoch ran to its end
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            finished = not self.training_left()
            if args.checkpoint_dir and (finished or self.preempted or self.epoch % args.save_every == 0):
                self.save(dice)
            if self.preempted:
                saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                self.log0(f"preempted at step {self.step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} "
                          f"so the job script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        self.timer.write(world_size=self.ranks.world_size, batch_size=args.batch_size)
        self.log0(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")


def fit(args, ranks, wrap=lambda model: model):
    """Data, model, training. `wrap` turns the model into what the launch pattern needs (DDP, or as is)."""
    torch.manual_seed(args.seed)  # same seed on every rank: identical initial weights
    data = build_data(args, ranks)
    model = wrap(build_model(data).to(ranks.device))
    Trainer(args, ranks, data, model).fit()
