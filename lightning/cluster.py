"""The plumbing of this folder: what the scripts need to run on a cluster, apart from the lesson in recipe.py.

Map:
    parse_args               the command line every recipe accepts (CONTRACT.md C2); `extra` adds a script's own;
                             a process given GPUs it cannot use stops here (CONTRACT.md C12)
    run                      toolkit.run with `explain`: the entry point's wrapper (signals first, one-line errors)
    explain, lost_a_peer     a collective that failed because another rank died: one line and exit 1
    torchrun_layout          (devices, num_nodes) as torchrun started the job, or one line and exit 2
    local_device             this process's GPU: local rank modulo the GPUs it sees (one per task: cuda:0)
    parallel_devices         Lightning's devices for a launcher's processes, the same GPUs as local_device
    init_distributed         the process group, made before Lightning's under --timeout: a failed rendezvous
                             (a busy MASTER_PORT, missing ranks) is one line and exit 2; on the GPU the
                             process's device is set first and NCCL bound to it (device_id)
    rendezvous_store         where the ranks meet; torch 2.13 under torchrun --max-restarts: a key prefix per attempt
    check_dataset_fits       the data gives every rank at least one step, or one line and exit 2
    resume_from              the checkpoint with the most progress (stored global_step), never the newest file
    reduce_max               the ranks' agreement on preemption (for toolkit.PREEMPTION.agreed)
    PreemptionSignals        keeps SIGUSR1/SIGTERM ours while Lightning runs (its SIGTERM handler exits 0)
    Report                   the contract's log lines (CONTRACT.md C3), printed by rank 0; the world size and batch
                             recorded in every checkpoint, a checkpoint of another one refused in one line
    StepTimings              per-step wall-clock times for the benchmarks (--timings-file, toolkit.StepTimer)
    collect_ddp_cycles       frees the DDP wrapper's reference cycles before the process group is destroyed
    allow_tf32, TF32         TF32 matmuls and convolutions for fp32 runs on a GPU (CONTRACT.md C10)
"""

import argparse
import atexit
import functools
import gc
import os
import re
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

import toolkit
from toolkit import (PREEMPTION, OneLineParser, RecipeError, StepTimer, launcher_rank, log, non_negative_int,
                     positive_float, positive_int)


def parse_args(description: str, extra=None) -> argparse.Namespace:
    """The command line shared by every script of every folder (CONTRACT.md C2); extra(parser) adds a script's
    own flags (--nprocs, --devices, --num-nodes).

    No silent CPU (CONTRACT.md C12): a process given GPUs (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES) or asked for
    --backend nccl whose torch cannot use a GPU stops here, with one line and exit 2, before Lightning's
    accelerator="auto" would quietly pick the CPU. --backend gloo trains on the CPU on purpose."""
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many optimizer steps in total (the LR schedule still spans --epochs)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    p.add_argument("--lr", type=positive_float, default=0.05)
    p.add_argument("--data", choices=["synthetic"], default="synthetic",
                   help="only synthetic data in this folder (MNIST/CIFAR-10 need torchvision: see README.md)")
    p.add_argument("--data-dir", type=toolkit.directory, default=None,
                   help="unused: only synthetic data in this folder")
    p.add_argument("--dataset-size", type=positive_int, default=4096, help="number of synthetic samples")
    p.add_argument("--checkpoint-dir", type=toolkit.directory, default=None,
                   help="checkpoints go here and resume from here is automatic (default: none, nothing is saved)")
    p.add_argument("--save-every", type=positive_int, default=1, help="epochs between checkpoints")
    p.add_argument("--save-every-steps", type=positive_int, default=None,
                   help="steps between checkpoints as well, mid-epoch too (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on CPUs and GPUs that do it natively (compute capability >= 8.0), "
                        "else fp16 with loss scaling")
    p.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader worker processes")
    p.add_argument("--backend", choices=["auto", "nccl", "gloo"], default="auto",
                   help="auto: nccl with CUDA, gloo without")
    p.add_argument("--timeout", type=positive_int, default=300,
                   help="seconds before a rendezvous or collective that cannot complete is an error")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between rank-0 progress lines")
    p.add_argument("--timings-file", help="rank 0 writes per-step end times here (JSON) for the benchmarks")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    toolkit.refuse_silent_cpu(args.backend, toolkit.torch_cuda_problem)
    return args


