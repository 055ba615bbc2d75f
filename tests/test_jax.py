"""jax/ recipes, launched for real on CPU (gloo collectives, 2 processes): every launch pattern, resume and
preemption, real data formats, bad input. 2 processes == one process with the global batch is
tests/test_behaviour.py's."""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from data_files import write_cifar10, write_mnist
from helpers import ROOT, clean_env, env_python, epoch_lines, free_port, run
from recipes import JAX_CACHE, RECIPES, jax_checkpoints, scripts_not_run

pytestmark = [pytest.mark.jax, pytest.mark.timeout(300)]

FOLDER = ROOT / "jax"
# 1024 samples: 32 steps per epoch for 2 processes x batch 16 (or 1 process x batch 32), 64 in all.
ARGS = ["--epochs", "2", "--dataset-size", "1024", "--log-every", "10"]
STEPS = 64
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


def jax_env(**overrides):
    """JAX's persistent compilation cache (recipes.JAX_CACHE), shared by every jax/ launch of the tests: most of a
    launch's CPU time is compiling the same train step again. Same code either way; a cached executable is the
    compiled one."""
    return clean_env(**JAX_CACHE, **overrides)


def python(*args, env=None, **kw):
    return run([env_python("jax"), *args], env=env or jax_env(), **kw)


_READ = {}  # (checkpoint dir, its steps) -> the newest step's leaves: each read starts a process that imports Orbax


def snapshot(*directories):
    """(leaves, progress) of the newest step of each directory (one directory: that pair), read back whole in one
    process with cluster.read_checkpoint -- Orbax's files need Orbax, and the test runner has no JAX."""
    keys = [(str(d), tuple(steps(d))) for d in directories]
    todo = [k for k in keys if k not in _READ]
    for key, read in zip(todo, jax_checkpoints(*[k[0] for k in todo], env=jax_env()) if todo else []):
        _READ[key] = read
    found = [_READ[k] for k in keys]
    return found[0] if len(found) == 1 else found


def steps(directory):
    """The step folders Orbax finalized, oldest first (an unfinished save is <step>.orbax-checkpoint-tmp-*)."""
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def progress(directory):
    """The newest step's progress, read as the JSON file it is (no Orbax needed)."""
    return json.loads((Path(directory) / str(steps(directory)[-1]) / "progress" / "metadata").read_text())


def written_shapes(directory):
    """The newest step's arrays and the shape each process wrote (the whole array where it is replicated), from
    Orbax's JSON metadata: no Orbax needed, no process started."""
    meta = json.loads((Path(directory) / str(steps(directory)[-1]) / "state" / "_METADATA").read_text())
    return [tuple(m["value_metadata"]["write_shape"]) for m in meta["tree_metadata"].values()]


