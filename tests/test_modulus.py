"""modulus/ recipes (PhysicsNeMo FNO on Darcy flow), launched for real on CPU with gloo: emulated Slurm, preemption
-> resume == uninterrupted, the real Darcy file format, learning, and bad input. 2 ranks == 1 process with the
global batch, under torchrun and the spawner, is tests/test_behaviour.py's.

No test-only shim: the recipes import physicsnemo on this CPU machine by themselves (see modulus/README.md,
"torchvision on a CPU machine").
"""

import json
import re
import signal

import numpy as np
import pytest
import torch
from forked import forked_each
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port, run, teardown_checked,
                     torchrun)
from recipes import (NO_SILENT_CPU_CHECK, PROBE_CHECKS, RECIPES, TF32_CHECK, assert_no_silent_cpu, scripts_not_run,
                     wait_all)

pytestmark = [pytest.mark.modulus, pytest.mark.timeout(300)]

MOD = ROOT / "modulus"
# 128 samples: 8 steps per epoch for 1 process x batch 16 or 2 ranks x batch 8; 16 steps in all.
SMALL = ["--epochs", "2", "--dataset-size", "128", "--log-every", "1"]
# 2 ranks sum their gradients in another order than 1 process (gloo all_reduce): float32 rounding, amplified a
# little by Adam over 16 steps.
TOL = dict(rtol=1e-4, atol=1e-5)
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


def env(**extra):
    return clean_env(**extra)


def python(*args, **kw):
    kw.setdefault("env", env())
    return run([env_python("modulus"), *args], **kw)


def torchrun_standalone(script, nproc, *args, **kw):
    kw.setdefault("env", env())
    return run([*torchrun("modulus"), "--standalone", "--nproc_per_node", str(nproc), MOD / script, *args], **kw)


def snapshot(ckpt_dir):
    return torch.load(ckpt_dir / "snapshot.pt", map_location="cpu", weights_only=True)


def epochs(out):
    """(epoch, step, loss, rel_l2) of every epoch line, which must match the contract's format exactly."""
    rows = epoch_lines(out)
    assert all(e.metric == "rel_l2" for e in rows), rows
    return [(e.epoch, e.step, e.loss, e.value) for e in rows]


def the_error_line(proc, what):
    """A launch that had to fail did: exit 2, exactly one `error: ...` line on stderr, nothing else but warnings;
    returns that line."""
    assert proc.returncode == 2, f"exit {proc.returncode}: {what}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    others = [ln for ln in proc.stderr.splitlines() if not ERROR_LINE.match(ln) and not ln.startswith("warning: ")]
    assert len(errors) == 1 and not others, f"stderr must be one error line (and warnings), got:\n{proc.stderr}"
    return errors[0]


# PhysicsNeMo, imported late by the scripts (cluster.physicsnemo): imported once by the parent that forks the
# launches of a test (tests/forked.py) that trains.
PHYSICSNEMO = "import cluster\ncluster.physicsnemo()"


