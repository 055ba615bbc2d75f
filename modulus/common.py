"""What every modulus/ recipe shares: the command line, PhysicsNeMo's DistributedManager, the Darcy data, the FNO,
the training loop and the snapshot file.

The scripts keep only what differs between launch patterns (who starts the processes and how each learns its
rank), so that `diff single_gpu.py multigpu_torchrun.py` shows exactly what going multi-process changes.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import darcy

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75
SNAPSHOT = "snapshot.pt"
PREVIOUS_SNAPSHOT = "snapshot.prev.pt"
MODEL_FILE = "fno.mdlus"  # the trained model in PhysicsNeMo's own format (physicsnemo.Module.from_checkpoint)


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


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """One line on stderr and exit 2, like every other bad input (argparse would add its usage block)."""
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--data", choices=["synthetic", "darcy"], default="synthetic",
                   help="synthetic: Darcy samples solved in memory at start-up; darcy: the .npz files in --data-dir "
                        "(write them with `python darcy.py DIR`)")
    p.add_argument("--data-dir", default=None, help=f"holds {darcy.TRAIN_FILE} and {darcy.VAL_FILE} (--data darcy)")
    p.add_argument("--dataset-size", type=positive_int, default=512,
                   help="training samples of synthetic data (plus 1/8 as many for validation)")
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
        p.error(f"--data {args.data} needs --data-dir (the directory that holds {darcy.TRAIN_FILE} and "
                f"{darcy.VAL_FILE})")
    return args


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def run(main, *args, rank=None):
    """Call main(*args); turn a RecipeError into one clear line and exit 2 instead of a traceback wall."""
    try:
        main(*args)
    except RecipeError as e:
        if rank is None:
            rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        log(rank, f"error: {e}", file=sys.stderr)
        sys.exit(2)


class Preemption:
    """Remembers that Slurm asked us to stop (SIGUSR1 before the time limit, SIGTERM on preemption); the training
    loop acts on it at a step boundary. Installed first thing in main(): a signal during the ~10 s of imports
    and start-up must not kill the process without a snapshot."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def agreed(self, device, distributed):
        """Whether every rank stops after this step. All ranks must stop at the same step, or the ones still
        training wait for the others' gradients forever: they agree with an all_reduce(MAX) of one number after
        every step (microseconds next to an FNO step)."""
        if not distributed:
            return self.requested
        flag = torch.tensor(float(self.requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def ignore_stop_signals(worker_id):
    """DataLoader worker_init_fn: Slurm signals every process of a step; the main process decides when to stop,
    and a worker that died of SIGTERM would take the whole loader down with it."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


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


# ---------------------------------------------------------------------------------------------------- PhysicsNeMo


@contextlib.contextmanager
def without_warp_driver_warning():
    """Drop the one line NVIDIA Warp (a PhysicsNeMo dependency) prints from C on every machine without a CUDA
    driver, "Warp CUDA warning: Could not find or load the NVIDIA CUDA driver ...": on CPU it is expected, and
    stderr must carry nothing but the error line when a run fails. Everything else written meanwhile is kept."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not line.startswith("Warp CUDA warning: Could not find or load the NVIDIA CUDA driver"):
                    sys.stderr.write(line)
            sys.stderr.flush()


# The C++ operators torchvision declares (torchvision/_meta_registrations.py registers fake kernels for each).
_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                 "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward": "(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
                           "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
                           "int sampling_ratio, bool aligned) -> Tensor",
    "ps_roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                              "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
                              "SymInt channels, SymInt height, SymInt width) -> Tensor",
    "roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                "-> (Tensor, Tensor)",
    "_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
                          "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) "
                          "-> Tensor",
    "ps_roi_pool": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
                   "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward": "(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
                             "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
                             "SymInt height, SymInt width) -> Tensor",
    "qroi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
                  "int sampling_ratio, bool aligned) -> Tensor",
    "deform_conv2d": "(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
                     "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
                     "SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward": "(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
                               "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
                               "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
                               "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}
_torchvision_library = None  # keeps the declarations alive


def declare_torchvision_operators():
    """Compatibility for CPU machines that got the CUDA build of torchvision (delete when the environment has a
    torchvision built for its torch).

    physicsnemo imports timm and timm imports torchvision.ops at start-up; `import torchvision` registers fake
    kernels for its C++ operators and dies with "operator torchvision::nms does not exist" when its compiled
    library cannot load -- the CUDA wheel next to CPU torch, the only torchvision 0.28.0 some CPU machines (this
    repository's CI among them) can install. The FNO uses none of those operators. If, and only if, the library
    does not load, this declares their schemas without kernels (calling one would still fail loudly), and the
    import succeeds. Wherever torchvision's library loads (GPU clusters, CPU wheels) it does nothing.
    """
    global _torchvision_library
    spec = importlib.util.find_spec("torchvision")  # finds it without importing it
    if spec is None or spec.origin is None or "torchvision" in sys.modules or _torchvision_library is not None:
        return
    try:
        torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), "_C.so"))
        return  # torchvision's own operators load: nothing to do
    except OSError:
        pass
    _torchvision_library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _TORCHVISION_SCHEMAS.items():
        try:
            torch._C._get_schema(f"torchvision::{name}", "")
        except RuntimeError:  # not declared yet (by anyone else doing the same, e.g. a test harness)
            _torchvision_library.define(name + schema)


