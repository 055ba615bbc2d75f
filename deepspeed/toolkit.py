"""The plumbing every framework folder carries identically (CONTRACT.md C1): this file is byte-for-byte the same in
pytorch/, lightning/, monai/, modulus/, nemo/, ray/, deepspeed/ and jax/ (tests/test_contract.py checks), so a fix
made in one folder fails the test until it reaches all of them. Standard library only: jax/ has no torch
(torch_cuda_problem imports torch when called, and only the torch folders call it).

Map:
    PREEMPTED_EXIT_CODE, RecipeError      exit 75 after a snapshot; bad input as one line and exit 2 (C4)
    positive_int, positive_float,
    non_negative_int, directory,
    OneLineParser                         the command line's validators (C2); a parse error is one line
    log                                   every line starts with its rank (C3)
    launcher_rank                         this process's rank from the launcher's variables (before the framework's)
    run                                   the entry point's wrapper: signals first, one-line errors, cleanup
    lost_peer                             run's explain for the torch folders: a peer that died is one line
    attempt_store                         torch 2.13, torchrun --max-restarts on one node: a key prefix per restart
    deadline                              a block that must finish in time, or one line and exit 2
    gpus_given, refuse_silent_cpu,
    torch_cuda_problem                    no silent CPU: a job given GPUs that cannot use them stops (C12)
    PreemptionFlag, PREEMPTION            SIGUSR1/SIGTERM remembered; the ranks agree on a step to stop at (C7)
    ignore_preemption_signals             DataLoader workers leave the signals to their parent (C7)
    atomic_write                          temporary file, fsync, rename; the previous file kept (C6)
    snapshot_due                          --save-every epochs or --save-every-steps steps: is a snapshot due now (C6)
    samples_done, adapt_to_another_shape  a snapshot of another world size or batch: resumed after the same samples
                                          or one line (C6; the torch folders' cosine schedule continued)
    StepTimer                             per-step wall-clock times for the benchmarks (--timings-file)
    HangReport/HANG, timed_out            a collective past --timeout: stacks and trace on disk, one line naming
                                          who did not arrive, exit 1 (run calls it before explain)
"""

import argparse
import contextlib
import faulthandler
import json
import math
import os
import pickle
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback

# Seconds a rank > 0 waits before leaving with an error that only rank 0 prints (RecipeError(every_rank=False)):
# every rank finds it alike, and under srun --kill-on-bad-exit the first task to exit ends the others -- a rank 1
# that left first killed rank 0 before its line was out (seen in a local-cluster job: exit 2, no line).
QUIET_RANKS_WAIT_S = 5

# Exit status of a run that stopped early because the scheduler asked it to (SIGUSR1/SIGTERM) after saving
# a snapshot. 75 is EX_TEMPFAIL from sysexits.h: "try again later". Job scripts requeue on it.
PREEMPTED_EXIT_CODE = 75


