"""modulus/'s plumbing: what a run on a cluster needs around the lesson in recipe.py -- the command line, the
launchers' variables, the rendezvous, one-line errors, teardown -- and, in one section at the end, every shim
PhysicsNeMo 2.2.2 (and torch, torchvision, Warp) needs: each version workaround is one tagged line there, its story
in README.md's troubleshooting. Nothing here is what the recipes teach.

Map:
    parse_args              the command line every recipe in this repository accepts (CONTRACT.md C2), then no
                            silent CPU (C12: toolkit.refuse_silent_cpu)
    run                     toolkit.run with this folder's cleanup (stop_distributed): the scripts' entry point
    require_torchrun        multigpu_torchrun.py without torchrun's variables: one line, not a silent single process
    require_launcher        multinode.py without torchrun's or srun's variables (or without srun's address): the same
    free_port               a free TCP port for multigpu.py's rendezvous
    join_workers            multigpu.py's parent: forwards SIGUSR1/SIGTERM to its workers, passes their exit code on
    rendezvous              around DistributedManager.initialize(): --timeout, --backend, the device (device_index),
                            a deadline, one-line errors
    reduce_max              the ranks' maximum of a float (PREEMPTION.agreed's reduce_max)
    stop_distributed        process-group teardown in the order that cannot hang at exit (run's cleanup)
    mixed_precision         --amp by CONTRACT.md C10: (autocast, GradScaler), bf16 or fp16 by what the device does
    read_darcy              the Darcy .npz files of --data-dir, checked: a missing or wrong file is one clear line
    check_dataset_fits      a world size or a batch larger than the data is one clear line
  compatibility (every monkeypatch, private field and version workaround of the folder; delete as releases fix them):
    physicsnemo             the PhysicsNeMo package (or nvidia-modulus 0.9), imported on first use, with its import
                            shims (declare_torchvision_operators, without_warp_driver_warning)
    process_group_options   DistributedManager.setup and dist.init_process_group patched for initialize()'s one call:
                            --backend, --timeout, the device (device_index), no CPU device_id, NCCL errors raised,
                            the store of toolkit.attempt_store (a key prefix per restart under one agent)
    device_index            a local rank's GPU among those the process sees (one GPU per task: cuda:0 everywhere)
    require_srun_address    Slurm's rank variables without srun's address: one line, not a TypeError in setup()
    forget_failed_initialization  DistributedManager's private state cleared after a failed rendezvous
    initialization_method   how DistributedManager initialised (a private field), for multinode.py's log line
    free_ddp_models         the DDP models freed before the process group (stop_distributed)
    spectral_layers_in_fp32 the FNO's FFTs in fp32 under --amp (CUDA has no bf16 FFT, fp16 only for powers of two)
"""

import argparse
import contextlib
import functools
import gc
import importlib.util
import os
import signal
import socket
import sys
import tempfile
import traceback
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import darcy
import toolkit
from toolkit import (
    PREEMPTED_EXIT_CODE,
    OneLineParser,
    PreemptionFlag,
    RecipeError,
    deadline,
    launcher_rank,
    non_negative_int,
    positive_float,
    positive_int,
)

# ---------------------------------------------------------------------------------------------------- command line


def parse_args(description, extra=None):
    """The command line every recipe in this repository accepts (same names in every framework folder)."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total, resumed ones included "
                        "(the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--data", choices=["synthetic", "darcy"], default="synthetic",
                   help="synthetic: Darcy samples solved in memory at start-up; darcy: the .npz files in --data-dir "
                        "(write them with `python darcy.py DIR`)")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help=f"holds {darcy.TRAIN_FILE} and {darcy.VAL_FILE} (--data darcy)")
    p.add_argument("--dataset-size", type=positive_int, default=512,
                   help="training samples of synthetic data (plus 1/8 as many for validation)")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="snapshots go here; resume is automatic")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between snapshots")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between snapshots as well, mid-epoch too (default: none)")
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
    # C12: given GPUs (or --backend nccl) that torch cannot use: one line, before DistributedManager or the
    # scripts pick the CPU as the device
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


# ---------------------------------------------------------------------------------------------------- launchers


def require_torchrun(script):
    """Without torchrun's variables DistributedManager would quietly train as one process: say so instead."""
    missing = [n for n in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc_per_node N "
                          f"{os.path.basename(script)}`")


def require_launcher():
    """torchrun's variables, or an srun task's; a clear error otherwise (DistributedManager would quietly train
    as one process, or fail deep inside setup())."""
    if not any(n in os.environ for n in ("RANK", "SLURM_PROCID")):
        raise RecipeError("neither torchrun's RANK nor Slurm's SLURM_PROCID is set: start the script with `srun` "
                          "inside a Slurm job, or with torchrun")
    if "RANK" not in os.environ:
        require_srun_address()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_workers(context):
    """Wait for multigpu.py's workers. Slurm's warning (USR1) or a preemption (TERM) reaches this process: the
    workers decide when to stop, so it passes the signal on. A worker's exit 2 (bad input, the worker printed the
    line) or 75 (preempted after a snapshot) becomes this process's; any other failure is 1."""

    def forward(signum, frame):
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, forward)
    try:
        while not context.join():
            pass
    except mp.ProcessExitedException as e:
        sys.exit(e.exit_code if e.exit_code in (2, PREEMPTED_EXIT_CODE) else 1)