def physicsnemo():
    """The PhysicsNeMo package: `nvidia-physicsnemo`, or `nvidia-modulus` <= 0.9 (its name until 2025), whose
    modules have the same paths under `modulus.`. Imported on first use, after the signal handlers are set."""
    declare_torchvision_operators()
    try:
        with without_warp_driver_warning():
            import physicsnemo as pnm
            from physicsnemo.distributed import DistributedManager  # noqa: F401  (submodules the recipes use)
            from physicsnemo.models.fno import FNO  # noqa: F401
    except ModuleNotFoundError as e:
        if not e.name or not e.name.startswith("physicsnemo"):
            raise RecipeError(f"cannot import PhysicsNeMo: {e}") from None
        try:
            import modulus as pnm  # nvidia-modulus 0.9: the same API under its old name
            from modulus.distributed import DistributedManager  # noqa: F401
            from modulus.models.fno import FNO  # noqa: F401
        except ImportError:
            raise RecipeError("neither physicsnemo nor modulus is installed: "
                              "pip install -r requirements.txt (nvidia-physicsnemo)") from None
    except RuntimeError as e:
        # physicsnemo imports timm, timm imports torchvision, and a torchvision built for another torch (e.g.
        # the CUDA wheel next to CPU torch) fails here with "operator torchvision::nms does not exist".
        raise RecipeError(f"importing PhysicsNeMo failed in torchvision ({str(e).splitlines()[0][:120]}): install "
                          f"the torchvision build that matches torch {torch.__version__}") from None
    return pnm


@contextlib.contextmanager
def process_group_options(args):
    """What DistributedManager.setup() cannot be told, passed to the init_process_group call it makes.

    DistributedManager.initialize() reads ranks and address from the environment, then calls
    dist.init_process_group(backend, rank=, world_size=, device_id=manager.device) with no timeout and a backend
    of its own choosing. For the duration of that call only, this wrapper:
      * adds `timeout=--timeout`: a rendezvous or collective that cannot complete becomes an error, not a hang;
      * applies `--backend` when it is not `auto`;
      * turns NCCL's asynchronous error handling back on: initialize() sets TORCH_NCCL_ASYNC_ERROR_HANDLING=0,
        with which a timed-out NCCL collective never raises and a job with a dead rank hangs until its time limit;
      * CPU compatibility shim for NVIDIA/physicsnemo#1936 (fix proposed in PR #1938): setup() passes
        device_id=torch.device("cpu"), which torch >= 2.9 rejects ("device_id parameter must be an accelerator
        with an index"). A CPU device_id is dropped; a CUDA one is passed through unchanged, so on GPUs the shim
        does nothing. Delete this branch once a PhysicsNeMo release with the fix is pinned.
    """
    real = dist.init_process_group

    def init_process_group(backend=None, **kwargs):
        if args.backend != "auto":
            backend = args.backend
        kwargs.setdefault("timeout", timedelta(seconds=args.timeout))
        device_id = kwargs.get("device_id")
        if device_id is not None and torch.device(device_id).type == "cpu":
            del kwargs["device_id"]  # the #1936 shim
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        return real(backend, **kwargs)

    dist.init_process_group = init_process_group
    try:
        yield
    finally:
        dist.init_process_group = real