class RecipeError(Exception):
    """A problem with the launch, the input or the files, reported as one clear line instead of a traceback.

    every_rank=False: only rank 0 prints it (an error every rank finds alike, e.g. a bad dataset shape); the
    others wait QUIET_RANKS_WAIT_S before they exit, so that under srun rank 0's line gets out first."""

    def __init__(self, message, *, every_rank=True):
        super().__init__(message)
        self.every_rank = every_rank


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):  # nan, inf and 1e999 (= inf) are no learning rate
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def directory(text):
    """A directory, or a path where one can be made (--checkpoint-dir, --data-dir): not an existing file, nor a
    path below one -- both would end in a traceback when the first snapshot is written or the data is read."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a directory, got an empty path")
    existing = text
    while existing and not os.path.lexists(existing):
        existing = os.path.dirname(existing.rstrip("/"))
    if existing and not os.path.isdir(existing):
        what = "is a file" if existing == text else f"is below {existing}, which is a file"
        raise argparse.ArgumentTypeError(f"must be a directory, but {text} {what}")
    return text


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit 2 (CONTRACT.md C4), not a usage block: with 512 ranks each
    printing the usage, the actual complaint is lost."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        HANG.remember(getattr(parsed, "checkpoint_dir", None), getattr(parsed, "timeout", None))
        return parsed, rest


def log(rank, message, *, file=sys.stdout):
    """Every line says which rank wrote it: with 512 processes writing to one job log, that is the only way to
    tell them apart."""
    print(f"[rank{rank}] {message}", file=file, flush=True)


def launcher_rank():
    """This process's rank as the launcher set it, for lines printed before the framework knows it."""
    for name in ("RANK", "JAX_PROCESS_ID", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def run(main, *args, rank=None, explain=None, cleanup=None, hard_exit=False):
    """Call main(*args) the way every script's entry point needs it:

    - SIGUSR1/SIGTERM are caught from the first line on (a signal during start-up must not kill the process
      before it can save anything; the training loop acts on it at a step boundary);
    - a RecipeError becomes one clear line and exit 2 instead of a traceback wall;
    - explain(error) may turn any other exception into (one line, exit code) -- a lost peer, say -- or None;
    - cleanup() runs on the way out (the process group destroyed), so the scripts need no try/finally;
    - hard_exit: leave with os._exit after an error or a preemption, where the framework's own shutdown would
      wait for peers that are gone (JAX's shutdown barrier).
    """
    PREEMPTION.install()
    rank = launcher_rank() if rank is None else rank
    code = None
    try:
        main(*args)
    except RecipeError as e:
        if e.every_rank or rank == 0:
            log(rank, f"error: {e}", file=sys.stderr)
        else:  # srun --kill-on-bad-exit ends the step at the first task's exit: let rank 0 say it first
            time.sleep(QUIET_RANKS_WAIT_S)
        code = 2
    except SystemExit as e:
        if e.code == PREEMPTED_EXIT_CODE:
            PREEMPTION.saved()
        if not (hard_exit and e.code == PREEMPTED_EXIT_CODE):
            raise
        code = PREEMPTED_EXIT_CODE
    except Exception as e:
        verdict = HANG.report(e) or (explain(e) if explain else None)
        if verdict is None:
            raise
        line, code = verdict
        log(rank, f"error: {line}", file=sys.stderr)
    finally:
        if cleanup is not None:
            cleanup()
    if code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        if hard_exit:
            os._exit(code)
        sys.exit(code)


def lost_peer(error):
    """run's `explain` for the torch folders: a collective that failed because a peer is gone (gloo: "Connection
    reset/closed by peer"; NCCL: a DistBackendError) is not this rank's fault -- one line and exit 1 (the other
    rank's log says why; the last snapshot is intact: torchrun's --max-restarts, a requeue or a resubmission resumes
    from it). None for anything else: a bug, with its traceback. A collective that timed out (a peer alive but
    silent) never gets here: run asks HANG first."""
    import torch.distributed as dist  # only the torch folders pass it (jax/ has no torch)

    text = str(error).strip()
    if not (isinstance(error, RuntimeError) and dist.is_initialized()
            and (isinstance(error, dist.DistError) or "gloo/transport" in text)):
        return None
    gist = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0] if text else type(error).__name__)  # "[pair.cc:537] "
    gist = gist.split(". This is typically")[0][:200]
    if not gist:
        return None
    return (f"lost contact with another rank ({gist}): a process or node of the job died; see its log. "
            f"The last snapshot is intact: a restarted, requeued or resubmitted run resumes from it"), 1


def attempt_store(world_size, timeout):
    """Under `torchrun --max-restarts` on one node (one agent): the agent's store under a key prefix of this
    attempt, to pass to init_process_group; else None. The agent's store outlives its workers, and after a restart
    it still holds the keys the failed attempt wrote -- gloo's addresses among them: a restarted worker that read a
    dead worker's address failed in connectFullMesh ("Connection refused") or waited for it until its deadline
    (found by the fault soak). Across nodes the agents count restarts differently (only the one whose worker failed
    counts it): no common prefix there, env:// as before, and Slurm requeues."""
    env = os.environ
    if (env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1"
            or "TORCHELASTIC_RESTART_COUNT" not in env):
        return None
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timedelta(seconds=timeout))
    # WORKAROUND(torch 2.13, pytorch/pytorch#167288): a restarted attempt must not read the dead workers' keys
    return dist.PrefixStore(f"attempt-{env['TORCHELASTIC_RESTART_COUNT']}", store)


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



