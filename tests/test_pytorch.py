"""pytorch/ recipes, launched for real on CPU with gloo: FSDP, data, resume, bad input. Every launch mode against one
process with the global batch is tests/test_behaviour.py's (tests/recipes.py's runs, shared with this file)."""

import contextlib
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest
import torch
from data_files import cifar_md5_env, write_cifar10, write_mnist
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port, run,
                     run_killing_a_worker_twice, torchrun, torchrun_workers, with_teardown_check,
                     with_torchvision_shim)
from recipes import RECIPES, scripts_not_run, wait_all

pytestmark = [pytest.mark.pytorch, pytest.mark.timeout(300)]

PT = ROOT / "pytorch"
# 512 samples: 16 steps per epoch for 2 ranks x batch 16 (or 1 rank x batch 32).
SMALL = ["--epochs", "2", "--dataset-size", "512", "--log-every", "1000"]
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 reduction order (DDP's bucketed all-reduce) is the only difference


def python(*args, **kw):
    return run([env_python("pytorch"), *args], **kw)


def torchrun_standalone(script, nproc, *args, **kw):
    return run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", str(nproc), PT / script, *args], **kw)


def model_of(ckpt_dir):
    return torch.load(ckpt_dir / "snapshot.pt", map_location="cpu", weights_only=True)["model"]


def losses(out):
    return [e.loss for e in epoch_lines(out)]


# ------------------------------------------------------------------------------------------ reference runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 32: what every 2-rank run with batch 16 per rank must reproduce (tests/recipes.py's run,
    shared with test_behaviour.py)."""
    ran = RECIPES["pytorch"].run(tmp_path_factory, "reference")
    return model_of(ran.ckpt), ran.out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """torchrun, 2 ranks x batch 16 (shared with test_behaviour.py, which compares it with `reference`)."""
    ran = RECIPES["pytorch"].run(tmp_path_factory, "torchrun")
    return ran.ckpt, ran.out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """fsdp.py, 2 ranks x batch 16, uninterrupted: (checkpoint dir, output, its last step's weights as one plain
    state dict, made with the tool the fsdp.py docstring tells users about). test_fsdp_equals_ddp compares it with
    DDP, test_fsdp_resume_matches_uninterrupted with a stopped and resumed run: one launch for both."""
    ckpt = tmp_path_factory.mktemp("fsdp") / "ckpt"
    out = torchrun_standalone("fsdp.py", 2, *SMALL, "--batch-size", "16", "--checkpoint-dir", ckpt).stdout
    python("-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", ckpt / "step-00000032", ckpt / "full.pt")
    return ckpt, out, torch.load(ckpt / "full.pt", weights_only=False)["model"]


@pytest.fixture(scope="module")
def stopped_at_20(tmp_path_factory):
    """(script, dir) -> dir: a copy of `script`'s checkpoint of 2 ranks x batch 16 stopped by --max-steps 20 (mid-epoch
    2), trained once per script for every test that resumes it (each resumes its own copy)."""
    trained = {}

    def copy(script, to):
        if script not in trained:
            trained[script] = tmp_path_factory.mktemp(f"{script.removesuffix('.py')}-20") / "ckpt"
            torchrun_standalone(script, 2, *SMALL, "--batch-size", "16", "--checkpoint-dir", trained[script],
                                "--max-steps", "20")
        shutil.copytree(trained[script], to)
        return to
    return copy


def test_single_gpu_learns_and_writes_a_complete_snapshot(tmp_path):
    out = python(PT / "single_gpu.py", "--epochs", "3", "--dataset-size", "512", "--batch-size", "16",
                 "--lr", "0.1", "--checkpoint-dir", tmp_path).stdout
    assert len(epoch_lines(out)) == 3, out
    first, *_, last = losses(out)
    assert last < first * 0.9, f"loss did not decrease: {losses(out)}"
    snap = torch.load(tmp_path / "snapshot.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng"} <= snap.keys()
    assert (snap["epoch"], snap["step"]) == (3, 96)
    assert (tmp_path / "snapshot.prev.pt").exists() and not (tmp_path / "snapshot.pt.tmp").exists()


def test_fsdp_equals_ddp(fsdp_run, ddp_run):
    ckpt, out, full = fsdp_run
    assert "sharded checkpoint saved" in out
    latest = (ckpt / "latest").read_text().strip()
    assert latest == "step-00000032" and sorted(p.name for p in ckpt.glob("step-*")) == [
        "step-00000016", "step-00000032"]
    assert_same_weights(full, model_of(ddp_run[0]), **TOL)


def test_fsdp_resume_matches_uninterrupted(fsdp_run, stopped_at_20, tmp_path):
    resumed = stopped_at_20("fsdp.py", tmp_path / "resumed")
    out = torchrun_standalone("fsdp.py", 2, *SMALL, "--batch-size", "16", "--checkpoint-dir", resumed).stdout
    assert "resumed from" in out and "step 20" in out
    python("-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", resumed / "step-00000032",
           resumed / "full.pt")
    assert_same_weights(fsdp_run[2], torch.load(resumed / "full.pt", weights_only=False)["model"])


def full_model(ckpt_dir):
    """The weights of an FSDP checkpoint directory's latest step, as one plain state dict."""
    step = (ckpt_dir / "latest").read_text().strip()
    python("-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch", ckpt_dir / step, ckpt_dir / "full.pt")
    return torch.load(ckpt_dir / "full.pt", weights_only=False)["model"]