def lost_a_peer(error: RuntimeError) -> str:
    """The gist of a collective that failed because a peer is gone (gloo: "Connection reset/closed by peer";
    NCCL: a DistBackendError), or "" for any other error. One that timed out (a peer alive but silent) is
    toolkit.HANG's, which toolkit.run asks first."""
    text = str(error).strip()
    if not (torch.distributed.is_initialized()
            and (isinstance(error, torch.distributed.DistError) or "gloo/transport" in text)):
        return ""
    text = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else type(error).__name__)  # "[pair.cc:537] "
    return text.split(". This is typically")[0][:200]


def explain(error: Exception):
    """For toolkit.run: a lost peer is not this rank's fault. Another process of the job (or its node) died and
    this rank's next all-reduce failed. The checkpoints on disk are whole (Lightning writes them atomically); a
    requeued or resubmitted run resumes from them. One line and exit 1 instead of a traceback wall."""
    if isinstance(error, RuntimeError) and (gist := lost_a_peer(error)):
        return (f"lost contact with another rank ({gist}): a process or node of the job died; see its log. "
                f"The checkpoints are intact: a requeued or resubmitted run resumes from them"), 1
    return None


run = functools.partial(toolkit.run, explain=explain)


def torchrun_layout() -> tuple[int, int]:
    """(devices, num_nodes) as torchrun started this job: Lightning must agree with the launcher."""
    if not TorchElasticEnvironment.detect():
        raise RecipeError("RANK/LOCAL_WORLD_SIZE not set: start this script with torchrun, e.g. "
                          "`torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py` (or use single_gpu.py)")
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    return per_node, int(os.environ["WORLD_SIZE"]) // per_node


def local_device(local_rank: int) -> torch.device:
    """This process's GPU: its local rank modulo the GPUs it sees. Where every process sees the node's GPUs
    (torchrun; srun with --gpus-per-node, as multinode.sbatch) that is cuda:<local rank>; a process that was
    given only its own GPU (CUDA_VISIBLE_DEVICES set per process) uses cuda:0, its only device, not
    cuda:<local rank>, which does not exist there. (Under srun Lightning itself refuses that layout: README.md.)"""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def parallel_devices(per_node: int) -> list[torch.device] | None:
    """Lightning's parallel_devices for one process per device on each node (DDPStrategy(parallel_devices=...)):
    its root device is parallel_devices[local rank], so this makes it local_device(local rank), the GPU
    init_distributed chose, instead of Lightning's own cuda:<local rank>. None without CUDA (Lightning's CPUs)."""
    return [local_device(i) for i in range(per_node)] if torch.cuda.is_available() else None