def gpus_given(environ=None):
    """What says this process was given GPUs, as NAME=value ('' when nothing does): the GPUs Slurm gave the job on
    this node, or CUDA_VISIBLE_DEVICES naming devices (not "", "-1" or Slurm's "NoDevFiles")."""
    env = os.environ if environ is None else environ
    count = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if count.isdigit() and int(count) > 0:
        return f"SLURM_GPUS_ON_NODE={count}"
    visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in ("", "-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    return ""


def refuse_silent_cpu(backend, problem, environ=None):
    """No silent CPU (CONTRACT C12): when the job was given GPUs (gpus_given) or asked for --backend nccl, and
    problem() -- '' when the GPUs are usable, else why not -- names a reason, stop with one line instead of
    training on the CPU. --backend gloo asked for explicitly trains on the CPU (the local cluster's fake GPUs)."""
    if backend == "gloo":
        return
    given = "--backend nccl" if backend == "nccl" else gpus_given(environ)
    if not given:
        return
    why = problem()
    if why:
        raise RecipeError(f"{given}, but {why}; stopping rather than training on the CPU "
                          f"(--backend gloo trains on the CPU on purpose)")


def torch_cuda_problem():
    """refuse_silent_cpu's problem() for the torch folders: '' when torch sees a CUDA device, else the cause: a
    CPU-only build of torch, or what torch said about the driver (too old for the wheel, not loaded, no device)."""
    import warnings

    import torch
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
                f"(https://pytorch.org/get-started/locally/)")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()
    if usable:
        return ""
    reason = " ".join(str(said[0].message).split()) if said else "no CUDA device is visible to this process"
    return f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use a GPU: {reason}"

