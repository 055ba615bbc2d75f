"""The lesson of jax/, top to bottom: the model, the data, jax.distributed.initialize, the training loop, Orbax.
A jitted step whose batch is sharded over the mesh's "data" axis and whose parameters are replicated *is*
data-parallel training: XLA inserts the gradient all-reduce itself, so the loop is the same code on one device and
on 512. A JAX process is a rank (jax.process_index()); the devices of all processes (jax.devices()) form the mesh."""

import os
import socket
import time

import numpy as np
from cluster import (Dataset, ShardedLoader, check_dataset_fits, check_global_batch, checkpoint_manager,
                     coordination_timeout, local_value, platform_start, read_cifar10, read_mnist, reduce_max,
                     rendezvous, replicate, restore_newest, select_platform, watch_for_hangs)
from toolkit import PREEMPTED_EXIT_CODE, PREEMPTION, RecipeError, StepTimer, log

import jax  # after cluster: importing it quiets XLA's C++ logs, which jax reads once, at import
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp


# ---------------------------------------------------------------------------------------------------- model
def init_params(seed, in_channels, image_size, num_classes=10, width=16):
    """pytorch/'s ConvNet (conv-relu-pool twice, two dense layers) as a pytree, initialised like torch's defaults
    (uniform in +-1/sqrt(fan_in)) from --seed: every process computes the same weights, no broadcast needed."""
    rng = np.random.default_rng(seed)

    def uniform(shape, fan_in):
        return rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in), shape).astype(np.float32)

    flat = (image_size // 4) ** 2 * 2 * width
    return {
        "conv1": {"w": uniform((3, 3, in_channels, width), 9 * in_channels), "b": uniform((width,), 9 * in_channels)},
        "conv2": {"w": uniform((3, 3, width, 2 * width), 9 * width), "b": uniform((2 * width,), 9 * width)},
        "fc1": {"w": uniform((flat, 128), flat), "b": uniform((128,), flat)},
        "fc2": {"w": uniform((128, num_classes), 128), "b": uniform((num_classes,), 128)},
    }


def apply_model(params, x, compute_dtype):
    def conv(p, h):
        h = jax.lax.conv_general_dilated(h, p["w"].astype(compute_dtype), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = jax.nn.relu(h + p["b"].astype(compute_dtype))
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def dense(p, h):
        return h @ p["w"].astype(compute_dtype) + p["b"].astype(compute_dtype)

    h = conv(params["conv2"], conv(params["conv1"], x.astype(compute_dtype)))
    logits = dense(params["fc2"], jax.nn.relu(dense(params["fc1"], h.reshape(h.shape[0], -1))))
    return logits.astype(jnp.float32)  # loss and its gradient in fp32, also under --amp


def build_optimizer(args, steps_per_epoch):
    """SGD with momentum, a cosine schedule spanning --epochs: --max-steps only stops early, so a run cut short
    and resumed follows exactly the same learning-rate curve as an uninterrupted one."""
    return optax.sgd(optax.cosine_decay_schedule(args.lr, decay_steps=args.epochs * steps_per_epoch), momentum=0.9)


# ---------------------------------------------------------------------------------------------------- data
def synthetic_dataset(size, seed=1234):
    """MNIST-shaped images whose class is learnable (a pattern per class plus noise), from their own seed: every
    process and every run builds the identical dataset without any file."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((10, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, size, dtype=np.int32)
    images = prototypes[labels] + rng.standard_normal((size, 28, 28, 1), dtype=np.float32)
    return Dataset(images, labels, "synthetic")


def build_dataset(args):
    if args.data == "synthetic":
        return synthetic_dataset(args.dataset_size)
    if not os.path.isdir(args.data_dir) or not os.listdir(args.data_dir):
        raise RecipeError(f"--data-dir {args.data_dir!r} is missing or empty", every_rank=False)
    return read_mnist(args.data_dir) if args.data == "mnist" else read_cifar10(args.data_dir)


def build_loader(dataset, args, rank=0, world_size=1, local_devices=1):
    """--batch-size is per device: a process that drives several devices loads a batch for each of them."""
    return ShardedLoader(dataset, args.batch_size * local_devices, rank, world_size, args.seed, args.num_workers)


# ---------------------------------------------------------------------------------------------------- processes
def init_distributed(args, coordinator=None, num_processes=None, process_id=None, local_device_ids=None):
    """jax.distributed.initialize: process 0 runs the coordinator service, the others connect to it. Arguments
    left None are auto-detected by JAX (under srun from the SLURM_* variables)."""
    select_platform(args.backend)  # configuration only: initialize() refuses to run once a device was used
    with rendezvous(coordinator, process_id, args.timeout):  # what goes wrong: one line within --timeout
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids,
                                   initialization_timeout=args.timeout + 60,
                                   heartbeat_timeout_seconds=coordination_timeout(args.timeout),
                                   shutdown_timeout_seconds=coordination_timeout(args.timeout))
    watch_for_hangs(args.timeout)  # a peer that stops answering: stacks on disk, one line, exit 1 (C13)
    PREEMPTION.install()  # initialize() gave SIGTERM to XLA's preemption sync manager (trains on): take it back
    with platform_start(args.backend):  # the first use of a device: JAX starts CUDA here, or says why not
        rank, world_size = jax.process_index(), jax.process_count()
    # One line per process: where each one landed is the first question when a multi-node job misbehaves.
    log(rank, f"host {socket.gethostname()} | process {rank} of {world_size} | "
              f"local devices {[d.id for d in jax.local_devices()]} | coordinator {coordinator}")
    return rank, world_size


# ---------------------------------------------------------------------------------------------------- training
class Trainer:
    """Data-parallel training over `mesh`: parameters replicated, each batch sharded along the "data" axis.
    rank / world_size: this process and how many there are (1 for single_gpu.py)."""

    def __init__(self, args, mesh, rank=0, world_size=1):
        self.args, self.mesh, self.rank, self.world_size = args, mesh, rank, world_size
        self.global_batch = args.batch_size * mesh.devices.size
        self.dataset = build_dataset(args)
        check_dataset_fits(self.dataset, world_size, self.global_batch)
        self.loader = build_loader(self.dataset, args, rank, world_size, len(mesh.local_devices))
        self.optimizer = build_optimizer(args, self.loader.steps)
        params = init_params(args.seed, self.dataset.images.shape[3], self.dataset.images.shape[1])
        self.state = {"epoch": 0, "step": 0, "batch_in_epoch": 0}
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        self.params, self.opt_state = replicate((params, self.optimizer.init(params)), self.replicated)
        self.train_step = jax.jit(self._step, out_shardings=self.replicated, donate_argnums=(0, 1))
        self.timer = self.saving = None  # saving: the step Orbax is writing in the background

    def _step(self, params, opt_state, x, y):
        def loss_fn(p):
            logits = apply_model(p, x, jnp.bfloat16 if self.args.amp else jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

        # The mean runs over the *global* batch: XLA turns it into per-device sums plus an all-reduce, and the
        # same for the gradients -- DDP's all-reduce, written by the compiler.
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.sum(jnp.argmax(logits, -1) == y)

    def _run_batch(self, x, y):
        # This process's part of the batch -> one global array sharded over every device of every process.
        gx, gy = (jax.make_array_from_process_local_data(self.sharded, a) for a in (x, y))
        self.params, self.opt_state, loss, correct = self.train_step(self.params, self.opt_state, gx, gy)
        if self.timer:
            self.timer()
        return loss, correct

    def _run_epoch(self):
        """One pass over this process's shard (skipping what a resumed snapshot already trained); summed loss,
        correct predictions and samples (global) stay on the device: reading them would wait for every step."""
        args, state = self.args, self.state
        loss_sum, correct, seen, preempted = 0.0, 0, 0, False
        for x, y in self.loader.batches(state["epoch"], skip=state["batch_in_epoch"]):
            loss, n_correct = self._run_batch(x, y)
            state["step"], state["batch_in_epoch"] = state["step"] + 1, state["batch_in_epoch"] + 1
            loss_sum, correct, seen = loss_sum + loss * self.global_batch, correct + n_correct, seen + self.global_batch
            if state["step"] % args.log_every == 0 and self.rank == 0:
                log(0, f"epoch {state['epoch'] + 1} | batch {state['batch_in_epoch']}/{self.loader.steps} | "
                       f"step {state['step']} | loss {float(local_value(loss)):.4f}")
            if args.max_steps and state["step"] >= args.max_steps:
                break
            if PREEMPTION.agreed(state["step"], reduce_max):  # every process stops at the same step
                preempted = True
                break
            if args.checkpoint_dir and state["batch_in_epoch"] < self.loader.steps:  # (an epoch's end: in train())
                self._save_snapshot(force=False)  # if Orbax says one is due: --save-every-steps, mid-epoch too
        return loss_sum, correct, seen, preempted

    def _training_left(self):
        args, state = self.args, self.state
        return state["epoch"] < args.epochs and not (args.max_steps and state["step"] >= args.max_steps)

    def train(self):
        args, state, mesh = self.args, self.state, self.mesh
        if args.checkpoint_dir:  # Orbax decides from the step whether a save is due: --save-every, --save-every-steps
            self.checkpoints = checkpoint_manager(args.checkpoint_dir, args.save_every * self.loader.steps,
                                                  args.save_every_steps)
            self._resume()
        if self.rank == 0:
            log(0, f"processes {self.world_size} | devices {mesh.devices.size} ({len(mesh.local_devices)} per "
                   f"process, {mesh.devices.flat[0].platform}) | {len(self.dataset)} samples | batch "
                   f"{args.batch_size}/device, {self.global_batch} global | {self.loader.steps} steps/epoch")
        if args.timings_file and self.rank == 0:  # waits for each step's result: JAX dispatches asynchronously
            self.timer = StepTimer(args.timings_file, sync=lambda: jax.block_until_ready(self.params),
                                   world_size=self.world_size, batch_size=args.batch_size)
        start, preempted = time.perf_counter(), False
        while self._training_left():
            epoch_start = time.perf_counter()
            loss_sum, correct, seen, preempted = self._run_epoch()
            elapsed = time.perf_counter() - epoch_start
            if seen and self.rank == 0:
                log(0, f"epoch {state['epoch'] + 1}/{args.epochs} | step {state['step']} | loss "
                       f"{float(local_value(loss_sum)) / seen:.4f} | acc {int(local_value(correct)) / seen:.4f} | "
                       f"{seen / elapsed:.0f} samples/s | {elapsed:.1f} s")
            if state["batch_in_epoch"] == self.loader.steps:  # the epoch ran to its end
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            if args.checkpoint_dir:  # forced at the end and when preempted (the process exits next)
                self._save_snapshot(force=preempted or not self._training_left())
            if preempted:
                if self.rank == 0:
                    saved = "snapshot saved" if args.checkpoint_dir else "no --checkpoint-dir, nothing saved"
                    log(0, f"preempted at step {state['step']}: {saved}; exiting with {PREEMPTED_EXIT_CODE} "
                           f"so the job script requeues")
                break
        if self.timer and not preempted:
            self.timer.write()
        if args.checkpoint_dir:
            self.checkpoints.close()  # waits for a save still under way, and its barriers: every process is there
        if self.rank == 0 and not preempted:
            log(0, f"done: {state['step']} steps in {time.perf_counter() - start:.1f} s")
        return preempted

    def _save_snapshot(self, force):
        """Every process saves (Orbax: each writes the shards it holds, so sharded parameters are saved whole);
        the arrays are copied off the devices before save() returns, then written in the background. Forced
        (the end, a preemption) it is waited for: the process exits next. "snapshot saved" once the step is on disk."""
        step = self.state["step"]
        if force or self.checkpoints.should_save(step):  # Orbax's decision: --save-every, --save-every-steps
            self.checkpoints.wait_until_finished()  # the save before this one (save() would wait for it too)
            self._report_saved()
            progress = dict(self.state, world_size=self.world_size, global_batch=self.global_batch, seed=self.args.seed)
            self.checkpoints.save(step, force=force, args=ocp.args.Composite(
                state=ocp.args.StandardSave((self.params, self.opt_state)), progress=ocp.args.JsonSave(progress)))
            self.saving = step
        if force:
            self.checkpoints.wait_until_finished()
        self._report_saved()  # once Orbax has written it: a crash after the line resumes from this step

    def _report_saved(self):
        if self.saving is not None and not self.checkpoints.is_saving_in_progress():
            if self.rank == 0:
                log(0, f"snapshot saved to {self.checkpoints.directory} (step {self.saving})")
            self.saving = None

    def _resume(self):
        found = restore_newest(self.checkpoints, (self.params, self.opt_state))  # newest readable step (C6)
        if found is None:
            return
        step, (self.params, self.opt_state), progress = found
        check_global_batch(progress, self.global_batch, self.mesh.devices.size, self.checkpoints.directory / str(step))
        self.state.update(epoch=progress["epoch"], step=progress["step"], batch_in_epoch=progress["batch_in_epoch"])
        if self.rank == 0:
            log(0, f"resumed from {self.checkpoints.directory / str(step)}: epoch {self.state['epoch'] + 1}, "
                   f"step {self.state['step']}")


def train(args, devices, rank=0, world_size=1):
    """What every script calls after setup: the mesh spans `devices` (every device of every process)."""
    mesh = jax.make_mesh((len(devices),), ("data",), (jax.sharding.AxisType.Auto,), devices=devices)  # as Mesh() had
    preempted = Trainer(args, mesh, rank, world_size).train()
    # Every process, preempted too, leaves through the shutdown barrier: one still connected at exit is aborted.
    jax.distributed.shutdown()
    if preempted:
        raise SystemExit(PREEMPTED_EXIT_CODE)