def init_distributed(args: argparse.Namespace) -> None:
    """Under srun (multinode.py) or torchrun (multigpu_torchrun.py): create the process group before Lightning does,
    under a deadline of --timeout; Lightning then uses it as it is (its _init_dist_connection skips
    init_process_group when a group exists). Called before pl.Trainer(...): a failed rendezvous is the only line.

    Lightning's own init_process_group waits in C++ where no timeout reaches: with MASTER_PORT held by a program
    that listens but never answers, rank 0 died with a traceback (EADDRINUSE) and the other ranks waited forever
    in TCPStore's connect (README.md, Troubleshooting). Here each way a rendezvous fails is one line and exit 2.
    Ranks, world size, MASTER_ADDR/MASTER_PORT come from the ClusterEnvironment Lightning uses for these launches
    (TorchElasticEnvironment when torchrun started the process, as Lightning checks it first; else multinode.py's
    SLURMEnvironment, which derives the address and port from the job when they are unset); the backend is
    Lightning's choice too (nccl with CUDA, else gloo) unless --backend says otherwise.

    On the GPU the process's device is set first (local_device, the root device parallel_devices gives Lightning)
    and NCCL's communicator is bound to it (device_id=): made at once on the right GPU, not lazily on whichever
    device is current at the first collective (cuda:0 for every rank)."""
    if TorchElasticEnvironment.detect():
        environment = TorchElasticEnvironment()
    elif "SLURM_NTASKS" in os.environ:
        environment = SLURMEnvironment(auto_requeue=False)
    else:
        return  # no launcher: nothing to join
    rank, world_size = environment.global_rank(), environment.world_size()
    addr, port = environment.main_address, environment.main_port  # as Lightning reads (and exports) them
    backend = args.backend if args.backend != "auto" else "nccl" if torch.cuda.is_available() else "gloo"
    timeout = timedelta(seconds=args.timeout)
    what = (f"rendezvous at {addr}:{port} (are all {world_size} ranks started, MASTER_ADDR reachable from every "
            f"node, MASTER_PORT used by nothing else?)")
    try:
        with toolkit.deadline(args.timeout, rank, what):  # a connect to a port that never answers: no timeout
            store = rendezvous_store(addr, port, rank, world_size, timeout)
            if torch.cuda.is_available():
                torch.cuda.set_device(local_device(environment.local_rank()))  # Lightning's root device too
            device = local_device(environment.local_rank()) if backend == "nccl" else None
            torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                                 timeout=timeout, device_id=device)
    except (torch.distributed.DistNetworkError, torch.distributed.DistStoreError) as e:
        hint = ("another process already listens on that port: choose another MASTER_PORT"
                if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower()
                else f"not all {world_size} ranks reached it within --timeout {args.timeout} s")
        raise RecipeError(f"rendezvous at {addr}:{port} failed: {hint} ({str(e).splitlines()[0][:200]})") from None
    if backend == "nccl":  # as Lightning does for a group it creates (torch warns about one left undestroyed)
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


def rendezvous_store(addr: str, port: int, rank: int, world_size: int, timeout: timedelta):
    """The store torch's env:// rendezvous would make: under torchrun the agent hosts it and every worker is a
    client; under srun rank 0 hosts it.

    Under `torchrun --max-restarts` on one node each attempt meets under a key prefix of its own: the agent's store
    still holds the keys the failed attempt wrote, and a restarted worker could read a dead worker's address from
    them (torch 2.13: "Gloo connectFullMesh failed ... Connection refused"). Across nodes the agents count restarts
    differently (only the one whose worker failed counts it): no prefix there, Slurm requeues (README.md,
    Troubleshooting)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return torch.distributed.TCPStore(addr, port, world_size, is_master=rank == 0, timeout=timeout,
                                          multi_tenant=True)
    store = torch.distributed.TCPStore(addr, port, world_size, is_master=False, timeout=timeout)
    if os.environ.get("GROUP_WORLD_SIZE") != "1" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return store
    # WORKAROUND(torch 2.13, pytorch/pytorch#167288): a restarted attempt must not read the dead workers' keys
    return torch.distributed.PrefixStore(f"attempt-{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def check_dataset_fits(dataset, world_size: int, batch_size: int) -> None:
    if len(dataset) // (world_size * batch_size) == 0:
        raise RecipeError(f"--dataset-size {len(dataset)} is too small for one step of {world_size} "
                          f"processes x --batch-size {batch_size}: lower --batch-size or use more data")


def resume_from(checkpoint_dir: str | None) -> str | None:
    """The checkpoint to resume from: the one that holds the most progress (its stored global_step), or None for a
    fresh start.

    Never by file time: a checkpoint written late can hold old progress (e.g. one written by a process with a
    stale copy of the trainer), and copies or restores change mtimes. On a tie the preemption checkpoint wins:
    after it, Lightning ends the stopped epoch early and ModelCheckpoint saves epoch=E-step=S.ckpt as if that
    epoch had run to its end, so resuming from that one would skip the rest of the epoch. An unreadable file is
    skipped with a warning (the next best is used); if none is readable that is an error, not a silent fresh
    start.
    """
    if not checkpoint_dir or not Path(checkpoint_dir).is_dir():
        return None
    best, best_key, problems = None, None, []
    for path in Path(checkpoint_dir).glob("*.ckpt"):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            step = int(ckpt["global_step"])
        except Exception as e:  # truncated, not a checkpoint, ...
            problems.append(f"{path} is unreadable ({type(e).__name__})")
            log(launcher_rank(), f"warning: {problems[-1]}", file=sys.stderr)
            continue
        key = (step, path.name.startswith("preempted-"))
        if best_key is None or key > best_key:
            best, best_key = str(path), key
    if best is None and problems:
        raise RecipeError("no usable checkpoint: " + "; ".join(problems)
                          + ". Delete or move the damaged file(s) to start over.")
    return best


def reduce_max(trainer, device):
    """For PREEMPTION.agreed: a float's maximum over all ranks (inf: a rank got the signal; else the slowest step
    time), by Lightning's all-reduce (every rank enters it; as is with one process)."""
    return lambda value: trainer.strategy.reduce(torch.tensor(float(value), device=device), reduce_op="max").item()