class PreemptionFlag:
    """Remembers that Slurm asked us to stop (SIGUSR1 before the time limit, SIGTERM on preemption or scancel);
    the training loop acts on it at a step boundary.

    Saving inside the signal handler would interrupt a collective half-way; instead the ranks check at step
    boundaries they all pick alike and agree on the same step to stop at: `reduce_max` is the framework's maximum
    over the ranks (an all_reduce MAX of a float, inf included; None with one rank). At a check each rank sends inf
    when the signal came to it, else its seconds per step since its previous check, so the maximum says both
    things: inf -> every rank stops; a number -> the slowest rank's step time, from which every rank derives the
    same next interval: as many steps as fit in BUDGET_S, at most CHECK_EVERY, at least 1. The first check is at
    the process's second step boundary, the first with a step time to send, and only measures (a signal before it
    is agreed on at the next check: with fast steps the stop stays at a multiple of CHECK_EVERY); a new run in the
    same process -- the step went back -- starts over.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
    CHECK_EVERY = 10  # at most 10 steps apart: a tiny all-reduce every 10 fast steps costs nothing next to them
    # At most ~30 s of steps between checks: Slurm's warning comes 90 s before the kill (--signal=USR1@90), and a
    # signal that just missed a check waits up to BUDGET_S for the next one; the other 60 s are the save's.
    # (10 LLM steps of 5-60 s each outlast the warning: nothing was saved.)
    BUDGET_S = 30
    clock = staticmethod(time.monotonic)  # the seconds steps are measured in (tests give a fake one)

    def __init__(self):
        self.requested = False
        self.step = None  # the step the loop last reached: agreed() is called at every step boundary
        self.interval = None  # steps between checks, agreed at the last check (None: none yet)
        self.since = None  # (step, clock) of the last check, or of the first step boundary

    def install(self):
        for sig in self.SIGNALS:
            signal.signal(sig, self._handler)
        shield_the_resource_tracker()

    def _handler(self, signum, frame):
        self.requested = True

    def saved(self):
        """Saved, leaving with 75: from here on USR1/TERM are ignored. Another rank's 75 makes srun
        --kill-on-bad-exit send TERM to this one, and while the interpreter shuts down Python has put the default
        action (death) back: srun would then report 143, not 75, and the job script would not requeue.

        And the job script is told, in a file: behind torchrun's or DeepSpeed's launcher, which exits 1 after a
        signal, it cannot tell a preempted step from a crash where Slurm signalled the step alone (preemption with
        GraceTime), not the batch shell. The templates' preemption block reads and removes the file."""
        for sig in self.SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        where, job = os.environ.get("SLURM_SUBMIT_DIR"), os.environ.get("SLURM_JOB_ID")
        if where and job:  # under sbatch (SLURM_SUBMIT_DIR: the job script's folder, where its block looks)
            with contextlib.suppress(OSError):
                open(os.path.join(where, f".preempted-{job}"), "a").close()

    def agreed(self, step, reduce_max=None):
        """True when the ranks agree to stop after `step` (every rank calls it at every step boundary)."""
        first = self.step is None or step < self.step
        self.step = step
        HANG.stepped()
        now = self.clock()
        if first:
            self.since, self.interval = (step, now), None
            return False
        if self.interval and step % self.interval:
            return False
        measuring = self.interval is None  # the first check only measures: a signal counts from the next one
        seconds = (now - self.since[1]) / max(1, step - self.since[0])
        mine = math.inf if self.requested and not measuring else seconds
        slowest = reduce_max(mine) if reduce_max else mine
        if slowest == math.inf:
            return True
        self.since = step, now
        fit = int(self.BUDGET_S // slowest) if slowest > 0 else self.CHECK_EVERY
        self.interval = max(1, min(self.CHECK_EVERY, fit))
        return False


PREEMPTION = PreemptionFlag()


def shield_the_resource_tracker():
    """Slurm signals every process of a step. multiprocessing's resource tracker (the helper process that spawn
    launchers and spawn-context queues start) ignores SIGINT and SIGTERM but dies of SIGUSR1, and is then relaunched
    with a warning, KeyError tracebacks and leaked semaphores (seen: lightning/multigpu.sbatch preempted under the
    local Slurm). Whenever multiprocessing starts it, it now starts with SIGUSR1 blocked -- the mask survives exec,
    so it never acts on one; a USR1 sent to this process meanwhile stays pending and is delivered when unblocked.
    Nothing is started here: a process that spawns nothing gets no tracker."""
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    start = tracker.ensure_running
    if getattr(start, "shielded", False):
        return

    def ensure_running():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:
            start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})

    ensure_running.shielded = True
    # WORKAROUND(python 3.11, multiprocessing/resource_tracker.py _IGNORED_SIGNALS): the tracker shields only INT/TERM
    tracker.ensure_running = resource_tracker.ensure_running = ensure_running


def ignore_preemption_signals(worker_id=None):
    """A DataLoader worker's worker_init_fn: Slurm signals every process of the step, the workers too; killed by
    it, a worker takes its parent down before the snapshot is saved. The parent decides."""
    for sig in PreemptionFlag.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def atomic_write(path, write, previous=None):
    """write(f) into path as one step: a crash mid-write leaves the last good file in place, never half a file.

    The bytes go to path.tmp, are flushed to disk (fsync), then renamed over path; the file it replaces is kept
    as `previous` when given (a file damaged later -- a full disk, a truncated copy -- still leaves one to use).
    """
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # a failed write (a full disk) leaves no half file beside the good one
        raise
    if previous is not None and os.path.exists(path):
        os.replace(path, previous)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # the renames themselves durable (not every filesystem allows it)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def snapshot_due(args, step, epochs_done=None, last=False):
    """With --checkpoint-dir, a snapshot is due every --save-every-steps steps (mid-epoch too: a crash, which no
    signal announces, loses at most that many), at an epoch's end (epochs_done given) every --save-every epochs,
    and last of all before the process exits (finished or preempted): when any of them is."""
    by_epochs = epochs_done is not None and epochs_done % args.save_every == 0
    by_steps = bool(args.save_every_steps) and step % args.save_every_steps == 0
    return bool(args.checkpoint_dir) and (last or by_epochs or by_steps)