def test_fsdp_resume_with_another_world_size(reference, stopped_at_20, tmp_path):
    """FSDP's sharded checkpoint resumed by another number of ranks: DCP reshards weights and optimizer state,
    and the data position moves as for DDP. 1 x 32 -> 2 x 16 ends with the uninterrupted 1 x 32 weights;
    2 x 16 -> 1 x 16 continues after the same 128 samples with 32 steps per epoch (before: fsdp.py reused the
    per-rank batch count -- 64 samples, the schedule's T_max of the old layout)."""
    up = tmp_path / "up"
    torchrun_standalone("fsdp.py", 1, *SMALL, "--batch-size", "32", "--checkpoint-dir", up, "--max-steps", "20")
    out = torchrun_standalone("fsdp.py", 2, *SMALL, "--batch-size", "16", "--checkpoint-dir", up).stdout
    assert "snapshot written by 1 rank(s) x batch 32, resuming as 2 x 16: epoch 2 after 128 samples (step 20)" in out
    assert_same_weights(full_model(up), reference[0], **TOL)

    down = stopped_at_20("fsdp.py", tmp_path / "down")
    proc = torchrun_standalone("fsdp.py", 1, *SMALL, "--batch-size", "48", "--checkpoint-dir", down,
                               expect_fail=True)
    assert "written by 2 rank(s) x batch 16 after 128 samples of epoch 2" in proc.stdout, proc.stdout
    out = torchrun_standalone("fsdp.py", 1, *SMALL, "--batch-size", "16", "--checkpoint-dir", down).stdout
    assert "resuming as 1 x 16: epoch 2 after 128 samples (step 40)" in out and "done: 64 steps" in out, out
    assert (down / "latest").read_text().strip() == "step-00000064"


# ------------------------------------------------------------------------------------------ data


# The tail of a wrapper script: run the recipe script given as its first argument, as `python script ...` would.
RUN_THE_SCRIPT = """
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""

RECORDER = """
import json, os, runpy, sys
from torch.utils.data.distributed import DistributedSampler
_iter = DistributedSampler.__iter__
def recording_iter(self):
    indices = list(_iter(self))
    with open(os.path.join(os.environ["RECORD_DIR"], f"rank{self.rank}.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": self.epoch, "indices": indices}) + "\\n")
    return iter(indices)