def slurm_launch_check():
    """DistributedManager falls back to Slurm's variables when torchrun's are missing, and then takes the address
    from SLURM_LAUNCH_NODE_IPADDR, which only `srun` sets (NVIDIA/physicsnemo#819): `python train.py` run directly
    in a batch script has SLURM_PROCID but no address and fails with a TypeError deep in setup()."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    needed = ("SLURM_PROCID", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_LAUNCH_NODE_IPADDR")
    missing = [n for n in needed if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: DistributedManager reads the rank from Slurm and the "
                          f"rendezvous address from SLURM_LAUNCH_NODE_IPADDR, which only srun sets -- start the "
                          f"script with `srun` inside the job (or with torchrun)")


def start_distributed(args, rank_hint="?"):
    """PhysicsNeMo's DistributedManager: torchrun's variables, else Slurm's, else OpenMPI's (or the method named
    in PHYSICSNEMO_DISTRIBUTED_INITIALIZATION_METHOD). Returns the manager: rank, world_size, local_rank, device."""
    slurm_launch_check()
    DistributedManager = physicsnemo().distributed.DistributedManager
    addr = os.environ.get("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "localhost"))
    where = f"{addr}:{os.environ.get('MASTER_PORT', '12355')}"
    what = f"rendezvous at {where} (are all ranks started, the address reachable, the port used by nothing else?)"
    try:
        with process_group_options(args), deadline(args.timeout, rank_hint, what):
            DistributedManager.initialize()
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        # A failed setup() leaves the manager marked as distributed, and its atexit cleanup() then fails on the
        # missing process group with a traceback that hides the real error (NVIDIA/physicsnemo#1936, item 3).
        DistributedManager._shared_state = {}
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not every rank reached it within --timeout {args.timeout}s")
        raise RecipeError(f"rendezvous at {where} failed: {hint} ({str(e).splitlines()[0][:200]})") from None
    manager = DistributedManager()
    if not manager.distributed or manager.world_size < 1:
        raise RecipeError("DistributedManager found no launcher (torchrun, srun or mpirun variables)")
    return manager


def stop_distributed():
    """Destroy the process group after the DDP model that uses it is gone -- in that order, or a finished run
    can hang at exit. DDP's C++ Reducer holds the process group; if the Reducer is freed last, gloo's destructor
    runs with the GIL held and joins its worker threads, while one of them waits for the GIL to free the tensors
    of the last collective: a deadlock (seen under CPU binding to one core, e.g. torchrun in a Slurm step with
    --cpus-per-task=1, about one run in two). destroy_process_group() drops the last reference without the GIL.
    So: let the frames of an exception in flight (a preemption's exit 75) release the model, collect DDP's
    reference cycles, then destroy."""
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model; None: none
    gc.collect()
    physicsnemo().distributed.DistributedManager.cleanup()


# ---------------------------------------------------------------------------------------------------- data


def normalize(coeff, sol):
    """(coeff, sol) arrays -> (input, target) tensors (n, 1, R, R), scaled by the Darcy dataset's statistics."""
    x = (torch.from_numpy(coeff) - darcy.COEFF_MEAN) / darcy.COEFF_STD
    y = (torch.from_numpy(sol) - darcy.SOL_MEAN) / darcy.SOL_STD
    return TensorDataset(x.unsqueeze(1), y.unsqueeze(1))


def read_split(path):
    """One .npz split, checked: a wrong file is one clear line here, not a shape error deep inside the FNO."""
    if not os.path.isfile(path):
        raise RecipeError(f"{path} not found: write the Darcy data with `python darcy.py {os.path.dirname(path)}`")
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("coeff", "sol") if k in f.files}
            keys = f.files
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path} is not a readable .npz file ({str(e).splitlines()[0][:120]})") from None
    if len(arrays) < 2:
        raise RecipeError(f"{path} holds {keys}; a Darcy file holds 'coeff' and 'sol'")
    coeff, sol = arrays["coeff"], arrays["sol"]
    if coeff.ndim != 3 or coeff.shape != sol.shape or coeff.shape[1] != coeff.shape[2] or coeff.shape[1] < 4:
        raise RecipeError(f"{path}: coeff {coeff.shape} and sol {sol.shape} must both be (samples, R, R) with the "
                          f"same square grid")
    if not (np.isfinite(coeff).all() and np.isfinite(sol).all()):
        raise RecipeError(f"{path} contains NaN or infinite values")
    return coeff.astype(np.float32), sol.astype(np.float32)