def samples_done(snap, world_size, batch_size, path, unit="rank(s)"):
    """The samples of its epoch a snapshot of another layout (world size, per-rank batch) had trained on -- None
    under the same layout -- when that is a whole number of batches of world_size x batch_size; otherwise one line
    saying what to do. Every layout reads an epoch's samples in the same seeded order (rank r takes every
    world_size-th one), so the samples trained so far are a prefix of that order, whatever the layout."""
    old = (snap["world_size"], snap.get("batch_size", batch_size))
    if old == (world_size, batch_size):
        return None
    done = snap["batch_in_epoch"] * old[0] * old[1]
    if done % (world_size * batch_size):
        raise RecipeError(f"{path} was written by {old[0]} {unit} x batch {old[1]} after {done} samples of epoch "
                          f"{snap['epoch'] + 1}, not a whole number of batches of {world_size} x {batch_size}: "
                          f"resume with {old[0]} {unit} x batch {old[1]} (or a shape that divides {done}), or "
                          f"start a new --checkpoint-dir", every_rank=False)
    return done


def adapt_to_another_shape(trainer, snap, path, say, unit="rank(s)"):
    """A snapshot written by another number of ranks or another per-rank batch (a job requeued onto fewer or more
    GPUs): resume after the same samples (samples_done) and continue the cosine learning-rate curve, which spans
    --epochs in steps of the new layout, at the same point. Counting the old batches under the new layout would
    train on some samples twice and never on others. `trainer` has the recipe's Trainer's attributes (args,
    world_size, epoch, batch_in_epoch, step, loader, optimizer, scheduler: CosineAnnealingLR); `say` logs."""
    t, args = trainer, trainer.args
    done = samples_done(snap, t.world_size, args.batch_size, path, unit)
    if done is None:
        return
    t.batch_in_epoch = done // (t.world_size * args.batch_size)
    t.step = t.epoch * len(t.loader) + t.batch_in_epoch
    t.scheduler.T_max, t.scheduler.last_epoch = args.epochs * len(t.loader), t.step
    for group, lr in zip(t.optimizer.param_groups, t.scheduler._get_closed_form_lr(), strict=True):
        group["lr"] = lr
    say(f"snapshot written by {snap['world_size']} {unit} x batch {snap.get('batch_size', args.batch_size)}, "
        f"resuming as {t.world_size} x {args.batch_size}: epoch {t.epoch + 1} after {done} samples (step {t.step})")


class StepTimer:
    """Wall-clock time after each optimizer step, for the benchmarks (--timings-file, rank 0). A step hook: the
    training loop knows nothing about it. sync() waits for the device (only when timing: it costs throughput)."""

    def __init__(self, path, sync=None, **info):
        self.path, self.sync, self.info, self.times = path, sync, info, []
        self.start = time.time()

    def __call__(self):
        if self.sync is not None:
            self.sync()
        self.times.append(time.time())

    def write(self, **info):
        with open(self.path, "w") as f:
            json.dump({"start_time": self.start, "step_end_times": self.times, **self.info, **info}, f)


# A wait that ran out its deadline (gloo's "Timed out waiting 10000ms for recv", NCCL's watchdog, a store's
# "Timeout"), as opposed to a peer that closed its connections (died: "Connection reset by peer").
TIMED_OUT = re.compile(r"timed out|timeout|deadline.?exceeded", re.I)
PEER_GONE = re.compile(r"reset by peer|closed by peer|connection refused|broken pipe|end of file", re.I)
# gloo's errors are plain RuntimeErrors: its source file in the text, or, raised by the other collectives in
# flight (DDP's buckets) once a timeout closed the connection, "Application timeout caused pair closure".
GLOO_ERROR = re.compile(r"gloo/transport|timeout caused pair closure")