DistributedSampler.__iter__ = recording_iter
""" + RUN_THE_SCRIPT


def test_ranks_see_disjoint_shards_reshuffled_every_epoch(tmp_path):
    """Records what DistributedSampler hands each rank inside the real training loop of the recipe."""
    recorder = tmp_path / "record.py"
    recorder.write_text(RECORDER)
    run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", recorder, PT / "multigpu_torchrun.py",
         "--epochs", "3", "--dataset-size", "512", "--batch-size", "16"], env=clean_env(RECORD_DIR=tmp_path))
    seen = {r: [json.loads(ln) for ln in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert [e["epoch"] for e in seen[0]] == [0, 1, 2], "set_epoch() must be called every epoch"
    for epoch in range(3):
        a, b = set(seen[0][epoch]["indices"]), set(seen[1][epoch]["indices"])
        assert not a & b, "ranks overlap"
        assert a | b == set(range(512)), "shards do not cover the dataset"
    assert seen[0][0]["indices"] != seen[0][1]["indices"] != seen[0][2]["indices"], "same shuffle every epoch"


def test_mnist_through_torchvision_on_two_ranks(tmp_path):
    """Rank 0 'downloads' (finds the files), the other waits at the barrier and then reads them."""
    write_mnist(tmp_path)
    env = with_torchvision_shim(clean_env())
    out = run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", PT / "multigpu_torchrun.py",
               "--data", "mnist", "--data-dir", tmp_path, "--epochs", "1", "--batch-size", "32",
               "--num-workers", "1"], env=env).stdout
    assert "256 samples" in out and "samples/s" in out


@pytest.fixture
def mnist_mirror(tmp_path):
    """MNIST's four .gz files (generated, in the real format) served over HTTP on this host; yields the env that
    points torchvision's download at it and the list of files requested so far."""
    src = write_mnist(tmp_path / "generated") / "MNIST" / "raw"
    mirror, md5, requests = tmp_path / "mirror", {}, []
    mirror.mkdir()
    for raw in src.iterdir():
        gz = mirror / f"{raw.name}.gz"
        gz.write_bytes(gzip.compress(raw.read_bytes()))
        md5[gz.name] = hashlib.md5(gz.read_bytes()).hexdigest()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(mirror), **kw)

        def log_message(self, *args):
            # torchvision first probes for redirects with a GET that says "Method: HEAD" and reads nothing
            if self.headers.get("Method") != "HEAD":
                requests.append(self.path.lstrip("/"))

        def handle(self):
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # that probe hangs up early
                super().handle()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"TEST_MNIST_MIRROR": f"http://127.0.0.1:{server.server_address[1]}/", "TEST_MNIST_MD5": json.dumps(md5),
           "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    yield env, requests
    server.shutdown()


def test_mnist_downloaded_once_per_copy_of_the_data_dir(mnist_mirror, tmp_path):
    """Two nodes whose --data-dir is node-local (a relative path resolved in two working directories): the first
    rank of each node downloads its own copy. (Before: only rank 0 downloaded, and the other node's rank stopped
    with "cannot load mnist".) Two ranks of one node on one directory: one download, the other rank waits."""
    env, requests = mnist_mirror
    files = sorted(json.loads(env["TEST_MNIST_MD5"]))
    port, procs = free_port(), []
    for node in range(2):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        procs.append(subprocess.Popen(
            [str(env_python("pytorch")), str(PT / "multinode.py"), "--data", "mnist", "--data-dir", "data",
             "--epochs", "1", "--batch-size", "16", "--timeout", "60"],
            env=with_torchvision_shim(clean_env(SLURM_PROCID=node, SLURM_LOCALID=0, SLURM_NTASKS=2,
                                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env)),
            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True))
    codes, outs = wait_all(procs, timeout=180)
    assert codes == [0, 0], outs
    assert "[rank0] world size 2" in outs[0] and "done: 8 steps" in outs[0], outs[0]
    assert sorted(requests) == sorted(files * 2), requests
    for node in range(2):
        assert (tmp_path / f"node{node}" / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()

    requests.clear()
    shared = tmp_path / "shared"
    run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", PT / "multigpu_torchrun.py",
         "--data", "mnist", "--data-dir", shared, "--epochs", "1", "--batch-size", "16"],
        env=with_torchvision_shim(clean_env(**env)))
    assert sorted(requests) == files, requests