# ------------------------------------------------------------------------------------------ launch patterns


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 16: what every 2-rank run with batch 8 per rank must reproduce (tests/recipes.py's run,
    which test_behaviour.py compares with torchrun and the spawner)."""
    ran = RECIPES["modulus"].run(tmp_path_factory, "reference")
    return ran.ckpt, ran.out


def test_single_process_writes_snapshots_and_a_physicsnemo_model(reference, gpu_probe):
    ckpt, out = reference
    assert [(e, s) for e, s, _, _ in epochs(out)] == [(1, 8), (2, 16)], out
    assert "[rank0] epoch 2 | batch 8/8 | step 16 | loss " in out
    assert re.search(r"^\[rank0\] done: 16 steps in [\d.]+ s$", out, re.M), out
    snap = snapshot(ckpt)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "world_size", "rng"} <= snap.keys()
    assert (snap["epoch"], snap["step"], snap["world_size"]) == (2, 16, 1)
    assert torch.load(ckpt / "snapshot.prev.pt", weights_only=True)["step"] == 8
    assert not [p.name for p in ckpt.iterdir() if "tmp" in p.name]  # no temporary file left (snapshot, fno.mdlus)
    # The final model in PhysicsNeMo's own format: physicsnemo.Module.from_checkpoint rebuilds the FNO (in the
    # probe's process: model_file_read_back).
    assert gpu_probe["model_file_read_back"] == "saved", gpu_probe["model_file_read_back"]
    assert_same_weights(torch.load(gpu_probe.from_mdlus, weights_only=True), snap["model"])


def test_srun_tasks_preempted_save_exit_75_and_resume(reference, tmp_path):
    """multinode.py as two srun tasks (emulated Slurm variables: DistributedManager's SLURM method). SIGUSR1
    (Slurm's warning) mid-training: both ranks stop after the same step, rank 0 saves, both exit 75; the next
    launch resumes mid-epoch and ends with the weights of one uninterrupted process over the global batch (the
    tolerance is the 2-ranks-vs-1 rounding; a batch skipped or trained twice moves the weights by ~lr)."""
    args = [*SMALL, "--batch-size", "8", "--checkpoint-dir", tmp_path]
    procs = RECIPES["modulus"].srun(args, 2, free_port(), stderr_apart=True)
    head = []
    for line in procs[0].stdout:  # wait until training is under way
        head.append(line)
        if "| step 3 |" in line:
            break
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    codes, outs = wait_all(procs, timeout=240)
    out0 = "".join(head) + outs[0][0]
    assert codes == [75, 75], outs
    # the way out of a preemption (SystemExit(75) in flight) frees the model before the process group too
    assert all(teardown_checked(err, ranks=1) for _, err in outs), outs
    assert "[rank0] host" in out0 and "initialised from slurm" in out0, out0
    assert "[rank1] host" in outs[1][0] and "[rank0] world size 2 (1 nodes) | backend gloo" in out0
    stopped_at = int(re.search(r"preempted at step (\d+): snapshot saved", out0).group(1))
    assert 3 <= stopped_at < 16 and snapshot(tmp_path)["step"] == stopped_at

    codes, outs = wait_all(RECIPES["modulus"].srun(args, 2, free_port(), stderr_apart=True), timeout=240)
    assert codes == [0, 0], outs
    assert re.search(rf"resumed from \S+snapshot.pt: epoch \d, step {stopped_at}$", outs[0][0], re.M), outs[0][0]
    assert snapshot(tmp_path)["step"] == 16
    assert_same_weights(snapshot(tmp_path)["model"], snapshot(reference[0])["model"], **TOL)


def test_damaged_snapshot_falls_back_then_is_a_clear_error(reference, tmp_path):
    """The newest snapshot truncated: warning, resume from the previous one; both damaged: exit 2 naming them.
    Both launches forked from one process (tests/forked.py, PhysicsNeMo imported once)."""
    ckpt, both = tmp_path / "ckpt", tmp_path / "both"
    ckpt.mkdir()
    both.mkdir()
    for name in ("snapshot.pt", "snapshot.prev.pt"):
        data = (reference[0] / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2] if name == "snapshot.pt" else data)
        (both / name).write_bytes(b"damaged")
    ran = forked_each("modulus", {
        "newest": dict(script="single_gpu.py", args=[*SMALL, "--batch-size", "16", "--checkpoint-dir", ckpt],
                       timeout=240),
        "both": dict(script="single_gpu.py", args=[*SMALL, "--checkpoint-dir", both], timeout=120)},
        preload=PHYSICSNEMO, timeout=300)
    proc = ran["newest"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-6000:]}"
    assert f"warning: {ckpt / 'snapshot.pt'} is unreadable" in out
    assert re.search(r"resumed from \S+snapshot\.prev\.pt: epoch 2, step 8$", out, re.M), out
    assert snapshot(ckpt)["step"] == 16
    line = the_error_line(ran["both"], "both snapshots damaged")
    assert "no usable snapshot" in line and "snapshot.prev.pt is unreadable" in line


# ------------------------------------------------------------------------------------------ data and learning


def test_learns_darcy_from_npz_files(tmp_path):
    """The real on-disk format (coeff/sol .npz, written by the finite-difference solver), and the FNO learns:
    the validation relative L2 error after 4 epochs is less than 0.6x the first epoch's. The writer and the
    training forked one after the other from one process (tests/forked.py)."""
    data = tmp_path / "darcy"
    ran = forked_each("modulus", {
        "write": dict(script="darcy.py", args=[data, "--train", 192, "--val", 32, "--resolution", 32], timeout=240),
        "train": dict(script="single_gpu.py", args=["--data", "darcy", "--data-dir", data, "--epochs", "4",
                                                    "--batch-size", "16", "--lr", "5e-3", "--log-every", "1000"],
                      timeout=240)},
        preload=PHYSICSNEMO, timeout=300)
    for case, proc in ran.items():
        assert proc.returncode == 0, f"{case}: exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    with np.load(data / "train.npz") as f:
        coeff, sol = f["coeff"], f["sol"]
    assert coeff.shape == sol.shape == (192, 32, 32) and set(np.unique(coeff)) == {3.0, 12.0}
    assert (sol[:, 0, :] == 0).all() and (sol[:, 1:-1, 1:-1] > 0).all()  # u = 0 on the boundary, > 0 inside
    out = ran["train"].stdout
    errors = [err for _, _, _, err in epochs(out)]
    assert len(errors) == 4 and errors[-1] < 0.6 * errors[0], f"validation rel_l2 did not fall: {errors}"


def test_ranks_read_disjoint_shards(gpu_probe):
    """The loader of each rank (built by the recipe's own code) covers a disjoint half, reshuffled per epoch (in
    the probe's process: ranks_shards)."""
    r0e0, r0e1, r1e0, r1e1 = gpu_probe["ranks_shards"]
    assert len(r0e0) == len(r1e0) == 24  # 25 per rank, the incomplete batch dropped
    assert not set(r0e0) & set(r1e0) and not set(r0e1) & set(r1e1)
    assert r0e0 != r0e1


# ------------------------------------------------------------------------------------------ bad input


# The common flags' validation (--batch-size 0, --lr -1, …) and a launch without torchrun's or Slurm's variables
# are the contract's tests (tests/test_contract.py), run over this folder too; here only what modulus/ adds.
@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """The error line of every bad launch below ({case: line}), each launch forked (tests/forked.py), each checked as
    bad_input checks one (exit 2, one error line on stderr, within 60 s)."""
    tmp = tmp_path_factory.mktemp("bad_input")
    (tmp / "empty").mkdir()
    for name, sol in (("wrong-shape", (8, 32, 16)), ("not-a-zip", (8, 32, 32))):
        (tmp / name).mkdir()
        np.savez(tmp / name / "train.npz", coeff=np.zeros((8, 32, 32), np.float32), sol=np.zeros(sol, np.float32))
        np.savez(tmp / name / "val.npz", coeff=np.zeros((8, 32, 32), np.float32), sol=np.zeros((8, 32, 32), np.float32))
    (tmp / "not-a-zip" / "train.npz").write_bytes(b"not a zip file")
    darcy = ["--data", "darcy", "--data-dir"]
    cases = {"no-data-dir": dict(script="single_gpu.py", args=["--data", "darcy"], timeout=60),
             "missing": dict(script="single_gpu.py", args=[*darcy, tmp / "nowhere"], timeout=60),
             "empty": dict(script="single_gpu.py", args=[*darcy, tmp / "empty"], timeout=60),
             "wrong-shape": dict(script="single_gpu.py", args=[*darcy, tmp / "wrong-shape"], timeout=60),
             "not-a-zip": dict(script="single_gpu.py", args=[*darcy, tmp / "not-a-zip"], timeout=60),
             "no-address": dict(script="multinode.py", env=dict(SLURM_PROCID=0, SLURM_NPROCS=2, SLURM_LOCALID=0),
                                timeout=60)}
    return {case: the_error_line(proc, f"{case}: {cases[case]}")
            for case, proc in forked_each("modulus", cases, timeout=300).items()}


def test_darcy_data_needs_a_directory(refused):
    assert "--data darcy needs --data-dir" in refused["no-data-dir"]


def test_missing_and_empty_data_directory(refused):
    assert "does not exist: write the Darcy data with `python darcy.py" in refused["missing"]
    assert "train.npz not found" in refused["empty"]


def test_data_file_of_the_wrong_shape_or_format(refused):
    assert "coeff (8, 32, 32) and sol (8, 32, 16) must both be (samples, R, R)" in refused["wrong-shape"]
    assert "train.npz is not a readable .npz file" in refused["not-a-zip"]


def test_slurm_variables_without_an_address(refused):
    """`python multinode.py` in a batch script without srun: Slurm's rank variables but no launch address."""
    line = refused["no-address"]
    assert "SLURM_LAUNCH_NODE_IPADDR not set" in line and "srun" in line


def test_world_size_larger_than_the_data():
    """The ranks say it in one line each and exit 2 (torchrun stops the other rank when the first one exits, and
    prints its own failure summary)."""
    proc = torchrun_standalone("multigpu_torchrun.py", 2, "--dataset-size", "1", "--batch-size", "1",
                               expect_fail=True, timeout=180)
    said = re.findall(r"^\[rank(\d)\] error: the dataset has 1 samples but the world size is 2", proc.stdout, re.M)
    assert said and "exitcode  : 2" in proc.stdout and "RecipeError" not in proc.stdout, proc.stdout


def test_every_recipe_script_is_exercised():
    """Guard: a new script in modulus/ must get a test here (or a run in tests/recipes.py's table)."""
    assert scripts_not_run("modulus", __file__) == set()


# ------------------------------------------------------------------------------------------ GPU facts, patched in

# What a GPU node would answer, patched into the recipes' own code in one process of modulus/'s environment (this
# machine has no GPU; importing physicsnemo once costs most of the time), and in the same process the loop's
# collectives counted and the model file's writer failing: each check returns what it found, or the exception it
# raised, as JSON on the last line.
GPU_PROBE = r'''
import json, os, sys, tempfile, types
from unittest import mock
import torch
import torch.distributed as dist
import cluster, recipe, toolkit

''' + PROBE_CHECKS + r'''

@check
def model_file_read_back():
    """The reference run's fno.mdlus (argv 1) rebuilt by physicsnemo.Module.from_checkpoint, physicsnemo as the
    recipes import it; its state dict saved to argv 2."""
    model = cluster.physicsnemo().Module.from_checkpoint(sys.argv[1])
    torch.save(model.state_dict(), sys.argv[2])
    return "saved"

@check
def ranks_shards():
    """The samples of each rank's loader (recipe.build_loader), for ranks 0 and 1 of 2, epochs 0 and 1."""
    args = types.SimpleNamespace(seed=0, batch_size=4, num_workers=0)
    ds = torch.utils.data.TensorDataset(torch.arange(50))
    out = []
    for rank in (0, 1):
        loader = recipe.build_loader(ds, args, rank, 2)
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            out.append(sorted(int(i) for (b,) in loader for i in b))
    return out

def tiny_args(**kw):
    defaults = dict(data="synthetic", dataset_size=16, batch_size=4, seed=0, num_workers=0, lr=1e-3, epochs=2,
                    max_steps=None, amp=False, timings_file=None, checkpoint_dir=None, log_every=1, save_every=1,
                    save_every_steps=None, backend="auto", timeout=30)
    return types.SimpleNamespace(**{**defaults, **kw})

@check
def resume_on_a_gpu():
    """A snapshot saved, then resumed by a rank whose device is cuda:0: torch.load honours map_location the way
    it does on a GPU node -- tensors it puts on a device that is not the CPU are not CPU ByteTensors (meta here:
    torch.set_rng_state rejects them with the same TypeError as a CUDA tensor)."""
    ckpt = tempfile.mkdtemp()
    args = tiny_args(checkpoint_dir=ckpt)
    torch.manual_seed(0)
    first = recipe.Trainer(recipe.build_model(), recipe.build_dataset(args), args, 0, 1, torch.device("cpu"))
    first.step, first.epoch = 3, 1
    first._save_snapshot()
    saved_rng = torch.get_rng_state().clone()
    torch.manual_seed(123)  # another state: the resume must bring the saved one back
    trainer = recipe.Trainer(recipe.build_model(), recipe.build_dataset(args), args, 0, 1, torch.device("cpu"))
    trainer.device = torch.device("cuda", 0)  # the device a GPU rank resumes on
    real_load, seen = torch.load, []

    def load(path, map_location=None, **kw):
        seen.append(str(map_location))
        snap = real_load(path, map_location="cpu", **kw)
        if torch.device(map_location).type != "cpu":
            snap = torch.utils._pytree.tree_map(lambda v: v.to("meta") if torch.is_tensor(v) else v, snap)
        return snap

    with mock.patch.object(torch, "load", load):
        trainer._resume()
    return {"map_locations": seen, "step": trainer.step, "rng_restored": torch.equal(torch.get_rng_state(), saved_rng)}

@check
def set_rng_state_from_a_device_tensor():
    try:
        torch.set_rng_state(torch.get_rng_state().to("meta"))
    except TypeError as e:
        return str(e)
    return "accepted"

def init_on_fake_gpus(env, visible):
    """recipe.init_distributed as a rank with `visible` CUDA devices (CUDA facts and the process group patched):
    the devices DistributedManager, torch.cuda.set_device and init_process_group's device_id got."""
    calls = {"set_device": [], "device_id": []}

    def set_device(device):
        calls["set_device"].append(str(device))
        if torch.device(device).index >= visible:
            raise RuntimeError("CUDA error: invalid device ordinal")

    def init_process_group(backend=None, **kw):
        calls["device_id"].append(str(kw.get("device_id")))

    manager = cluster.physicsnemo().distributed.DistributedManager
    manager._shared_state = {}
    with mock.patch.dict(os.environ, env), mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "device_count", lambda: visible), \
            mock.patch.object(torch.cuda, "set_device", set_device), \
            mock.patch.object(torch.cuda, "empty_cache", lambda: None), \
            mock.patch.object(dist, "init_process_group", init_process_group):
        try:
            got = recipe.init_distributed(tiny_args())
            calls.update(recipe=str(got.device), manager=str(manager().device), local_rank=got.local_rank)
        finally:
            manager._shared_state = {}
    return calls

@check
def srun_task_with_one_gpu():
    return init_on_fake_gpus(dict(SLURM_PROCID="3", SLURM_NPROCS="4", SLURM_LOCALID="3",
                                  SLURM_LAUNCH_NODE_IPADDR="127.0.0.1", MASTER_PORT="29999"), visible=1)

@check
def torchrun_rank_with_two_gpus():
    return init_on_fake_gpus(dict(RANK="5", LOCAL_RANK="5", WORLD_SIZE="8", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT="29999"), visible=2)

@check
def torchrun_rank_with_every_gpu():
    return init_on_fake_gpus(dict(RANK="5", LOCAL_RANK="5", WORLD_SIZE="8", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT="29999"), visible=8)

@check
def amp_dtypes_on_cuda():
    """The mixed-precision seam given a CUDA device: the autocast dtype by compute capability (C10)."""
    found = {}
    for capability in ((9, 0), (7, 0)):
        with mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: capability), \
                mock.patch.object(torch.cuda, "is_available", lambda: True), \
                mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True):
            autocast, _ = cluster.mixed_precision(torch.device("cuda", 0), True)
            ctx = autocast()
            found[str(capability)] = [ctx.device, str(ctx.fast_dtype)]
    return found

def cufft(real):
    """torch.fft.rfft2 with cuFFT's rules: no bf16, fp16 only on power-of-two sizes (pytorch#139313)."""
    def rfft2(x, *a, **kw):
        sizes = x.shape[-2:]
        if x.dtype == torch.bfloat16:
            raise RuntimeError("Unsupported dtype BFloat16")
        if x.dtype == torch.float16 and any(n & (n - 1) for n in sizes):
            raise RuntimeError(f"cuFFT only supports dimensions whose sizes are powers of two, got {tuple(sizes)}")
        return real(x, *a, **kw)
    return rfft2

@check
def amp_step_under_cufft_rules():
    """One forward and backward of the recipe's FNO under autocast in each dtype the seam picks on a GPU, with
    cuFFT's rules: the spectral layers must get fp32."""
    found = {}
    x, y = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32)
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        model = recipe.build_model()
        try:
            with mock.patch.object(torch.fft, "rfft2", cufft(torch.fft.rfft2)), torch.autocast("cpu", dtype=dtype):
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]  # the lift's biases get none
            found[str(dtype)] = bool(torch.isfinite(loss)) and len(grads) > 10 and all(
                bool(torch.isfinite(g).all()) for g in grads)
        except RuntimeError as e:
            found[str(dtype)] = f"RuntimeError: {str(e).splitlines()[0]}"
    return found

@check
def amp_on_cpu_unchanged():
    """CPU autocast already runs FFTs in fp32: the same output as PhysicsNeMo's FNO without the shim."""
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(0)
    ours = recipe.build_model()
    plain = cluster.physicsnemo().models.fno.FNO(**ours._args["__args__"])
    plain.load_state_dict(ours.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return torch.equal(ours(x), plain(x))

''' + NO_SILENT_CPU_CHECK + r'''
''' + TF32_CHECK + r'''
@check
def epochs_and_model_file():
    """Two epochs of 5 steps as rank 0 of 2 (the collectives faked: identity, counted), progress every 5 steps:
    the all_reduces and the recipe's host reads of tensor values (.item(), .tolist(): a device sync each on a GPU)
    per epoch, each epoch line's loss next to the exact mean of that epoch's batch losses; the files fsynced. Then
    the finished run resumed (0 steps), whose model writer fails half-way (a full disk): what is left of fno.mdlus."""
    ckpt = tempfile.mkdtemp()
    args = tiny_args(dataset_size=10, batch_size=1, epochs=2, log_every=5, checkpoint_dir=ckpt)  # batch 1: cheap
    counts, epochs, batches, synced = {"all_reduce": 0, "item": 0, "tolist": 0}, [], [], []
    real_item, real_tolist, real_fsync = torch.Tensor.item, torch.Tensor.tolist, os.fsync

    def counted(name, real):
        def read(self, *a, **kw):
            if os.path.basename(sys._getframe(1).f_code.co_filename) in ("recipe.py", "cluster.py", "toolkit.py"):
                counts[name] += 1  # the recipe's reads, not the sampler's (randperm(...).tolist() on the CPU)
            return real(self, *a, **kw)
        return read

    def all_reduce(tensor, *a, **kw):
        counts["all_reduce"] += 1

    def fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    torch.manual_seed(0)
    trainer = recipe.Trainer(recipe.build_model(), recipe.build_dataset(args), args, 0, 2, torch.device("cpu"))
    run_batch = trainer._run_batch

    def batch(x, y):
        loss = run_batch(x, y)
        batches.append((real_item(loss), len(y)))
        return loss

    def log(message):  # Trainer.log: rank 0's lines
        if message.startswith("epoch ") and "/" in message.split()[1]:
            epochs.append((message, dict(counts), list(batches)))
            batches.clear()

    trainer._run_batch, trainer.log = batch, log
    with mock.patch.object(dist, "all_reduce", all_reduce), mock.patch.object(dist, "broadcast_object_list"), \
            mock.patch.object(dist, "barrier"), mock.patch.object(os, "fsync", fsync):
        with mock.patch.object(torch.Tensor, "item", counted("item", real_item)), \
                mock.patch.object(torch.Tensor, "tolist", counted("tolist", real_tolist)):
            trainer.train()
        found, before = {"epochs": [], "synced": synced}, {k: 0 for k in counts}
        for message, after, losses in epochs:
            found["epochs"].append({"steps": len(losses), "logged_loss": float(message.split("| loss ")[1].split()[0]),
                                    "exact_loss": sum(v * n for v, n in losses) / sum(n for _, n in losses),
                                    **{k: after[k] - before[k] for k in counts}})
            before = after
        path = os.path.join(ckpt, recipe.MODEL_FILE)
        with open(path, "rb") as f:
            good = f.read()

        def half_written(self, file_name=None, *a, **kw):
            with open(file_name, "wb") as f:
                f.write(good[: len(good) // 2])
            raise OSError(28, "No space left on device")

        with mock.patch.object(cluster.physicsnemo().Module, "save", half_written):
            try:
                trainer.train()  # again: resumes the finished run, trains 0 steps, writes the model file again
            except OSError as e:
                found["raised"] = str(e)
    with open(path, "rb") as f:
        found["intact"] = f.read() == good
    found["files"] = sorted(os.listdir(ckpt))
    return found

print(json.dumps(results))
'''


class Probe(dict):
    """GPU_PROBE's findings {check: result}; from_mdlus: the file model_file_read_back saved."""


@pytest.fixture(scope="module")
def gpu_probe(reference, tmp_path_factory):
    """One process of modulus/'s environment (PhysicsNeMo's import paid once) for every check of GPU_PROBE, the
    reference run's model file read back among them."""
    from_mdlus = tmp_path_factory.mktemp("probe") / "from_mdlus.pt"
    out = python("-c", GPU_PROBE, reference[0] / "fno.mdlus", from_mdlus, cwd=MOD, timeout=180).stdout
    found = Probe(json.loads(out.strip().splitlines()[-1]))
    found.from_mdlus = from_mdlus
    return found


def test_resume_on_a_gpu_loads_the_snapshot_to_the_cpu(gpu_probe):
    """A requeued GPU job's first resume: the snapshot is loaded to the CPU (model and optimizer copy it onto the
    device), so torch.set_rng_state gets the CPU ByteTensor it requires -- a device tensor is a TypeError."""
    found = gpu_probe["resume_on_a_gpu"]
    assert "raised" not in found, found
    assert found["map_locations"] == ["cpu", "cpu"], found  # find_snapshot's look at the step, then the resume
    assert found["step"] == 3 and found["rng_restored"], found
    assert "RNG state must be a torch.ByteTensor" in gpu_probe["set_rng_state_from_a_device_tensor"]


@pytest.mark.parametrize("case, device", [("srun_task_with_one_gpu", "cuda:0"),
                                          ("torchrun_rank_with_two_gpus", "cuda:1"),
                                          ("torchrun_rank_with_every_gpu", "cuda:5")])
def test_the_device_is_the_local_rank_among_the_visible_gpus(gpu_probe, case, device):
    """--gpus-per-task=1 (each task sees one device): DistributedManager's cuda:<SLURM_LOCALID> does not exist on
    ranks > 0 (NVIDIA/physicsnemo#115). The recipe's device, DistributedManager's, set_device's and the process
    group's are the local rank modulo the visible devices."""
    found = gpu_probe[case]
    assert "raised" not in found, found
    assert found["recipe"] == found["manager"] == device, found
    assert found["set_device"] == [device] and found["device_id"] == [device], found


def test_amp_keeps_the_fno_spectral_layers_in_fp32(gpu_probe):
    """--amp on a GPU: bf16 (Ampere+) or fp16 (older) autocast, and the FNO's FFTs in fp32 -- CUDA has no bf16 FFT
    and fp16 cuFFT needs power-of-two sizes (the padded grid is 40); CPU autocast already does so, and the CPU
    result does not change."""
    assert gpu_probe["amp_dtypes_on_cuda"] == {"(9, 0)": ["cuda", "torch.bfloat16"],
                                               "(7, 0)": ["cuda", "torch.float16"]}
    assert gpu_probe["amp_step_under_cufft_rules"] == {"torch.bfloat16": True, "torch.float16": True}
    assert gpu_probe["amp_on_cpu_unchanged"] is True


def test_given_gpus_it_cannot_use_it_stops_rather_than_train_on_the_cpu(gpu_probe):
    """C12, wired into parse_args (every script, before DistributedManager picks a device)."""
    assert_no_silent_cpu(gpu_probe["given_gpus_that_torch_cannot_use"])



def test_fp32_on_a_gpu_uses_tf32(gpu_probe):
    """C10/#22: an fp32 run on a GPU puts matmuls and convolutions in TF32 (the folder never did)."""
    assert gpu_probe["tf32_for_fp32_on_cuda"] == ["highest", "high"], gpu_probe["tf32_for_fp32_on_cuda"]


def test_metrics_are_read_at_log_points_and_epoch_ends_only(gpu_probe):
    """#26: no all_reduce and no host read of a device value per step (each is a GPU sync): per epoch, the reads of
    the progress lines (every --log-every steps, rank 0), the preemption check's all_reduce (with fast steps once
    early, at the process's second step, then every PreemptionFlag.CHECK_EVERY = 10 steps), and two at the epoch's
    end (the loss totals, the validation error). The epoch line's loss is the exact mean over the epoch's samples
    (C3)."""
    found = gpu_probe["epochs_and_model_file"]
    assert "epochs" in found and len(found["epochs"]) == 2, found  # else the probe itself raised
    # steps 1-5 and 6-10: one progress line each; the preemption check (all_reduce + .item()) at steps 2 and 10 only
    assert [e["steps"] for e in found["epochs"]] == [5, 5], found
    assert [e["all_reduce"] for e in found["epochs"]] == [1 + 2, 1 + 2], found
    assert [e["item"] for e in found["epochs"]] == [1 + 1, 1 + 1], found
    assert [e["tolist"] for e in found["epochs"]] == [2, 2], found
    for epoch in found["epochs"]:
        assert abs(epoch["logged_loss"] - epoch["exact_loss"]) <= 5e-5 + 1e-7, found


def test_the_physicsnemo_model_file_is_written_atomically(gpu_probe):
    """#26: fno.mdlus is fsynced before it takes its name, and a write that fails half-way leaves the previous file
    as it was and no temporary file beside it."""
    found = gpu_probe["epochs_and_model_file"]
    assert "synced" in found, found  # else the probe itself raised
    assert "fno.mdlus.tmp" in found["synced"], found
    assert "No space left on device" in found.get("raised", ""), found
    assert found["intact"] is True, found
    assert found["files"] == ["fno.mdlus", "snapshot.prev.pt", "snapshot.pt"], found