def assert_same_leaves(a, b, **tol):
    """The parameter and optimizer leaves of two checkpoints (numpy: jax/ has no torch): bit for bit without tol."""
    (la, _), (lb, _) = snapshot(a, b)
    assert len(la) == len(lb)
    for i, (x, y) in enumerate(zip(la, lb)):
        if tol:
            np.testing.assert_allclose(x, y, **tol, err_msg=f"leaf {i}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"leaf {i}")


def start(script, args, envs):
    """One process per environment, each the way a launcher would start it."""
    return [subprocess.Popen([str(env_python("jax")), str(FOLDER / script), *map(str, args)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for env in envs]


def finish(procs, timeout=240, head=None):
    """Wait for every process; (exit codes, outputs). A hang kills them all and fails the test."""
    end, outs = time.monotonic() + timeout, []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1, end - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"processes still running after {timeout}s: {[p.args for p in procs]}")
    if head:
        outs[0] = head + outs[0]
    return [p.returncode for p in procs], outs


def explicit_envs(port, n=2):
    """What two shells (or two machines) set: coordinator, number of processes, this process's id."""
    return [jax_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=n, JAX_PROCESS_ID=i)
            for i in range(n)]


def srun_envs(port, n=2):
    """What `srun` sets in each task: only SLURM_* variables; JAX's Slurm detection does the rest."""
    return [jax_env(SLURM_PROCID=i, SLURM_LOCALID=i, SLURM_NTASKS=n, SLURM_NNODES=1, SLURM_JOB_ID=4242,
                      SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_TASKS_PER_NODE=n, JAX_COORDINATOR_PORT=port)
            for i in range(n)]


def completed(procs):
    codes, outs = finish(procs)
    assert codes == [0] * len(procs), "\n".join(outs)
    return "\n".join(outs)


# ------------------------------------------------------------------------------------------ reference runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 32: what every 2-process run with batch 16 per process must reproduce (tests/recipes.py's
    run, which test_behaviour.py compares with `spawned`)."""
    ran = RECIPES["jax"].run(tmp_path_factory, "reference")
    return ran.ckpt, ran.out


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """multigpu.py --nprocs 2: the uninterrupted 2-process run the resume tests compare against, bit for bit
    (tests/recipes.py's run, shared with test_behaviour.py)."""
    ran = RECIPES["jax"].run(tmp_path_factory, "spawn")
    return ran.ckpt, ran.out


def test_single_gpu_learns_and_writes_a_complete_snapshot(reference):
    ckpt, out = reference
    lines = epoch_lines(out)
    assert len(lines) == 2, out
    first, last = (e.loss for e in lines)
    assert last < first * 0.9, f"loss did not decrease: {lines}"
    assert re.search(r"^\[rank0\] done: 64 steps in [\d.]+ s$", out, re.M), out
    meta = progress(ckpt)
    assert (meta["epoch"], meta["step"], meta["batch_in_epoch"], meta["world_size"]) == (2, STEPS, 0, 1)
    assert len(written_shapes(ckpt)) == 8 + 8 + 1  # parameters, momentum, the schedule's step count
    assert sorted(p.name for p in ckpt.iterdir()) == [str(STEPS // 2), str(STEPS)]  # every epoch; no temporaries
    # the epoch's save in the background: its line once Orbax has written it (a crash after it resumes from there)
    assert f"snapshot saved to {ckpt} (step 32)" in out and f"snapshot saved to {ckpt} (step 64)" in out


# Rank 1 lingers before it exits (sitecustomize runs in every process of the launch): rank 0, which runs JAX's
# coordination service, must not leave while another process is still connected to it.
LATE_RANK1 = """
import os, time
_exit = os._exit
def late_exit(code):
    if os.environ.get("JAX_PROCESS_ID") == "1":
        time.sleep(3)
    _exit(code)
os._exit = late_exit
"""


def test_preempted_run_saves_exits_75_and_resumes_exactly(spawned, tmp_path):
    """SIGTERM (what Slurm sends at preemption) to multigpu.py alone: it forwards it to its processes, both stop
    at the same step, every process saves its part, all exit 75. (jax.distributed.initialize hands SIGTERM to XLA's
    preemption manager; the recipe takes it back.) Rank 1 exits 3 s after rank 0 would: every process leaves
    through jax.distributed.shutdown first, else rank 0's exit ends the coordination service under rank 1, which
    aborts (seen under load in CI: exit -6, 'Terminating process because the JAX distributed service detected fatal
    errors'). The next launch -- two explicitly addressed multinode.py processes -- resumes mid-epoch and ends bit
    for bit where the uninterrupted run did."""
    ckpt, late = tmp_path / "ckpt", tmp_path / "late"
    late.mkdir()
    (late / "sitecustomize.py").write_text(LATE_RANK1)
    args = [*ARGS, "--batch-size", "16", "--checkpoint-dir", ckpt]
    (spawner,) = start("multigpu.py", ["--nprocs", "2", *args], [jax_env(PYTHONPATH=late)])
    head = ""
    for line in spawner.stdout:  # wait until training is under way
        head += line
        if "| step 10 |" in line:
            break
    spawner.send_signal(signal.SIGTERM)
    codes, outs = finish([spawner], head=head)
    assert codes == [75], outs[0]
    stopped_at = int(re.search(r"preempted at step (\d+): snapshot saved", outs[0]).group(1))
    assert 10 <= stopped_at < STEPS and stopped_at % 10 == 0  # the signal came after step 10 was logged
    assert progress(ckpt)["step"] == stopped_at
    out = completed(start("multinode.py", args, explicit_envs(free_port())))
    assert re.search(rf"resumed from {re.escape(str(ckpt / str(stopped_at)))}: epoch \d, step {stopped_at}\n", out)
    assert "[rank1] host" in out and "process 1 of 2" in out
    assert_same_leaves(ckpt, spawned[0])  # batches skipped, schedule and momentum restored


def damage(directory, step):
    """Half of every data file of a step cut off: what a full disk or an interrupted copy leaves."""
    for f in (Path(directory) / str(step) / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_damaged_newest_step_falls_back_to_the_previous_one(reference, tmp_path):
    """C6: a damaged newest step is skipped with a warning and the step before it resumed; the run ends where the
    uninterrupted one did, bit for bit. The damaged folder is kept aside (<step>.unreadable): Orbax refuses to save a
    step whose folder exists, and the run saves that step again. (It was exit 2, 'move it away'.)"""
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    damage(tmp_path, STEPS)
    out = python(FOLDER / "single_gpu.py", *ARGS, "--batch-size", "32", "--checkpoint-dir", tmp_path).stdout
    assert f"[rank0] warning: cannot restore {tmp_path / str(STEPS)} (ValueError: " in out, out
    assert f"resuming from step {STEPS // 2}" in out and "Traceback" not in out, out
    assert f"resumed from {tmp_path / str(STEPS // 2)}: epoch 2, step {STEPS // 2}" in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(STEPS // 2), str(STEPS), f"{STEPS}.unreadable"]
    assert_same_leaves(tmp_path, reference[0])


def test_no_readable_step_is_one_line_naming_them(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
    damage(tmp_path, STEPS)
    damage(tmp_path, STEPS // 2)
    line, _ = failing("single_gpu.py", *ARGS, "--checkpoint-dir", tmp_path)
    assert "error: no readable checkpoint: " in line and f"Move {tmp_path} away to start over" in line, line
    assert f"{tmp_path / str(STEPS)} (ValueError: " in line and f"{tmp_path / str(STEPS // 2)} (ValueError: " in line


STRAGGLER = """
import asyncio, sys, threading
sys.path.insert(0, sys.argv[1])
import cluster
from orbax.checkpoint._src import asyncio_utils


async def read(fails):  # as tensorstore completes a read: from its own thread, through the loop that awaits it
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    threading.Timer(0 if fails else 0.5, lambda: loop.call_soon_threadsafe(done.set_result, None)).start()
    await done
    if fails:
        raise ValueError("damaged")


async def read_step():  # Orbax's restore: every array's read gathered
    await asyncio.gather(read(fails=True), read(fails=False))


class Manager:  # a step whose first read fails while another is still under way, read as Orbax reads a step
    directory = "ckpt"

    def item_metadata(self, step):
        return asyncio_utils.run_sync(read_step())


try:
    cluster.restore_checkpoint(Manager(), 8, like=None)
except Exception as e:
    print("restore failed:", type(e).__name__, flush=True)
threading.Event().wait(1)  # the second read completes meanwhile
"""


def test_a_failed_restore_leaves_no_read_behind_on_a_closed_loop(tmp_path):
    """Orbax reads every array of a step in one new event loop (asyncio_utils.run_sync) and gathers the reads: the
    first that fails ends the gather and the loop is closed while the others are still under way; each of them then
    wakes the closed loop from tensorstore's thread -- a `RuntimeError: Event loop is closed` traceback on stderr per
    read, after the recipe's one line (seen in CI, under load, restoring a damaged step). restore_checkpoint lets
    the loop finish the reads it started before it is closed."""
    (tmp_path / "straggler.py").write_text(STRAGGLER)
    out = python(tmp_path / "straggler.py", FOLDER).stdout
    assert "restore failed:" in out and "Event loop is closed" not in out and "Traceback" not in out, out


UNRETRIEVED = """
import asyncio, gc, sys
sys.path.insert(0, sys.argv[1])
import cluster

async def read():
    raise OSError("a damaged chunk")

with cluster.draining_event_loops():
    loop = asyncio.new_event_loop()
    task = loop.create_task(read())  # failed, and nobody asks for its exception (Orbax's second failed read)
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
del task
gc.collect()
print("closed")
"""


def test_a_failed_read_nobody_awaited_prints_nothing_after_the_one_line(tmp_path):
    """A restore with several damaged arrays fails in several reads; the first ends Orbax's gather, another may
    finish failed with nobody asking for its exception, and asyncio prints `Task exception was never retrieved`
    plus a traceback when the task is collected -- after the recipe's one line (seen in a CI rehearsal, both
    steps damaged). On the restore's loops those failures are the one already reported: nothing more is printed."""
    (tmp_path / "unretrieved.py").write_text(UNRETRIEVED)
    proc = python(tmp_path / "unretrieved.py", FOLDER)
    assert proc.stdout.strip().endswith("closed") and "never retrieved" not in proc.stdout + (proc.stderr or ""), \
        proc.stdout + (proc.stderr or "")


SHARDED = """
import sys
sys.path.insert(0, sys.argv[1])
import cluster
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

cluster.select_platform("gloo")
jax.distributed.initialize(*cluster.launch_plan()[:3])
mesh = jax.make_mesh((2,), ("data",), (jax.sharding.AxisType.Auto,))
sharded, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
w = np.arange(24, dtype=np.float32).reshape(8, 3)
tree = {"w": jax.make_array_from_callback(w.shape, sharded, lambda i: w[i]),
        "b": cluster.replicate(np.ones(3, np.float32), replicated)}
manager = cluster.checkpoint_manager(sys.argv[2], every_steps=1)
for step in (6, 7):
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                               progress=ocp.args.JsonSave({"step": step})))
    manager.wait_until_finished()
like = jax.tree_util.tree_map(jax.numpy.zeros_like, tree)
restored, progress = cluster.restore_checkpoint(manager, 7, like)
assert restored["w"].sharding == sharded and progress == {"step": 7}
print(f"process {jax.process_index()}: holds {restored['w'].addressable_data(0).shape}, restored",
      multihost_utils.process_allgather(restored["w"], tiled=True).tolist(), flush=True)
if jax.process_index() == 0:  # step 7 cut short, as a full disk leaves it: both processes must fall back to 6
    for f in (manager.directory / "7" / "state" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
cluster.barrier("step 7 damaged")
step, restored, progress = cluster.restore_newest(manager, like)
print(f"process {jax.process_index()}: fell back to step {step} {progress}", flush=True)
manager.close()
jax.distributed.shutdown()
"""


def test_a_parameter_sharded_over_two_processes_is_saved_and_restored_whole(tmp_path):
    """Each process holds half of `w` (rows 0-3, rows 4-7): the checkpoint must hold all 8 rows (the .npz snapshot
    this replaced wrote process 0's half, and its shape check compared that half with itself), and the restore
    must give each process its half back. Then the newest step is damaged: both processes fall back together."""
    (tmp_path / "sharded.py").write_text(SHARDED)
    procs = [subprocess.Popen([str(env_python("jax")), str(tmp_path / "sharded.py"), str(FOLDER), str(tmp_path / "c")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for env in explicit_envs(free_port())]
    codes, outs = finish(procs)
    assert codes == [0, 0], "\n".join(outs)
    whole = np.arange(24, dtype=np.float32).reshape(8, 3)
    for i, out in enumerate(outs):
        assert f"process {i}: holds (4, 3), restored {whole.tolist()}" in out, out
        # a step one process cannot read is given up by all of them (the one that could not says so)
        assert f"process {i}: fell back to step 6 {{'step': 6}}" in out and "Traceback" not in out, out
    assert "warning: cannot restore " in "".join(outs) and "resuming from step 6" in "".join(outs), outs
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["6", "7.unreadable"]
    (b, w), meta = snapshot(tmp_path / "c")
    np.testing.assert_array_equal(w, whole)
    assert meta == {"step": 6}


# ------------------------------------------------------------------------------------------ data


def load_common():
    """jax/cluster.py itself, which holds the sampler (it imports only numpy and toolkit.py at the top), to check
    the sampler directly; sys.modules and the environment as they were afterwards."""
    modules = {}
    with mock.patch.dict(sys.modules), mock.patch.dict(os.environ):
        for name in ("toolkit", "cluster"):
            spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
            sys.modules[name] = modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
    return modules["cluster"]


def test_processes_read_disjoint_shards_reshuffled_every_epoch():
    common = load_common()
    data = common.Dataset(np.arange(103, dtype=np.float32)[:, None], np.arange(103, dtype=np.int32), "ids")
    loaders = [common.ShardedLoader(data, 4, p, 3, seed=0, num_workers=w) for p, w in ((0, 0), (1, 2), (2, 0))]
    seen = {}
    for epoch in range(2):
        shards = [np.concatenate([y for _, y in loader.batches(epoch)]) for loader in loaders]
        assert [len(s) for s in shards] == [32] * 3  # 103 // 3 = 34 per process, 8 batches of 4
        assert len(set(np.concatenate(shards))) == 96, "processes overlap"
        seen[epoch] = shards[0]
        # the global batch of a step = the samples one process with the global batch (12) takes at that step
        single = common.ShardedLoader(data, 12, 0, 1, seed=0, num_workers=0)
        for (_, one), *parts in zip(single.batches(epoch), *(loader.batches(epoch) for loader in loaders)):
            assert set(one) == set(np.concatenate([y for _, y in parts]))
    assert list(seen[0]) != list(seen[1]), "same shuffle every epoch"
    resumed = np.concatenate([y for _, y in loaders[1].batches(1, skip=3)])
    assert list(resumed) == list(np.concatenate([y for _, y in loaders[1].batches(1)])[12:])


def test_mnist_idx_files_with_bf16_and_loader_threads(tmp_path):
    write_mnist(tmp_path)
    out = python(FOLDER / "single_gpu.py", "--data", "mnist", "--data-dir", tmp_path, "--epochs", "1",
                 "--batch-size", "32", "--amp", "--num-workers", "2").stdout
    assert "256 samples" in out and "8 steps/epoch" in out
    loss = epoch_lines(out)[0].loss
    assert 0 < loss < 10  # finite under bf16


def test_cifar10_pickles(tmp_path):
    write_cifar10(tmp_path)
    python(FOLDER / "single_gpu.py", "--data", "cifar10", "--data-dir", tmp_path, "--epochs", "1",
           "--batch-size", "32", "--checkpoint-dir", tmp_path / "ckpt")
    assert progress(tmp_path / "ckpt")["step"] == 10  # 5 training batches of 64 = 320 samples
    assert written_shapes(tmp_path / "ckpt")[1] == (3, 3, 3, 16)  # conv1's kernel was built for RGB input


# ------------------------------------------------------------------------------------------ bad input


def failing(script, *args, env=None, timeout=90):
    """Run to its end; it must exit 2 with exactly one error line on stderr and no traceback."""
    t0 = time.monotonic()
    proc = subprocess.run([str(env_python("jax")), str(FOLDER / script), *map(str, args)], env=env or jax_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and ERROR_LINE.match(lines[0]), (proc.returncode, proc.stderr)
    return lines[0], time.monotonic() - t0


@pytest.mark.parametrize("script, argv, message", [
    ("single_gpu.py", ["--batch-size", "0"], "must be a positive integer, got 0"),
    ("single_gpu.py", ["--lr", "-1"], "must be a positive finite number, got -1"),
    ("single_gpu.py", ["--data", "mnist"], "--data mnist needs --data-dir"),
    ("multigpu.py", ["--nprocs", "2", "--dataset-size", "1", "--batch-size", "1"],
     "the dataset has 1 samples but the world size is 2"),
    ("multinode.py", [], "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID not set: start multinode.py "
                         "with srun"),
])
def test_bad_arguments_are_one_line(script, argv, message):
    line, _ = failing(script, *argv)
    assert message in line


def test_bad_data_files(tmp_path):
    assert "is missing or empty" in failing("single_gpu.py", "--data", "cifar10", "--data-dir", tmp_path)[0]
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    assert "is not an MNIST image file" in failing("single_gpu.py", "--data", "mnist", "--data-dir", tmp_path)[0]


def test_wrong_coordinator_address_is_one_line_within_the_timeout():
    """Process 1 told a port where no coordinator runs: one line after --timeout, not JAX's minutes-long wait."""
    env = explicit_envs(free_port())[1]
    line, seconds = failing("multinode.py", "--timeout", "5", env=env)
    assert "cannot reach the coordinator at 127.0.0.1:" in line and seconds < 60


def test_missing_peer_is_one_line_not_an_abort():
    """Process 0 alone: JAX itself would abort with a C++ stack trace when its timeout expires."""
    line, seconds = failing("multinode.py", "--timeout", "5", env=explicit_envs(free_port())[0])
    assert "jax.distributed.initialize" in line and "did not finish within 5 s" in line and seconds < 60


def test_coordinator_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        line, _ = failing("multinode.py", "--timeout", "5", env=explicit_envs(busy.getsockname()[1])[0])
    assert "another process already listens on that port" in line


def test_srun_without_coordinator_port():
    env = srun_envs(1)[0]
    del env["JAX_COORDINATOR_PORT"]
    assert "JAX_COORDINATOR_PORT not set" in failing("multinode.py", env=env)[0]


def test_srun_tasks_per_node_of_an_uneven_layout():
    """SLURM_STEP_TASKS_PER_NODE '2(x3),1': 3 nodes with 2 tasks, then 1 node with one task, which drives all of
    its GPUs (the first count alone, 2, left it to JAX: GPU number SLURM_LOCALID, 1 of 4)."""
    cluster = load_common()
    assert cluster.tasks_per_node("2(x3),1") == [2, 2, 2, 1] and cluster.tasks_per_node("8") == [8]
    layout = {"SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    with mock.patch.dict(os.environ, layout | {"SLURM_NODEID": "3"}):
        assert cluster.local_device_ids() == [0, 1, 2, 3]
    with mock.patch.dict(os.environ, layout | {"SLURM_NODEID": "0"}):
        assert cluster.local_device_ids() is None  # 2 tasks, 4 GPUs: JAX's own choice (SLURM_LOCALID)


def test_multinode_template_wants_one_task_per_gpu(tmp_path):
    """multinode.sbatch starts one process per GPU: 1 task per node on 8 GPUs would train on one GPU of each node
    (4 tasks on 2 GPUs: two processes asking for a GPU that is not there) -- one line and exit 2 before srun."""
    env = clean_env(SLURM_JOB_ID="7", SLURM_JOB_NAME="t", SLURM_CPUS_PER_TASK="1", SLURM_NNODES="2",
                    SLURM_NTASKS="2", SLURM_JOB_NODELIST="n[1-2]", SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="1",
                    SLURM_TASKS_PER_NODE="1(x2)", PATH=f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "srun").write_text("#!/bin/sh\necho srun started\n")  # what would run, were the check missing
    (tmp_path / "srun").chmod(0o755)
    proc = subprocess.run(["bash", "multinode.sbatch"], cwd=FOLDER, env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "srun started" not in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip() == ("error: 1 tasks per node for 8 GPUs per node: multinode.sbatch starts one process "
                                   "per GPU, set #SBATCH --ntasks-per-node=8 (or use multinode_pernode.sbatch)")


class CoordinationClient:
    """JAX's distributed client as the hang report uses its key-value store; `answers=False`: the service runs in a
    stopped process 0, and a call never returns."""

    def __init__(self, posted=(), answers=True):
        self.store, self.answers = {k: "2" for k in posted}, answers

    def key_value_set(self, key, value, allow_overwrite=False):
        if not self.answers:
            threading.Event().wait()
        self.store[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.store.items() if k.startswith(prefix + "/")]


def test_a_dead_peer_is_one_line():
    """C13: a collective that failed because its peer closed the connection -- gloo's words, seen when rank 1 of the
    contract's srun-style run was SIGKILLed after step 2 -- is the died-line, exit 1 (it was a traceback, then a C++
    abort from JAX's shutdown barrier at exit, waiting for the dead)."""
    cluster = load_common()
    for said in ("Read error [127.0.0.1]:409: Connection reset by peer", "Connection closed by peer [127.0.0.1]:2939"):
        error = RuntimeError(f"UNKNOWN: Gloo all-reduce failed: [external/gloo/gloo/transport/tcp/pair.cc:538] {said}")
        line, code = cluster.explain(error)
        assert code == 1 and line.startswith(f"lost contact with another rank (Gloo all-reduce failed: {said}): a "
                                             f"process or node of the job died"), line
    assert cluster.explain(RuntimeError("UNKNOWN: Gloo all-reduce failed: Timed out")) is None  # not a death
    assert cluster.explain(ValueError("Connection reset by peer")) is None  # a bug keeps its traceback


def test_a_silent_peer_is_named_through_the_coordination_service():
    """C13's naming in jax/ (the contract's SIGSTOP run is the real one): a stopped peer raises nothing, so the
    watchdog names whoever does not answer through JAX's coordination service, or nobody when the service itself
    (process 0) is stopped -- and returns."""
    cluster = load_common()

    def said(client, world_size=2, rank=0):
        return cluster.who_stopped_answering(client, rank, world_size, step=2, grace=0.2)

    assert said(CoordinationClient()) == ("rank 1 stopped answering (alive but not progressing, or gone without "
                                          "closing its connections)", [0])
    assert said(CoordinationClient({"recipe-hang/2"}), 4)[0].startswith("ranks 1,3 stopped answering")
    assert said(CoordinationClient({"recipe-hang/0"}), 2, 1)[0].startswith("every process answered: none stopped")
    silent, answered = said(CoordinationClient(answers=False))
    assert "cannot be named" in silent and answered is None
    # every process that answered leaves once all of them have said their line (process 0's exit would abort theirs)
    client = CoordinationClient({"recipe-hang-said/0"})
    cluster.leave_together(client, 2, [0, 2], grace=0.2)
    assert set(client.store) == {"recipe-hang-said/0", "recipe-hang-said/2"}


# ------------------------------------------------------------------------------------------ GPU facts (#22)
# This machine has no GPU: the GPU seams run in this process against a fake JAX that answers as a GPU node does,
# and keeps the one rule of real JAX that matters here -- jax.distributed.initialize refuses once anything used a
# device ("must be called before any JAX calls that might initialise the XLA backend").


class FakeJax(ModuleType):
    """JAX on a node with `gpus` CUDA devices, as far as the recipes' seams ask it; `start_error`: what starting the
    platform raises instead (a driver too old for the plugin, no device JAX can use)."""

    def __init__(self, gpus=4, start_error=None):
        super().__init__("jax")
        self.gpus, self.start_error = gpus, start_error
        self.used, self.settings, self.initialized = [], {}, []
        self.numpy = ModuleType("jax.numpy")
        self.config = SimpleNamespace(update=self.settings.__setitem__)
        self.distributed = SimpleNamespace(initialize=self._initialize, shutdown=lambda: None)

    def _use(self, what):
        self.used.append(what)
        if self.start_error is not None:
            raise self.start_error

    def default_backend(self):
        self._use("default_backend")
        return "gpu"

    def devices(self, backend=None):
        self._use("devices")
        return [SimpleNamespace(id=i, platform="gpu") for i in range(self.gpus)]

    def local_devices(self):
        self._use("local_devices")
        return self.devices()[:1]

    def process_index(self):
        self._use("process_index")
        return self.initialized[-1]["process_id"] if self.initialized else 0

    def process_count(self):
        self._use("process_count")
        return self.initialized[-1]["num_processes"] if self.initialized else 1

    def _initialize(self, coordinator=None, num_processes=None, process_id=None, local_device_ids=None, **kw):
        if self.used:
            raise RuntimeError("jax.distributed.initialize() must be called before any JAX calls that might "
                               f"initialise the XLA backend (already called: {self.used})")
        self.initialized.append(dict(coordinator=coordinator, num_processes=num_processes, process_id=process_id,
                                     local_device_ids=local_device_ids, platforms=self.settings.get("jax_platforms")))


@contextlib.contextmanager
def jax_folder(fake, environ):
    """jax/'s modules (toolkit, cluster, recipe and the three scripts), loaded in this process with `fake` in place
    of JAX and `environ` as the launcher's variables; sys.modules, the environment and the signal handlers as they
    were afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    launcher = [k for k in os.environ if k.startswith(("SLURM_", "JAX_", "CUDA_", "XLA_"))]
    with mock.patch.dict(sys.modules), mock.patch.dict(os.environ):
        for k in launcher:
            del os.environ[k]
        os.environ.update(environ)
        orbax = ModuleType("orbax")
        orbax.checkpoint = ModuleType("orbax.checkpoint")
        sys.modules.update({"jax": fake, "jax.numpy": fake.numpy, "optax": ModuleType("optax"), "orbax": orbax,
                            "orbax.checkpoint": orbax.checkpoint})
        modules = {}
        for name in ("toolkit", "cluster", "recipe", "single_gpu", "multigpu", "multinode"):
            spec = importlib.util.spec_from_file_location(name, FOLDER / f"{name}.py")
            sys.modules[name] = modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[name])
        try:
            yield SimpleNamespace(**modules)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)


def test_backend_nccl_initializes_jax_distributed_before_anything_uses_a_device():
    """--backend nccl on a GPU node: select_platform only configures (CUDA demanded), jax.distributed.initialize
    runs, and only then does anything ask JAX for a device. (It asked jax.default_backend() first: initialize
    refused, and every --backend nccl launch failed.)"""
    fake = FakeJax()
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0",
           "CUDA_VISIBLE_DEVICES": "0"}
    with jax_folder(fake, env) as m:
        rank, world_size, devices = m.multinode.setup(argparse.Namespace(backend="nccl", timeout=5))
    assert (rank, world_size, len(devices)) == (0, 1, 4)
    (init,) = fake.initialized
    assert init["process_id"] == 0 and init["platforms"] == "cuda"  # CUDA asked for before initialize, not after
    assert fake.used[:2] == ["process_index", "process_count"]  # the first device use came after initialize


def test_cuda_that_jax_cannot_start_is_one_line_not_a_cpu_run():
    """GPUs given (SLURM_GPUS_ON_NODE) and a CUDA plugin installed, but JAX cannot start CUDA: the recipe demands
    the cuda platform (JAX's default would log a warning and train on the CPU) and JAX's error becomes the C12
    line -- in single_gpu.py and after jax.distributed.initialize alike. Without GPUs given JAX picks; gloo: CPU."""
    error = RuntimeError("Unable to initialize backend 'cuda': FAILED_PRECONDITION: No visible GPU devices. "
                         "(set JAX_PLATFORMS='' to automatically choose an available backend)")
    for setup in ("single_gpu", "multigpu"):
        fake = FakeJax(start_error=error)
        with jax_folder(fake, {"SLURM_GPUS_ON_NODE": "2"}) as m:
            with mock.patch.object(m.recipe, "rendezvous", lambda *a: contextlib.nullcontext()):
                with pytest.raises(m.toolkit.RecipeError) as refused:
                    if setup == "single_gpu":
                        m.single_gpu.setup(argparse.Namespace(backend="auto", timeout=5))
                    else:
                        m.multigpu.setup(argparse.Namespace(backend="auto", timeout=5), 1, 2, "127.0.0.1:1")
        assert fake.settings["jax_platforms"] == "cuda", setup
        line = str(refused.value)
        assert line.startswith("SLURM_GPUS_ON_NODE=2, but JAX cannot start CUDA: Unable to initialize backend "
                               "'cuda': FAILED_PRECONDITION: No visible GPU devices;"), line
        assert "rather than training on the CPU" in line and "JAX_PLATFORMS" not in line and "\n" not in line
    for backend, environ, platforms in (("auto", {}, None), ("gloo", {"SLURM_GPUS_ON_NODE": "2"}, "cpu")):
        fake = FakeJax()
        with jax_folder(fake, environ) as m:
            m.single_gpu.setup(argparse.Namespace(backend=backend, timeout=5))
        assert fake.settings.get("jax_platforms") == platforms, backend


def test_gpu_probe_reads_the_installed_plugins_without_touching_a_device(tmp_path):
    """C12's probe for JAX: which cause it names -- no CUDA plugin installed (the CPU jaxlib of requirements.txt),
    a plugin but no NVIDIA device node (what JAX checks before starting CUDA) -- or none, from package metadata and
    device files alone: it runs before jax.distributed.initialize, which refuses once a device was used."""
    fake = FakeJax()
    plugin = importlib.metadata.EntryPoint("xla_cuda12", "jax_plugins.xla_cuda12", "jax_plugins")
    node = tmp_path / "nvidia0"
    with jax_folder(fake, {}) as m:
        with mock.patch("importlib.metadata.entry_points", return_value=[]):
            problem = m.cluster.gpu_problem()
        assert "has no CUDA plugin" in problem and 'pip install "jax[cuda13]' in problem, problem
        with mock.patch("importlib.metadata.entry_points", return_value=[plugin]), \
                mock.patch.object(m.cluster, "NVIDIA_DEVICES", (str(node),), create=True):
            problem = m.cluster.gpu_problem()
            assert "xla_cuda12" in problem and "no NVIDIA device" in problem and str(node) in problem, problem
            node.touch()
            assert m.cluster.gpu_problem() == ""
    assert fake.used == [] and fake.settings == {}


SMOKE = ["--epochs", "2", "--dataset-size", "16", "--batch-size", "4", "--log-every", "1"]


def test_gpus_without_a_cuda_jaxlib_stop_with_one_line(tmp_path):
    """No silent CPU (C12): this machine's jaxlib is requirements.txt's CPU build. Given GPUs, single_gpu.py stops
    with one line naming them and the cause, and writes nothing (it trained on the CPU without a word)."""
    ckpt = tmp_path / "D"
    line, _ = failing("single_gpu.py", *SMOKE, "--checkpoint-dir", ckpt, env=jax_env(SLURM_GPUS_ON_NODE=2))
    assert line.startswith("[rank0] error: SLURM_GPUS_ON_NODE=2, but jaxlib 0.10.2 has no CUDA plugin"), line
    assert 'pip install "jax[cuda13]==0.10.2"' in line and "rather than training on the CPU" in line, line
    assert not ckpt.exists()


def test_backend_nccl_without_a_cuda_jaxlib_stops_before_anything_else(tmp_path):
    """--backend nccl: the spawner stops before it starts a process, multinode.py before it looks for its launch
    variables (none set here) -- the refusal comes first, right after the command line (in this process: cheap)."""
    for script in ("multigpu", "multinode"):
        with jax_folder(FakeJax(), {}) as m, \
                mock.patch.object(sys, "argv", [f"{script}.py", *SMOKE, "--backend", "nccl",
                                                "--checkpoint-dir", str(tmp_path / "D")]), \
                mock.patch.object(m.multigpu, "spawn", side_effect=AssertionError("spawned")):
            with pytest.raises(m.toolkit.RecipeError) as refused:
                getattr(m, script).main()
        assert str(refused.value).startswith("--backend nccl, but jaxlib"), str(refused.value)
        assert "has no CUDA plugin" in str(refused.value) and not (tmp_path / "D").exists()


def test_multigpu_gives_each_process_its_own_gpu(tmp_path):
    """multigpu.py's processes each drive one GPU (local_device_ids), also without CUDA_VISIBLE_DEVICES (the
    driver's GPU list counts them): without it every process started every GPU and preallocated 75 % of each
    one's memory -- the second process ran out of memory. --nprocs above the GPUs: the sharers split the 75 %."""
    listed = tmp_path / "gpus"  # /proc/driver/nvidia/gpus: one directory per GPU, named by its PCI address
    for i in range(4):
        (listed / f"0000:{i + 1:02x}:00.0").mkdir(parents=True)

    def processes(environ, nprocs=None):
        fake = FakeJax()
        with jax_folder(fake, environ) as m, \
                mock.patch.object(m.cluster, "NVIDIA_GPU_LIST", str(listed), create=True), \
                mock.patch.object(m.recipe, "rendezvous", lambda *a: contextlib.nullcontext()):
            nprocs = nprocs or m.cluster.default_nprocs()
            plan = []
            for i in range(nprocs):
                fake.used.clear()
                m.multigpu.setup(argparse.Namespace(backend="auto", timeout=5), i, nprocs, "127.0.0.1:1")
                plan.append((fake.initialized[-1]["local_device_ids"], os.environ.get("XLA_CLIENT_MEM_FRACTION")))
            return plan

    assert processes({}) == [([i], None) for i in range(4)]  # no CUDA_VISIBLE_DEVICES: the node's 4 GPUs
    assert processes({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b,GPU-c,GPU-d"}) == [([i], None) for i in range(4)]
    assert processes({"CUDA_VISIBLE_DEVICES": "6,7"}, nprocs=4) == [([i % 2], "0.375") for i in range(4)]
    assert processes({"CUDA_VISIBLE_DEVICES": "6,7", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, nprocs=4) == \
        [([i % 2], None) for i in range(4)]  # the user's own memory settings win


def test_every_recipe_script_is_exercised():
    """Guard: a new script in jax/ must get a test here (or a run in tests/recipes.py's table)."""
    assert scripts_not_run("jax", __file__) == set()