# -------------------------------------------------------------------------------------- rendezvous and teardown


@contextlib.contextmanager
def rendezvous(args):
    """Around DistributedManager.initialize(): process_group_options (in the compatibility section), a deadline (a
    rank that connected to a port some other program listens on waits forever, in C++), and a failed rendezvous as
    one line that says what to change."""
    addr = os.environ.get("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "localhost"))
    where = f"{addr}:{os.environ.get('MASTER_PORT', '12355')}"
    what = f"rendezvous at {where} (are all ranks started, the address reachable, the port used by nothing else?)"
    try:
        with process_group_options(args), deadline(args.timeout, launcher_rank(), what):
            yield
    except (dist.DistNetworkError, dist.DistStoreError) as e:
        forget_failed_initialization()  # else DistributedManager's atexit cleanup buries this error under its own
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not every rank reached it within --timeout {args.timeout}s")
        raise RecipeError(f"rendezvous at {where} failed: {hint} ({str(e).splitlines()[0][:200]})") from None


def reduce_max(value, device):
    """The largest `value` (a float) over all ranks (one all_reduce MAX): if any rank got the signal (inf), every
    rank stops after the same step -- the ones still training would otherwise wait for the others' gradients
    forever; else all get the slowest rank's seconds per step, PREEMPTION.agreed's next check."""
    largest = torch.tensor(float(value), device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest.item()


def stop_distributed():
    """Destroy the process group, if there is one, after the DDP model that uses it is gone (see README.md's
    troubleshooting: a finished run that hangs at exit)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    free_ddp_models()
    physicsnemo().distributed.DistributedManager.cleanup()


run = functools.partial(toolkit.run, explain=toolkit.lost_peer, cleanup=stop_distributed)


# ---------------------------------------------------------------------------------------------------- training


def mixed_precision(device, enabled):
    """(autocast, scaler) for --amp: bf16 autocast where bf16 exists (CPUs, Ampere+ GPUs), fp16 with an enabled
    GradScaler on older GPUs. Without fp16 the scaler is disabled: scale(), step() and update() pass through."""
    fp16 = enabled and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0)
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    if not enabled:
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # fp32: matmuls and convolutions in TF32 on Ampere+ (C10)
        return contextlib.nullcontext, scaler
    dtype = torch.float16 if fp16 else torch.bfloat16
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


# ---------------------------------------------------------------------------------------------------- data checks


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


def read_darcy(data_dir):
    """(train, val) (coeff, sol) arrays from data_dir's two .npz files, on the same grid."""
    if not os.path.isdir(data_dir):
        raise RecipeError(f"--data-dir {data_dir} does not exist: write the Darcy data with "
                          f"`python darcy.py {data_dir}`")
    train = read_split(os.path.join(data_dir, darcy.TRAIN_FILE))
    val = read_split(os.path.join(data_dir, darcy.VAL_FILE))
    if train[0].shape[1:] != val[0].shape[1:]:
        raise RecipeError(f"{data_dir}: training grid {train[0].shape[1:]} differs from validation grid "
                          f"{val[0].shape[1:]}")
    return train, val


def check_dataset_fits(dataset, world_size, batch_size):
    n = len(dataset)
    if n < world_size:
        raise RecipeError(f"the dataset has {n} samples but the world size is {world_size}: "
                          f"some ranks would get no data")
    if n // world_size // batch_size == 0:
        raise RecipeError(f"the dataset has {n} samples, too few for one step of {world_size} ranks x "
                          f"batch size {batch_size}: lower --batch-size or use more data")


# ------------------ compatibility: every shim and version workaround, one tagged line each (stories: README.md)


@contextlib.contextmanager
def without_warp_driver_warning():
    """Drop the one line NVIDIA Warp prints from C at import on a machine without a CUDA driver; everything else
    written meanwhile is kept (stderr of a failed run carries nothing but its error line)."""
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
    """If, and only if, torchvision's compiled library does not load (its CUDA build next to CPU torch), declare
    its operators' schemas without kernels, so that `import torchvision` (physicsnemo -> timm -> torchvision.ops)
    succeeds; calling one would still fail loudly, and the FNO uses none. Where the library loads, nothing."""
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
    # WORKAROUND(torchvision 0.28.0, pytorch/vision#8985): declare its operators where its CUDA build cannot load
    declare_torchvision_operators()
    try:
        # WORKAROUND(warp-lang 1.19.0, no upstream issue): drop the "no CUDA driver" line Warp prints on CPU
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


def device_index(local_rank):
    """The GPU a process with this local rank uses: its local rank among the devices it sees. Every GPU of the node
    visible (--gpus-per-node): cuda:<local rank>; one per task (--gpus-per-task=1): cuda:0 on every rank."""
    return local_rank % torch.cuda.device_count()


@contextlib.contextmanager
def process_group_options(args):
    """What DistributedManager.initialize() cannot be told, passed to the one setup() and init_process_group call
    it makes (backend, rank=, world_size=, device_id=): for the duration of that call only."""
    real, manager = dist.init_process_group, physicsnemo().distributed.DistributedManager
    real_setup = manager.setup

    def setup(rank=0, world_size=1, local_rank=None, **kwargs):
        if local_rank is not None and torch.cuda.is_available():
            # WORKAROUND(physicsnemo 2.2.2, NVIDIA/physicsnemo#115): a device this task sees, not cuda:<local rank>
            local_rank = device_index(local_rank)
        return real_setup(rank=rank, world_size=world_size, local_rank=local_rank, **kwargs)

    def init_process_group(backend=None, **kwargs):
        if args.backend != "auto":
            backend = args.backend  # --backend; DistributedManager picks nccl with CUDA, else gloo
        # WORKAROUND(physicsnemo 2.2.2, NVIDIA/physicsnemo#1968): pass --timeout, which initialize() cannot take
        kwargs.setdefault("timeout", timedelta(seconds=args.timeout))
        device_id = kwargs.get("device_id")
        if device_id is not None and torch.device(device_id).type == "cpu":
            # WORKAROUND(physicsnemo 2.2.2, NVIDIA/physicsnemo#1936): drop a CPU device_id, which torch >= 2.9 rejects
            del kwargs["device_id"]
        # WORKAROUND(physicsnemo 2.2.2, no upstream issue): undo initialize()'s TORCH_NCCL_ASYNC_ERROR_HANDLING=0
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
        store = toolkit.attempt_store(kwargs.get("world_size", -1), args.timeout)  # None: env:// as initialize() meant
        return real(backend, **kwargs) if store is None else real(backend, store=store, **kwargs)

    dist.init_process_group, manager.setup = init_process_group, staticmethod(setup)
    try:
        yield
    finally:
        dist.init_process_group, manager.setup = real, staticmethod(real_setup)


def require_srun_address():
    """An srun task's variables without srun's address (`python multinode.py` in the batch shell): one line."""
    # WORKAROUND(physicsnemo 2.2.2, NVIDIA/physicsnemo#819): without srun's address, say so instead of a TypeError
    needed = ("SLURM_PROCID", "SLURM_NPROCS", "SLURM_LOCALID", "SLURM_LAUNCH_NODE_IPADDR")
    missing = [n for n in needed if n not in os.environ]
    if missing:
        raise RecipeError(f"{', '.join(missing)} not set: DistributedManager reads the rank from Slurm and the "
                          f"rendezvous address from SLURM_LAUNCH_NODE_IPADDR, which only srun sets -- start the "
                          f"script with `srun` inside the job (or with torchrun)")


def forget_failed_initialization():
    """After a failed rendezvous: DistributedManager's state back to uninitialised, so that its atexit cleanup does
    not raise `Process group cannot be None` over the first error."""
    # WORKAROUND(physicsnemo 2.2.2, NVIDIA/physicsnemo#1936): forget the failed setup, or atexit buries the error
    physicsnemo().distributed.DistributedManager._shared_state = {}


def initialization_method(manager):
    """How DistributedManager initialised (ENV, SLURM, OPENMPI), for the log: it keeps that in a private field."""
    # WORKAROUND(physicsnemo 2.2.2, no upstream issue): no public accessor; str(manager) says it among other things
    return getattr(manager, "_initialization_method", "?")


def free_ddp_models():
    """Before the process group is destroyed: free the DDP models that use it (stop_distributed)."""
    # WORKAROUND(torch 2.13, pytorch/pytorch#56297): free the DDP model first, or gloo's destructor can deadlock
    traceback.clear_frames(sys.exc_info()[2])  # an exception in flight (exit 75) still holds the model; None: none
    gc.collect()


def spectral_layers_in_fp32(model):
    """The FNO's spectral convolutions in fp32 under --amp, their FFTs included. CPU autocast casts FFTs to fp32 by
    itself; CUDA autocast does not: bf16 has no cuFFT kernel and fp16 needs power-of-two grids (the padded one is
    40), so the first step would fail. The pointwise layers around them still run in bf16/fp16. Returns the model."""
    for layer in model.modules():
        if type(layer).__name__.startswith("SpectralConv"):  # SpectralConv1d ... 4d (physicsnemo.nn.module)
            # WORKAROUND(torch 2.13, pytorch/pytorch#139313): no bf16 FFT on CUDA; fp16 only for powers of two
            layer.forward = functools.partial(_fp32_forward, layer.forward)
    return model


def _fp32_forward(forward, x):
    with torch.autocast(x.device.type, enabled=False):
        return forward(x.float())