def timed_out(error):
    """True when a distributed wait ran out its deadline (the peer is alive but silent, or gone without a word);
    False for a peer that closed its connections (it died: its socket was closed by the kernel)."""
    text = str(error)
    return bool(TIMED_OUT.search(text)) and not PEER_GONE.search(text)


class HangReport:
    """A hang ends with evidence (#23). When a collective runs past --timeout, the live rank
    - writes where it waited (the error's traceback) and every thread's stack into rank<N>.stack.txt, and the
      backend's Flight Recorder trace (torch: gloo records it too, but only NCCL's watchdog dumps it) into
      nccl_trace_rank_<N> -- torch's own file name, which slurm_templates/tools/fr_report.py reads -- both in
      <checkpoint-dir>/debug/<SLURM_JOB_ID, torchrun's run id, or "local">/ (the shared filesystem outlives the job);
    - tells the others it timed out (a key in the rendezvous store) and waits up to GRACE_S for theirs: the ranks
      that timed out too are alive and were waiting, the ones that did not are the ones that stopped answering;
    - prints one line naming the collective, the deadline and those ranks, and exits 1.
    A store that does not answer lives in a stopped process (rank 0's, or torchrun's agent): then no rank can be
    named, and the line says so. Torch folders only for now (jax has its own coordination service).

    The rank that hangs, when it is alive (a deadlocked DataLoader, a slow filesystem), writes its own stack: a
    watcher thread of every process of a multi-process run dumps every thread's stack into rank<N>.stalled.txt
    when no step boundary (PREEMPTION.agreed) came for --timeout, once per stall. A phase longer than --timeout
    with no collective in it (a long validation, a slow save) leaves such a file too, and says so in it."""

    GRACE_S = 10  # at most; never more than --timeout: the job ends within --timeout + 60 s

    def __init__(self):
        self.checkpoint_dir = self.timeout = None
        self.last_step_at, self.watcher = None, None

    def remember(self, checkpoint_dir=None, timeout=None):
        """Where the evidence goes and the deadline the line names: OneLineParser passes --checkpoint-dir and
        --timeout; a folder whose values come from elsewhere (nemo's Hydra config) passes them itself."""
        self.checkpoint_dir = checkpoint_dir or self.checkpoint_dir
        self.timeout = timeout or self.timeout

    def stepped(self):
        """A step boundary (every step: an attribute set; the watcher starts at the first one)."""
        self.last_step_at = time.monotonic()
        if self.watcher is None and self.timeout and _launched_processes() > 1:
            self.watcher = threading.Thread(target=self._watch, name="hang-watcher", daemon=True)
            self.watcher.start()

    def _watch(self):
        dumped_for = None
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            since, stalled = self.last_step_at, time.monotonic() - self.last_step_at
            if stalled < self.timeout or dumped_for == since:
                continue
            dumped_for, rank = since, launcher_rank()
            with contextlib.suppress(OSError):
                os.makedirs(self.folder(), exist_ok=True)
                with open(os.path.join(self.folder(), f"rank{rank}.stalled.txt"), "w") as f:
                    f.write(f"rank {rank} of {_launched_processes()}, pid {os.getpid()} on {socket.gethostname()}, "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}: no step since step {PREEMPTION.step} for "
                            f"{stalled:.0f} s (--timeout {self.timeout}): stuck here, or in a phase longer than "
                            f"--timeout (a validation, a save)\n\nevery thread:\n")
                    f.flush()
                    faulthandler.dump_traceback(file=f, all_threads=True)

    def folder(self):
        run_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "none")
        run_id = "local" if run_id == "none" else run_id
        return os.path.join(self.checkpoint_dir or os.path.join(tempfile.gettempdir(), "recipe-debug"), "debug", run_id)

    def report(self, error):
        """(one line, exit code 1) for a distributed wait that timed out, else None."""
        torch_dist = sys.modules.get("torch.distributed")
        if not (timed_out(error) and torch_dist is not None and torch_dist.is_initialized()):
            return None
        if not (isinstance(error, torch_dist.DistError) or GLOO_ERROR.search(str(error))):
            return None  # a timeout of something else (a DataLoader's): not a collective's
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
        folder = self.folder()
        trace = self._write_evidence(error, rank, world_size, folder)
        op = _last_collective(trace) or "a collective"
        seconds = self.timeout or "?"
        silent = self._who_did_not_arrive(torch_dist, rank, world_size, min(self.GRACE_S, self.timeout or 10))
        return (f"{op} did not complete within --timeout {seconds} s at step {PREEMPTION.step}: {silent}; "
                f"stacks in {folder}"), 1

    def _write_evidence(self, error, rank, world_size, folder):
        """This rank's stack (where it waited, every thread now) and its Flight Recorder trace, on disk."""
        trace = None
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"rank{rank}.stack.txt"), "w") as f:
                f.write(f"rank {rank} of {world_size}, pid {os.getpid()} on {socket.gethostname()}, "
                        f"step {PREEMPTION.step}, "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {str(error).splitlines()[0] if str(error) else ''}\n"
                        f"\nwhere it waited:\n{''.join(traceback.format_exception(error))}\nevery thread now:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            from torch._C._distributed_c10d import _dump_fr_trace  # private: torch 2.13 has no public dump call
            trace = _dump_fr_trace()
            atomic_write(os.path.join(folder, f"nccl_trace_rank_{rank}"), lambda f: f.write(trace))
        except (OSError, ImportError, RuntimeError) as e:
            log(rank, f"warning: the hang's evidence is incomplete ({type(e).__name__}: {e})", file=sys.stderr)
        return trace

    def _who_did_not_arrive(self, torch_dist, rank, world_size, grace):
        """Which ranks did not time out with this one: the ones that stopped answering (or that are stuck
        elsewhere, alive). Through the rendezvous store, in a thread: a stopped store blocks its clients."""
        found = {}

        def ask():
            from datetime import timedelta
            store = torch_dist.distributed_c10d._get_default_store()  # private: the group's own store, no public way
            store.set_timeout(timedelta(seconds=grace))
            store.set(f"timed-out/{rank}", str(PREEMPTION.step))
            end = time.monotonic() + grace
            while True:
                found["arrived"] = [r for r in range(world_size) if store.check([f"timed-out/{r}"])]
                if len(found["arrived"]) == world_size or time.monotonic() > end:
                    return
                time.sleep(0.2)

        def ask_or_give_up():
            try:
                ask()
            except RuntimeError:  # DistNetworkError, DistStoreError: the store's process is gone; nobody is named
                found.pop("arrived", None)

        asking = threading.Thread(target=ask_or_give_up, daemon=True)
        asking.start()
        asking.join(2 * grace + 1)  # set() and check() give up after grace themselves; a stopped store may not
        if "arrived" not in found:
            return ("the ranks that stopped answering cannot be named: the rendezvous store does not answer either "
                    "(it lives in rank 0's process, or in torchrun's agent: stopped or gone)")
        missing = sorted(set(range(world_size)) - set(found["arrived"]))
        if not missing:
            return "every rank timed out: the collective itself hangs (the network?)"
        names = ",".join(map(str, missing))
        return (f"rank{'s' if len(missing) > 1 else ''} {names} stopped answering (alive but not progressing, "
                f"or gone without closing its connections)")


def _launched_processes():
    """How many processes the launcher started (torchrun's WORLD_SIZE, srun's SLURM_NTASKS), 1 when neither."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def _last_collective(trace):
    """'gloo:all_reduce #17' -- the newest entry of a Flight Recorder trace (pickled plain data), or ''."""
    try:
        entries = pickle.loads(trace)["entries"] if trace else []
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError):
        return ""
    if not entries:
        return ""
    last = entries[-1]
    return f"{last.get('profiling_name', '?')} (collective #{last.get('collective_seq_id', '?')})"


HANG = HangReport()