class PreemptionSignals(Callback):
    """SIGUSR1/SIGTERM set toolkit.PREEMPTION's flag (toolkit.run installs its handler before anything else, so a
    signal during start-up does not kill the process). Installed again at fit start, after Lightning's own
    handlers (and in ddp_spawn's workers, new processes), and at train start: Lightning installs its own SIGTERM
    handler after on_fit_start, and that one ends the run at the next batch with exit 0 and no checkpoint
    (README.md). Ours again: SIGTERM is a preemption like SIGUSR1."""

    def on_fit_start(self, trainer, pl_module):
        PREEMPTION.install()

    def on_train_start(self, trainer, pl_module):
        PREEMPTION.install()


class Report(Callback):
    """The contract's log lines (CONTRACT.md C3), printed by rank 0: a progress line every `log_every` steps, one
    line per epoch with the loss and accuracy averaged over all ranks and the samples/s of the whole job, and
    where training starts, resumes and ends.

    Kept instead of self.log_dict(..., sync_dist=True): that computes the same averages but its bookkeeping costs
    about 1 ms every step (4-6 % of this step on CPU, measured: see benchmarks/README.md)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def _print(self, trainer, message):
        if trainer.is_global_zero:
            log(0, message)

    def on_fit_start(self, trainer, pl_module):
        self.fit_start, self.resume_reported, self.saving, self.saved = time.perf_counter(), False, None, None

    def _report_resume(self, trainer):
        if trainer.ckpt_path and not self.resume_reported:
            self.resume_reported = True
            self._print(trainer, f"resumed from {trainer.ckpt_path}: epoch {trainer.current_epoch + 1}, "
                                 f"step {trainer.global_step}")

    def on_train_start(self, trainer, pl_module):
        batches = trainer.num_training_batches
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        self._print(trainer, f"world size {trainer.world_size} | backend {backend} | device "
                             f"{pl_module.device} | {len(trainer.datamodule.train)} samples | batch "
                             f"{self.args.batch_size}/rank | {batches} steps/epoch")
        self._report_resume(trainer)
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer, pl_module):
        self._report_saved(trainer)
        self.epoch_start, self.epoch_first_step = time.perf_counter(), trainer.global_step
        self.sums = torch.zeros(2, device=pl_module.device)  # this rank's loss x samples, correct predictions

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._report_saved(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = len(batch[1])  # on the device, no sync: nothing is read before the epoch ends
        self.sums += torch.stack([outputs["loss"].detach().float() * n, outputs["correct"].float()])
        if trainer.global_step % self.args.log_every == 0:
            # .item() here waits for rank 0's own step only, and only every log_every steps
            self._print(trainer, f"epoch {trainer.current_epoch + 1} | batch {batch_idx + 1}/"
                                 f"{trainer.num_training_batches} | step {trainer.global_step} | "
                                 f"loss {outputs['loss'].item():.4f}")

    def on_train_epoch_end(self, trainer, pl_module):
        self._report_saved(trainer)
        seconds = time.perf_counter() - self.epoch_start
        samples = (trainer.global_step - self.epoch_first_step) * self.args.batch_size * trainer.world_size
        totals = trainer.strategy.reduce(self.sums, reduce_op="sum")  # every rank: one collective per epoch
        if samples:
            loss, acc = (totals / samples).tolist()
            self._print(trainer, f"epoch {trainer.current_epoch + 1}/{self.args.epochs} | step "
                                 f"{trainer.global_step} | loss {loss:.4f} | acc {acc:.4f} | "
                                 f"{samples / seconds:.0f} samples/s | {seconds:.1f} s")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["layout"] = {"world_size": trainer.world_size, "batch_size": self.args.batch_size}
        # Lightning calls this before it writes the file: the line waits for the next hook, when the file is on
        # disk (a crash after it resumes from this step). The epoch's and the steps' callbacks may save one step.
        self.saving = trainer.global_step

    def _report_saved(self, trainer):
        if self.saving is not None and self.saving != self.saved:
            self._print(trainer, f"snapshot saved to {self.args.checkpoint_dir} (step {self.saving})")
        self.saved = self.saving

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        """Before anything trains: a checkpoint of another world size or batch is refused in one line. Lightning
        resumes its step and epoch counters, the scheduler and ResumableLoader's skip as they were, in steps of
        the old layout: under another one the resumed epoch skips or repeats samples and the cosine curve runs
        on past its end. (Checkpoints written before the layout was recorded are not checked.)"""
        old = checkpoint.get("layout")
        if old and (old["world_size"], old["batch_size"]) != (trainer.world_size, self.args.batch_size):
            raise RecipeError(f"{trainer.ckpt_path} was written by {old['world_size']} rank(s) x batch "
                              f"{old['batch_size']}, this job is {trainer.world_size} x {self.args.batch_size}: "
                              f"Lightning resumes its counters in steps of the old layout. Resubmit with "
                              f"{old['world_size']} rank(s) x --batch-size {old['batch_size']}, or start a new "
                              f"--checkpoint-dir", every_rank=False)

    def on_fit_end(self, trainer, pl_module):
        self._report_saved(trainer)
        self._report_resume(trainer)  # a finished run resumed: Lightning trains nothing and skips on_train_start
        self._print(trainer, f"done: {trainer.global_step} steps in {time.perf_counter() - self.fit_start:.1f} s")


class StepTimings(Callback):
    """For the benchmark runner: rank 0 records the wall time right after every optimizer step. start_time is
    taken before the script's heavy imports: the benchmarks count them in the time to first step."""

    def __init__(self, path: str, start_time: float, batch_size: int):
        self.path = path
        self.timer = StepTimer(path, start_time=start_time, batch_size=batch_size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)  # the step's kernels, not just their launch (as pytorch/)
            self.timer()

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.timer.write(world_size=trainer.world_size)