def build_datasets(args):
    """(train, validation) datasets; every rank builds the same ones (the sampler picks each rank's shard)."""
    if args.data == "synthetic":
        # Solved in memory from fixed seeds: every rank and every run gets identical samples, no files needed.
        train = darcy.generate(args.dataset_size, 32, seed=1234)
        val = darcy.generate(max(8, args.dataset_size // 8), 32, seed=4321)
        return normalize(*train), normalize(*val)
    if not os.path.isdir(args.data_dir):
        raise RecipeError(f"--data-dir {args.data_dir} does not exist: write the Darcy data with "
                          f"`python darcy.py {args.data_dir}`")
    train = read_split(os.path.join(args.data_dir, darcy.TRAIN_FILE))
    val = read_split(os.path.join(args.data_dir, darcy.VAL_FILE))
    if train[0].shape[1:] != val[0].shape[1:]:
        raise RecipeError(f"{args.data_dir}: training grid {train[0].shape[1:]} differs from validation grid "
                          f"{val[0].shape[1:]}")
    return normalize(*train), normalize(*val)


def check_dataset_fits(dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // world_size // batch_size == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


def build_loader(dataset, args, rank, world_size):
    """Each rank reads a disjoint 1/world_size of the data (the tail that does not divide evenly is dropped);
    set_epoch() reshuffles it every epoch from (seed, epoch). With one process it is the whole dataset, in the
    same order a 2-rank run interleaves -- which is what lets the tests compare them."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=True,
                      persistent_workers=args.num_workers > 0,
                      worker_init_fn=ignore_stop_signals if args.num_workers else None)


# ---------------------------------------------------------------------------------------------------- model


def build_model():
    """PhysicsNeMo's Fourier Neural Operator, small enough for a CPU smoke test (~264k parameters)."""
    FNO = physicsnemo().models.fno.FNO
    return FNO(in_channels=1, out_channels=1, dimension=2, latent_channels=16, num_fno_layers=4, num_fno_modes=8,
               padding=8, decoder_layers=1, decoder_layer_size=32)


def relative_l2(pred, target):
    """Per-sample ||u_pred - u|| / ||u|| on the physical (de-normalised) pressure: the Darcy benchmark's metric."""
    pred = pred.float() * darcy.SOL_STD + darcy.SOL_MEAN
    target = target.float() * darcy.SOL_STD + darcy.SOL_MEAN
    return (pred - target).flatten(1).norm(dim=1) / target.flatten(1).norm(dim=1)


def autocast_and_scaler(device, enabled):
    """bf16 autocast where bf16 exists (CPUs, Ampere+ GPUs); fp16 + GradScaler on older GPUs."""
    if not enabled:
        return contextlib.nullcontext, None
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), None


# ---------------------------------------------------------------------------------------------------- snapshots


def save_snapshot(checkpoint_dir, snapshot):
    """Write atomically (temporary file, fsync, rename): a crash mid-write leaves the last good snapshot in place.
    The previous one is kept as snapshot.prev.pt, for when the newest is damaged later."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    final = os.path.join(checkpoint_dir, SNAPSHOT)
    tmp = final + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(snapshot, f)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        os.replace(final, os.path.join(checkpoint_dir, PREVIOUS_SNAPSHOT))
    os.replace(tmp, final)


def find_snapshot(checkpoint_dir):
    """The readable snapshot with the most steps in checkpoint_dir, or None when there is none yet.

    Chosen by the progress stored inside, never by file time. A damaged file is named in a warning and skipped;
    if none is readable that is an error (starting over silently would overwrite the finished work).
    """
    if not checkpoint_dir:
        return None
    best, problems = None, []
    for path in (os.path.join(checkpoint_dir, n) for n in (SNAPSHOT, PREVIOUS_SNAPSHOT)):
        if not os.path.exists(path):
            continue
        try:
            # weights_only: a snapshot is data; unpickling objects from a shared filesystem is not safe.
            # mmap: a truncated file fails here (its zip index is at the end) without reading all the weights.
            step = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        except Exception as e:  # truncated zip, wrong format, unexpected pickled objects, missing key ...
            problems.append(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
            print(f"warning: {problems[-1]}; trying the other snapshot", file=sys.stderr, flush=True)
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None and problems:
        raise RecipeError("no usable snapshot: " + "; ".join(problems) +
                          ". Delete or move the damaged file(s) to start over.")
    return best and best[1]


# ---------------------------------------------------------------------------------------------------- training


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


class Trainer:
    """Train the FNO on this rank's shard: Adam with a cosine schedule over --epochs, MSE on normalised
    pressure, validation relative L2 reduced over all ranks, snapshots, automatic resume and preemption.

    `model` is the FNO, wrapped in DistributedDataParallel when world_size > 1 (gradients are then averaged
    across ranks inside backward()); everything else is the same for 1 and N processes.
    """

    def __init__(self, model, datasets, args, rank, world_size, device, preemption):
        self.model, self.args, self.rank, self.world_size, self.device = model, args, rank, world_size, device
        self.preemption = preemption
        train, self.val = datasets
        self.loader = build_loader(train, args, rank, world_size)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        # The schedule spans --epochs: --max-steps only stops early, so a run cut short (by it, a crash or a
        # preemption) and then resumed follows exactly the same learning-rate curve as an uninterrupted one.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                                    T_max=args.epochs * len(self.loader))
        self.autocast, self.scaler = autocast_and_scaler(device, args.amp)
        self.epoch = self.step = self.batch_in_epoch = 0
        self.timer = StepTimer(args.timings_file if rank == 0 else None, device)

    @property
    def module(self):
        return getattr(self.model, "module", self.model)  # the FNO itself, with or without DDP around it

    def log(self, message):
        if self.rank == 0:
            log(0, message)

    def all_reduce(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor

    # -------------------------------------------------------------------------------------- snapshots

    def snapshot(self):
        snap = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "step": self.step,
                "batch_in_epoch": self.batch_in_epoch, "world_size": self.world_size,
                "rng": {"torch": torch.get_rng_state()}}
        if self.scaler is not None:
            snap["scaler"] = self.scaler.state_dict()
        return snap

    def save(self):
        if self.rank == 0:  # every rank holds the same weights; one writer avoids a race on the file
            save_snapshot(self.args.checkpoint_dir, self.snapshot())
            log(0, f"snapshot saved to {self.args.checkpoint_dir} (step {self.step})")
        if self.world_size > 1:
            dist.barrier()  # nobody reads or restarts before the file is complete

    def resume(self):
        # Rank 0 decides which snapshot to use and tells the others: on a shared filesystem ranks can disagree
        # about whether a file exists, and a job where only some ranks resume deadlocks.
        choice = [find_snapshot(self.args.checkpoint_dir) if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        path = choice[0]
        if path is None:
            return
        snap = torch.load(path, map_location=self.device, weights_only=True)  # each rank onto its own device
        self.module.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.scaler is not None and "scaler" in snap:
            self.scaler.load_state_dict(snap["scaler"])
        torch.set_rng_state(snap["rng"]["torch"])
        self.epoch, self.step, self.batch_in_epoch = snap["epoch"], snap["step"], snap["batch_in_epoch"]
        if snap["world_size"] != self.world_size and self.batch_in_epoch:
            # Batches of another world size do not line up with ours: redo this epoch from its start.
            self.log(f"warning: snapshot from {snap['world_size']} ranks, now {self.world_size}: epoch "
                     f"{self.epoch + 1} restarts from its first batch")
            self.batch_in_epoch = 0
        self.log(f"resumed from {path}: epoch {self.epoch + 1}, step {self.step}")

    # -------------------------------------------------------------------------------------- training

    def training_left(self):
        args = self.args
        return self.epoch < args.epochs and not (args.max_steps and self.step >= args.max_steps)

    def train_step(self, x, y):
        with self.autocast():
            loss = torch.nn.functional.mse_loss(self.model(x).float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()  # with DDP: gradients are averaged across ranks here
            self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def train_epoch(self):
        """One pass over this rank's shard (from batch_in_epoch on, after a resume). Returns (loss sum, samples,
        preempted). Totals stay on the device: `.item()` every step would stall a GPU each time."""
        self.model.train()
        self.loader.sampler.set_epoch(self.epoch)  # forget this and every epoch repeats
        skip, self.batch_in_epoch = self.batch_in_epoch, 0
        loss_sum, seen = torch.zeros((), device=self.device), 0
        for i, (x, y) in enumerate(self.loader):
            if i < skip:  # resuming mid-epoch: these batches were trained on before the snapshot
                continue
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = self.train_step(x, y)
            self.step += 1
            self.batch_in_epoch = i + 1
            self.timer.step()
            loss_sum += loss * len(y)
            seen += len(y)
            if self.step % self.args.log_every == 0:
                self.log(f"epoch {self.epoch + 1} | batch {i + 1}/{len(self.loader)} | step {self.step} | "
                         f"loss {loss.item():.4f}")
            if self.preemption.agreed(self.device, self.world_size > 1):
                return loss_sum, seen, True
            if self.args.max_steps and self.step >= self.args.max_steps:
                break
        return loss_sum, seen, False

    @torch.no_grad()
    def validate(self):
        """Mean relative L2 error over the whole validation set: each rank takes every world_size-th sample,
        and one all_reduce sums the errors and counts."""
        self.model.eval()
        x, y = self.val[self.rank::self.world_size]
        errors = torch.zeros(2, device=self.device)
        for start in range(0, len(x), self.args.batch_size):
            xb = x[start:start + self.args.batch_size].to(self.device)
            yb = y[start:start + self.args.batch_size].to(self.device)
            with self.autocast():
                errors[0] += relative_l2(self.module(xb), yb).sum()  # the module: DDP needs no sync in eval
            errors[1] += len(xb)
        total, count = self.all_reduce(errors).tolist()
        return total / max(count, 1)

    def fit(self):
        self.resume()
        start = time.perf_counter()
        while self.training_left():
            epoch_start = time.perf_counter()
            loss_sum, seen, preempted = self.train_epoch()
            totals = self.all_reduce(torch.stack([loss_sum, torch.tensor(float(seen), device=self.device)]))
            elapsed = time.perf_counter() - epoch_start
            loss_all, seen_all = totals.tolist()
            if seen_all and not preempted:
                rel_l2 = self.validate()
                self.log(f"epoch {self.epoch + 1}/{self.args.epochs} | step {self.step} | "
                         f"loss {loss_all / seen_all:.4f} | rel_l2 {rel_l2:.4f} | "
                         f"{seen_all / elapsed:.0f} samples/s | {elapsed:.1f} s")
            if self.batch_in_epoch == len(self.loader):  # the epoch ran to its end (not cut short)
                self.epoch += 1
                self.batch_in_epoch = 0
            finished = not self.training_left()
            if self.args.checkpoint_dir and (finished or preempted or self.epoch % self.args.save_every == 0):
                self.save()
            if preempted and not finished:
                saved = "snapshot saved" if self.args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                self.log(f"preempted at step {self.step}: {saved}; exiting with {PREEMPTED_EXIT_CODE} so the job "
                         f"script requeues")
                raise SystemExit(PREEMPTED_EXIT_CODE)
        self.timer.write(world_size=self.world_size, batch_size=self.args.batch_size)
        if self.rank == 0 and self.args.checkpoint_dir:
            # The trained model in PhysicsNeMo's own format: physicsnemo.Module.from_checkpoint(path) rebuilds
            # the FNO with its constructor arguments, no recipe code needed (inference, fine-tuning).
            self.module.save(os.path.join(self.args.checkpoint_dir, MODEL_FILE))
        self.log(f"done: {self.step} steps in {time.perf_counter() - start:.1f} s")
