"""The baseline jax/ is measured against: the smallest correct data-parallel JAX loop, in plain JAX.

    PYTHONPATH=jax python benchmarks/raw_jax.py --nprocs 2 --max-steps 60 --backend gloo

Same model (init_params, apply_model), same synthetic data and the same per-device batch as jax/, imported from
jax/recipe.py (the runner sets PYTHONPATH=jax) so they cannot drift apart; SGD with momentum 0.9 (optax) at a
constant rate. Started the way jax/multigpu.py is started, since JAX has no torchrun: --nprocs processes
(multiprocessing, spawn), each calls jax.distributed.initialize with one device (on CPU with gloo collectives);
one jitted step over a mesh of every device, the batch sharded along "data", the parameters replicated, so XLA
inserts the gradient all-reduce. Nothing else: no LR schedule, no metrics, no logging, no preemption agreement, no
checkpoints (importing jax/recipe.py imports Orbax, which counts in the time to first step only). It accepts the
recipes' command line (unused options are ignored) and writes the same --timings-file, so the runner launches it
exactly like jax/multigpu.py.
"""

import time

START_TIME = time.time()  # before the heavy imports, as in raw_ddp.py: only the runner's launch time is used

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64, help="per process (one device each)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--dataset-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timings-file", default=None)
    # gloo: one CPU device per process; nccl: one GPU per process (the runner passes the backend it measures)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--log-every", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None)
    return p.parse_args()


def worker(rank, world_size, coordinator, args):
    import jax
    import jax.numpy as jnp
    import optax
    from recipe import apply_model, init_params, synthetic_dataset  # jax/recipe.py, via PYTHONPATH

    if args.backend == "gloo":
        jax.config.update("jax_platforms", "cpu")
    # WORKAROUND(jax 0.10.2, jax-ml/jax#11182): CPU devices of several processes have no collectives by default: gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, world_size, rank, [rank] if args.backend == "nccl" else None)
    mesh = jax.make_mesh((jax.device_count(),), ("data",), devices=jax.devices())
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    data = synthetic_dataset(args.dataset_size)
    optimizer = optax.sgd(args.lr, momentum=0.9)
    params = init_params(args.seed, data.images.shape[3], data.images.shape[1])
    params, opt_state = jax.device_put((params, optimizer.init(params)), replicated)

    def step(params, opt_state, x, y):
        def loss_fn(p):  # the mean over the global batch: XLA all-reduces it and the gradients
            return optax.softmax_cross_entropy_with_integer_labels(apply_model(p, x, jnp.float32), y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step, out_shardings=replicated, donate_argnums=(0, 1))
    ends, n_steps = [], 0
    per_epoch = args.dataset_size // world_size // args.batch_size
    for epoch in range(args.epochs):
        # DistributedSampler's rule: one permutation everywhere, process p takes positions p, p + P, ...
        shard = np.random.default_rng([args.seed, epoch]).permutation(args.dataset_size)[rank::world_size]
        for i in range(per_epoch):
            idx = shard[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = (jax.make_array_from_process_local_data(sharded, a) for a in (data.images[idx], data.labels[idx]))
            params, opt_state = step(params, opt_state, x, y)
            if rank == 0:
                jax.block_until_ready(params)  # JAX dispatches asynchronously: the step has really ended
                ends.append(time.time())
            n_steps += 1
            if args.max_steps and n_steps >= args.max_steps:
                break
        if args.max_steps and n_steps >= args.max_steps:
            break
    if rank == 0 and args.timings_file:
        with open(args.timings_file, "w") as f:
            json.dump({"start_time": START_TIME, "step_end_times": ends, "world_size": world_size,
                       "batch_size": args.batch_size}, f)
    jax.distributed.shutdown()  # every process leaves together: process 0 runs the coordination service


def main():
    args = parse_args()
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold XLA's threads
    procs = [ctx.Process(target=worker, args=(i, args.nprocs, coordinator, args)) for i in range(args.nprocs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(abs(p.exitcode) for p in procs))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ warnings off stderr (read at `import jax`)
    main()