def test_cifar10_through_torchvision(tmp_path):
    _, md5 = write_cifar10(tmp_path)
    env = with_torchvision_shim(clean_env(**cifar_md5_env(md5)))
    out = python(PT / "single_gpu.py", "--data", "cifar10", "--data-dir", tmp_path, "--epochs", "1",
                 "--batch-size", "32", "--checkpoint-dir", tmp_path / "ckpt", env=env).stdout
    assert "320 samples" in out  # 5 training batches of 64
    first_conv = model_of(tmp_path / "ckpt")["features.0.weight"]
    assert first_conv.shape[1] == 3  # the model was built for RGB input


# ------------------------------------------------------------------------------------------ resume


def test_stop_and_resume_equals_uninterrupted(ddp_run, stopped_at_20, tmp_path):
    # stop mid-epoch 2 (step 20 of 32), then resume: skipped batches, LR schedule, momentum all line up
    resumed = stopped_at_20("multigpu_torchrun.py", tmp_path / "resumed")
    out = torchrun_standalone("multigpu_torchrun.py", 2, *SMALL, "--batch-size", "16",
                              "--checkpoint-dir", resumed).stdout
    assert "resumed from" in out and "epoch 2, step 20" in out
    assert_same_weights(model_of(resumed), model_of(ddp_run[0]))