def collect_ddp_cycles() -> None:
    """The DDP wrapper Lightning dropped at teardown sits in reference cycles that hold the gloo process group;
    left to the interpreter's shutdown they can abort a finished run (README.md, Troubleshooting). Freed now,
    before Lightning's atexit hook destroys the process group."""
    gc.collect()


def allow_tf32(device: torch.device, precision: str) -> bool:
    """fp32 runs on a GPU: matmuls and convolutions in TF32 on Ampere+ (inputs rounded to a 10-bit mantissa,
    accumulation in fp32: about twice the matmul speed, CONTRACT.md C10); True when set. Not on the CPU, where
    the "high" matmul setting would reach oneDNN's matmuls too, nor under --amp (autocast does bf16/fp16).

    torch.set_float32_matmul_precision("high"), not torch 2.13's torch.backends.cuda.matmul.fp32_precision: with
    that one alone torch.get_float32_matmul_precision() raises ("mix of the legacy and new APIs"), and Lightning
    calls it when it sets up an Ampere GPU."""
    if device.type != "cuda" or precision != "32-true":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # torch's default; said here
    return True


class TF32(Callback):
    """allow_tf32 on the Trainer's device, in every process that trains (also ddp_spawn's workers, new processes
    that do not inherit the flags)."""

    def setup(self, trainer, pl_module, stage):
        allow_tf32(trainer.strategy.root_device, trainer.precision)