def test_resume_is_bit_exact_with_four_ranks(tmp_path):
    """With more than 2 ranks the order in which DDP sums gradients depends on its bucket layout, which DDP
    rebuilds after the first backward of every process; the recipes settle it before the first resumed step."""
    args = ["--epochs", "2", "--dataset-size", "1024", "--batch-size", "16", "--log-every", "1000"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    torchrun_standalone("multigpu_torchrun.py", 4, *args, "--checkpoint-dir", straight)
    torchrun_standalone("multigpu_torchrun.py", 4, *args, "--checkpoint-dir", resumed, "--max-steps", "5")
    torchrun_standalone("multigpu_torchrun.py", 4, *args, "--checkpoint-dir", resumed)
    assert_same_weights(model_of(resumed), model_of(straight))


def test_resume_with_another_world_size(reference, stopped_at_20, tmp_path):
    """A run requeued onto another number of ranks (or another batch): 1 x 32 -> 2 x 16 (same global batch)
    resumes mid-epoch and ends with the weights of the uninterrupted 1 x 32 run; 2 x 16 -> 1 x 16 (half the
    global batch) continues after the same samples, with twice the steps per epoch and the cosine schedule
    ending at 0; a shape that cannot continue after those samples is refused in one line. (Before: the per-rank
    batch count was reused as is -- trained on other samples, 48 steps instead of 64, the LR curve rising again
    past its old T_max.)"""
    up = tmp_path / "up"
    python(PT / "single_gpu.py", *SMALL, "--batch-size", "32", "--checkpoint-dir", up, "--max-steps", "20")
    out = torchrun_standalone("multigpu_torchrun.py", 2, *SMALL, "--batch-size", "16", "--checkpoint-dir", up).stdout
    assert "snapshot written by 1 rank(s) x batch 32, resuming as 2 x 16: epoch 2 after 128 samples (step 20)" in out
    assert_same_weights(model_of(up), reference[0], **TOL)

    down = stopped_at_20("multigpu_torchrun.py", tmp_path / "down")
    proc = python(PT / "single_gpu.py", *SMALL, "--batch-size", "48", "--checkpoint-dir", down, expect_fail=True)
    errors = [ln for ln in proc.stdout.splitlines() if re.match(r"(\[rank\d+\] )?error: ", ln)]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stdout, proc.stdout
    assert "written by 2 rank(s) x batch 16 after 128 samples of epoch 2" in errors[0], errors
    out = python(PT / "single_gpu.py", *SMALL, "--batch-size", "16", "--checkpoint-dir", down).stdout
    assert "resuming as 1 x 16: epoch 2 after 128 samples (step 40)" in out and "done: 64 steps" in out, out
    snap = torch.load(down / "snapshot.pt", map_location="cpu", weights_only=True)
    assert snap["step"] == 64 and snap["optimizer"]["param_groups"][0]["lr"] < 1e-6


SLOW_SAVE = """\
import os, time
if os.environ.get("RANK") == "0":  # torchrun's rank-0 worker only
    import torch
    _save = torch.save
    def slow_save(*args, **kwargs):  # a snapshot written to a slow shared filesystem
        time.sleep(20)
        return _save(*args, **kwargs)
    torch.save = slow_save
"""


def test_a_snapshot_save_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 alone writes the snapshot while the other ranks wait. A save slower than --timeout (the deadline of
    rendezvous and collectives: a dead peer must be an error within it) must not kill them: they wait up to
    --io-timeout. (Before: rank 1 waited in a barrier of the training group and failed after --timeout.)"""
    shim = tmp_path / "slow_save"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_SAVE)
    out = run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", PT / "multigpu_torchrun.py",
               "--epochs", "1", "--dataset-size", "256", "--batch-size", "16", "--timeout", "8",
               "--checkpoint-dir", tmp_path / "ckpt"], env=clean_env(PYTHONPATH=shim)).stdout
    assert "snapshot saved" in out and "done: 8 steps" in out, out


def test_rendezvous_deadline_is_separate_from_the_collective_one(tmp_path):
    """Rank 1 starts 20 s after rank 0 (a slow node, a container pull), longer than --timeout 8: with
    --rendezvous-timeout 90 both meet and train, and the collectives keep their 8 s deadline. (Before: one
    deadline for both; rank 0 gave up on the rendezvous after --timeout.)"""
    port = free_port()
    args = [*SMALL, "--batch-size", "16", "--timeout", "8", "--rendezvous-timeout", "90"]
    procs = RECIPES["pytorch"].srun(args, 1, port, extra_env={"SLURM_NTASKS": 2})  # rank 0 of 2
    time.sleep(20)
    env = with_teardown_check(clean_env(SLURM_PROCID=1, SLURM_LOCALID=1, SLURM_NTASKS=2, MASTER_ADDR="127.0.0.1",
                                        MASTER_PORT=port))
    procs.append(subprocess.Popen([str(env_python("pytorch")), str(PT / "multinode.py"), *args], env=env, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True))
    codes, outs = wait_all(procs)
    assert codes == [0, 0] and "done: 32 steps" in outs[0], "\n".join(outs)


def test_torchrun_max_restarts_resumes_from_the_last_snapshot(ddp_run, tmp_path):
    """A worker killed (kill -9) twice: torchrun --max-restarts restarts both workers, they resume from the last
    snapshot, and the run ends with the weights of the uninterrupted one. Without a key prefix per attempt
    (cluster.rendezvous_store) about 2 restarts in 5 failed in gloo's connectFullMesh with "Connection
    refused" (the restarted workers read the dead ones' addresses from the agent's store)."""
    cmd = [*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", "--max-restarts", "2",
           PT / "multigpu_torchrun.py", *SMALL, "--batch-size", "16", "--timeout", "60", "--checkpoint-dir", tmp_path]
    code, out, kills = run_killing_a_worker_twice(cmd)
    assert kills == 2 and code == 0, out[-4000:]
    assert out.count("resumed from") == 2 and "Connection refused" not in out, out[-4000:]
    assert_same_weights(model_of(tmp_path), model_of(ddp_run[0]))


@pytest.fixture
def two_snapshots(tmp_path):
    python(PT / "single_gpu.py", *SMALL, "--batch-size", "32", "--checkpoint-dir", tmp_path)
    return tmp_path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_snapshot_falls_back_to_the_previous_one(two_snapshots):
    truncate(two_snapshots / "snapshot.pt")
    out = python(PT / "single_gpu.py", *SMALL, "--batch-size", "32", "--checkpoint-dir", two_snapshots).stdout
    assert f"{two_snapshots / 'snapshot.pt'} is unreadable" in out
    assert "resumed from" in out and "snapshot.prev.pt" in out and "epoch 2, step 16" in out


def test_truncated_snapshot_without_fallback_is_a_clear_error(two_snapshots):
    (two_snapshots / "snapshot.prev.pt").unlink()
    truncate(two_snapshots / "snapshot.pt")
    proc = python(PT / "single_gpu.py", *SMALL, "--checkpoint-dir", two_snapshots, expect_fail=True, timeout=60)
    assert proc.returncode == 2
    assert "error: no usable snapshot" in proc.stdout and str(two_snapshots / "snapshot.pt") in proc.stdout
    assert "Traceback" not in proc.stdout


# ------------------------------------------------------------------------------------------ bad input


def test_amp_bf16_runs_on_cpu(tmp_path):
    out = python(PT / "single_gpu.py", "--amp", "--epochs", "1", "--dataset-size", "256", "--batch-size", "32").stdout
    assert all(loss == loss and loss < 10 for loss in losses(out))  # finite


AMP_RULE = """
from unittest import mock
import torch
from cluster import mixed_precision
for capability in [(7, 0), (7, 5), (8, 0), (9, 0)]:
    with mock.patch("torch.cuda.get_device_capability", return_value=capability), \\
         mock.patch("torch.cuda.is_bf16_supported", return_value=True):  # True on V100/T4 too (emulation)
        autocast, scaler = mixed_precision(torch.device("cuda", 0), True)
        print(capability, "fp16+scaler" if scaler is not None else "bf16")
print("cpu", "bf16" if mixed_precision(torch.device("cpu"), True)[1] is None else "fp16+scaler")
print("off", mixed_precision(torch.device("cpu"), False)[0]() is not None)
"""


def test_amp_rule_bf16_only_where_native():
    """--amp picks bf16 by compute capability, never by is_bf16_supported() (which counts emulation)."""
    out = [ln for ln in python("-W", "ignore", "-c", AMP_RULE, cwd=PT).stdout.splitlines() if ln[:1] in "(co"]
    assert out == ["(7, 0) fp16+scaler", "(7, 5) fp16+scaler", "(8, 0) bf16", "(9, 0) bf16", "cpu bf16",
                       "off True"]


def test_fsdp_amp_runs_with_its_mixed_precision_policy(tmp_path):
    """FSDP2 --amp: bf16 weights in compute, fp32 gradient reduction; trains and checkpoints."""
    out = torchrun_standalone("fsdp.py", 2, "--amp", "--epochs", "1", "--dataset-size", "256", "--batch-size", "16",
                              "--checkpoint-dir", tmp_path).stdout
    assert all(loss == loss and loss < 10 for loss in losses(out))
    assert (tmp_path / "latest").exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "mnist"], "--data mnist needs --data-dir"),
    (["--batch-size", "0"], "must be a positive integer"),
])
def test_bad_arguments_are_rejected_up_front(argv, message):
    proc = python(PT / "multigpu_torchrun.py", *argv, expect_fail=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stdout


def test_world_size_larger_than_the_dataset():
    proc = torchrun_standalone("multigpu_torchrun.py", 2, "--dataset-size", "1", "--batch-size", "1",
                               expect_fail=True, timeout=120)
    assert "the dataset has 1 samples but the world size is 2" in proc.stdout


def test_world_size_without_rank():
    proc = python(PT / "multigpu_torchrun.py", env=clean_env(WORLD_SIZE=2), expect_fail=True, timeout=60)
    assert proc.returncode == 2
    assert "RANK, LOCAL_RANK not set: launch with `torchrun" in proc.stdout and "Traceback" not in proc.stdout


def test_checkpoint_dir_not_shared_by_every_rank_is_one_clear_error(tmp_path):
    """A relative --checkpoint-dir resolved in two different working directories stands for a node-local path:
    rank 1 cannot see rank 0's files. Every rank stops with one line naming who cannot see it, not a traceback
    on one rank and a hang until --timeout on the other."""
    port, procs = free_port(), []
    for rank in range(2):
        cwd = tmp_path / f"node{rank}"
        cwd.mkdir()
        env = clean_env(SLURM_PROCID=rank, SLURM_LOCALID=rank, SLURM_NTASKS=2, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)
        procs.append(subprocess.Popen([str(env_python("pytorch")), str(PT / "multinode.py"), *SMALL,
                                       "--checkpoint-dir", "ckpt", "--timeout", "60"], env=env, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    codes, outs = wait_all(procs, timeout=120)
    assert codes == [2, 2], outs
    for out in outs:
        assert "is not shared: rank 1 on" in out and "Traceback" not in out, out


def test_a_rank_lost_mid_training_is_one_clear_line(tmp_path):
    """kill -9 of one rank (its node died): the survivor's next all-reduce fails. It must say so in one line and
    exit non-zero -- not a traceback wall from inside DDP's backward hook. (Before: 40 lines of traceback ending
    in gloo's "Read error ... Connection reset by peer. ... GLHF!")"""
    procs = RECIPES["pytorch"].srun([*SMALL[:-2], "--epochs", "100", "--log-every", "1", "--checkpoint-dir", tmp_path,
                                     "--timeout", "60"], 2, free_port())
    try:
        for line in procs[0].stdout:
            if "| step 4 |" in line:
                os.killpg(procs[1].pid, signal.SIGKILL)
                break
        out = line + procs[0].communicate(timeout=120)[0]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
    errors = [ln for ln in out.splitlines() if re.match(r"(\[rank\d+\] )?error: ", ln)]
    assert procs[0].returncode == 1 and len(errors) == 1 and "Traceback" not in out, out
    assert "lost contact with another rank" in errors[0] and "Connection" in errors[0], errors


def test_srun_style_without_master_addr():
    env = {"SLURM_PROCID": 0, "SLURM_LOCALID": 0, "SLURM_NTASKS": 1}
    proc = python(PT / "multinode.py", env=clean_env(**env), expect_fail=True, timeout=60)
    assert "MASTER_ADDR and MASTER_PORT not set" in proc.stdout and "scontrol show hostnames" in proc.stdout


def test_every_recipe_script_is_exercised():
    """Guard: a new script in pytorch/ must get a test here (or a run in tests/recipes.py's table)."""
    assert scripts_not_run("pytorch", __file__) == set()


def pytorch_module(name, monkeypatch):
    """pytorch/<name>.py imported in this process (its own `cluster`/`toolkit`, not another folder's)."""
    import importlib
    import sys
    monkeypatch.syspath_prepend(str(PT))
    for module in ("cluster", "toolkit", "recipe", name):
        monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(name)


def test_the_io_wait_group_is_connected_at_start_up(monkeypatch):
    """#22: the gloo group the ranks wait in while rank 0 writes a snapshot was made lazily, at the first snapshot:
    the first cross-node gloo connection of a GPU job came at the end of epoch 1, and a node whose hostname
    resolves to 127.0.1.1 failed there, after an epoch of work, and again after every requeue. It is now
    connected with the process group, and a gloo connection that fails is one line (torch's answers patched)."""
    from datetime import timedelta

    cluster = pytorch_module("cluster", monkeypatch)
    made = []
    monkeypatch.setattr(cluster.dist, "new_group", lambda **kw: made.append(kw) or object())
    cluster.io_group.cache_clear()
    with cluster.explained_rendezvous(0, 2, 30, io_timeout=1800):
        assert not made, "connected before the process group exists"
    assert made == [{"backend": "gloo", "timeout": timedelta(seconds=1800)}]

    def refused(**kw):
        raise RuntimeError("Gloo connectFullMesh failed with [../gloo/transport/tcp/pair.cc:144] Connection refused")

    monkeypatch.setattr(cluster.dist, "new_group", refused)
    cluster.io_group.cache_clear()
    with pytest.raises(cluster.RecipeError, match="cannot connect to each other over gloo: does every node's host"):
        with cluster.explained_rendezvous(0, 2, 30, io_timeout=1800):
            pass
    cluster.io_group.cache_clear()


SLOW_DCP_SAVE = """
import os, runpy, sys, time
import torch.distributed.checkpoint as dcp
_save = dcp.save
def slow_save(*args, **kwargs):
    if os.environ["RANK"] == "1":
        time.sleep(float(os.environ["SLOW_SAVE_S"]))  # a slow shared filesystem, on one rank
    return _save(*args, **kwargs)
dcp.save = slow_save
""" + RUN_THE_SCRIPT


def test_fsdp_checkpoint_waits_are_bounded_by_io_timeout_not_timeout(tmp_path):
    """#22: DCP's save and the wait after it ran on the training process group, so a shard write slower than
    --timeout (the NCCL watchdog's deadline on GPUs; gloo's here) killed the job mid-save. They now go over the
    gloo I/O group, bounded by --io-timeout: one rank's save 20 s late with --timeout 8 completes."""
    wrapper = tmp_path / "slow_save.py"
    wrapper.write_text(SLOW_DCP_SAVE)
    out = run([*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", wrapper, PT / "fsdp.py", "--epochs", "1",
               "--dataset-size", "64", "--batch-size", "16", "--log-every", "1000", "--timeout", "8",
               "--rendezvous-timeout", "120", "--checkpoint-dir", tmp_path / "ckpt"],
              env=clean_env(SLOW_SAVE_S=20), timeout=180).stdout
    assert "sharded checkpoint saved" in out and "done: 2 steps" in out, out[-3000:]


def test_tf32_is_on_for_fp32_matmuls_and_convolutions(monkeypatch):
    """C10: allow_tf32() puts fp32 matmuls (off by default) and convolutions in TF32, and leaves torch's global
    setting readable: per-backend fp32_precision settings made torch.get_float32_matmul_precision() raise ("mix
    of the legacy and new APIs"), which Lightning and torch.compile call on GPUs."""
    cluster = pytorch_module("cluster", monkeypatch)
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = torch.get_float32_matmul_precision()
    try:
        cluster.allow_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_hung_worker_under_torchrun_ends_with_evidence(tmp_path):
    """C13 under torchrun (#23; the contract's test starts srun-style tasks): worker rank 1 is stopped (SIGSTOP) after
    step 2. Rank 0's next collective runs out --timeout 5; it writes its stack into <ckpt>/debug/<torchrun's run
    id>/, prints one line naming rank 1 as the rank that stopped answering, and exits 1; torchrun's agent then ends
    the stopped worker and the job exits non-zero within --timeout + 60 s (not at some later watchdog)."""
    ckpt = tmp_path / "ckpt"
    cmd = [*torchrun("pytorch"), "--standalone", "--nproc_per_node", "2", PT / "multigpu_torchrun.py",
           "--epochs", "100", "--dataset-size", "512", "--log-every", "1", "--timeout", "5", "--checkpoint-dir", ckpt]
    agent = subprocess.Popen([str(c) for c in cmd], cwd=PT, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, stopped = "", None
    try:
        for line in agent.stdout:
            out += line
            if re.search(r"\| step 2 \|", line):
                stopped = torchrun_workers(agent.pid)[1]
                os.kill(stopped, signal.SIGSTOP)
                break
        out += agent.communicate(timeout=5 + 60)[0]  # the bound is the test: a hang fails below
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running 65 s after rank 1 stopped\n{out[-3000:]}", pytrace=False)
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, sig)
        agent.wait()
    assert stopped and agent.returncode not in (0, None), f"exit {agent.returncode}\n{out[-3000:]}"
    errors = re.findall(r"^\[rank0\] error: .*$", out, re.M)
    assert len(errors) == 1 and "rank 1 stopped answering" in errors[0] and "died" not in errors[0], out[-3000:]
    assert "within --timeout 5 s" in errors[0], errors[0]
    stacks = list(ckpt.glob("debug/*/rank0.stack.txt"))
    assert len(stacks) == 1 and stacks[0].read_text().startswith("rank 0 of 2, "), (stacks, out[-2000:])
