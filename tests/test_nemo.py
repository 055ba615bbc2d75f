"""nemo/ recipes on CPU (gloo), every one launched as a real process with .venvs/nemo: one process and what the
2-rank launches leave (their weights equal the one process's: tests/test_behaviour.py), exp_manager's resume == an
uninterrupted run, the .nemo archive, preemption -> 75 -> resume, the Hydra overrides and their one-line errors, and
Megatron-Core's process-group layout.

Tiny data (4 steps per epoch, 2 epochs); most of each launch is importing NeMo (seconds), so one run serves
several assertions (module-scoped fixtures).
"""

import ast
import contextlib
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port, pickle_without, run,
                     torchrun)
from recipes import (LIGHTNING_FACT_CHECK, RECIPES, assert_lightning_root_device_is_the_bound_gpu,
                     assert_tf32_for_fp32_on_the_gpu_only)

pytestmark = [pytest.mark.nemo, pytest.mark.timeout(300)]

FOLDER = ROOT / "nemo"
# 64 samples: 1 rank x batch 16 or 2 ranks x batch 8 -> 4 steps per epoch, 8 in all
DATA = ["--epochs", "2", "--dataset-size", "64", "--log-every", "2"]
ONE, TWO = [*DATA, "--batch-size", "16"], [*DATA, "--batch-size", "8"]
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


def python(*args, **kw):
    return run([env_python("nemo"), *args], cwd=FOLDER, **kw)


# a NeMo checkpoint pickles its config (NeMo/OmegaConf objects), which this environment does not have
_checkpoint_pickle = pickle_without("omegaconf", "nemo", "hydra", "lightning", "lightning_fabric")


def last_checkpoint(checkpoint_dir):
    """exp_manager's *-last.ckpt: state_dict, global_step, loops (the config inside is left opaque)."""
    found = sorted((checkpoint_dir / "checkpoints").glob("*last.ckpt"))
    assert len(found) == 1, f"want one *last.ckpt, got {found}"
    return torch.load(found[0], map_location="cpu", weights_only=False, pickle_module=_checkpoint_pickle)


def weights(checkpoint_dir):
    return last_checkpoint(checkpoint_dir)["state_dict"]


def epochs(out):
    """(epoch, epochs, step) of the C3 epoch lines, whose metric is the accuracy."""
    lines = epoch_lines(out)
    assert all(e.metric == "acc" for e in lines), lines
    return [(e.epoch, e.epochs, e.step) for e in lines]


def world_size(out):
    return int(re.search(r"^\[rank0\] world size (\d+) \|", out, re.M).group(1))


# ------------------------------------------------------------------------------------------ launch patterns


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, batch 16: what every 2-rank run with batch 8 per rank must reproduce (tests/recipes.py's run,
    which test_behaviour.py compares with torchrun, Lightning's spawner and srun). It reads a small config of the
    user's own, with Hydra's --config-path (relative: from the script's directory, as Hydra reads it) and
    --config-name (as NeMo's examples spell it): it extends conf/config.yaml through Hydra's defaults list and
    renames the experiment, which names the files it writes."""
    ran = RECIPES["nemo"].run(tmp_path_factory, "reference")
    return ran.ckpt, ran.out


def test_single_process_learns_and_exports_a_loadable_nemo_file(reference):
    ckpt, out = reference
    assert epochs(out) == [(1, 2, 4), (2, 2, 8)] and world_size(out) == 1, out[-3000:]
    assert last_checkpoint(ckpt)["global_step"] == 8
    # the user's config (--config-name mine) named the files
    assert [p.name for p in (ckpt / "checkpoints").glob("*last.ckpt")] == ["mine-toy--step=8-last.ckpt"]
    nemo_file = ckpt / "checkpoints" / "mine-toy.nemo"
    assert nemo_file.exists(), sorted(p.name for p in (ckpt / "checkpoints").iterdir())
    # restore_from: the archive's config and weights, the same as the last checkpoint's
    restored = python("-c", f"""
import torch, recipe
model = recipe.ToyClassifier.restore_from({str(nemo_file)!r}, map_location="cpu")
ckpt = next(__import__("pathlib").Path({str(ckpt / "checkpoints")!r}).glob("*last.ckpt"))
saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items()), "weights differ"
print("restored", type(model).__name__, model.cfg.train_ds.batch_size, model.cfg.optim.name)
""").stdout
    assert "restored ToyClassifier 16 sgd" in restored


def test_two_rank_runs_export_the_nemo_file_and_write_timings(tmp_path_factory):
    """What the 2-rank runs leave besides the weights test_behaviour.py compares: torchrun's .nemo archive, the
    spawner's --timings-file (rank 0's step end times for benchmarks/)."""
    assert (RECIPES["nemo"].run(tmp_path_factory, "torchrun").ckpt / "checkpoints" / "nemo-toy.nemo").exists()
    t = json.loads((RECIPES["nemo"].run(tmp_path_factory, "spawn").dir / "timings.json").read_text())
    assert t["world_size"] == 2 and t["batch_size"] == 8 and len(t["step_end_times"]) == 8
    assert t["start_time"] < t["step_end_times"][0] <= t["step_end_times"][-1]


# ------------------------------------------------------------------------------------------ resume, preemption


def test_resume_through_exp_manager_equals_the_uninterrupted_run(reference, tmp_path):
    """Stop after epoch 1 (--max-steps 4), run again: exp_manager finds *-last.ckpt and the second epoch ends
    with the weights of the run that never stopped; run a third time: nothing left, 0 steps.

    Before the second run a stale *-last.ckpt with less progress sits beside the real one (a job killed between
    writing the new one and deleting the old, NeMo issue #7948), where exp_manager alone would stop with
    "Multiple checkpoints": the one with the most stored progress is resumed, with a warning."""
    first = python("single_gpu.py", *ONE, "--max-steps", "4", "--checkpoint-dir", tmp_path).stdout
    assert epochs(first) == [(1, 2, 4)] and last_checkpoint(tmp_path)["global_step"] == 4
    python("-c", "import sys, torch; c = torch.load(sys.argv[1], weights_only=False); c['global_step'] = 2; "
                 "torch.save(c, sys.argv[2])", *sorted((tmp_path / "checkpoints").glob("*last.ckpt")),
           tmp_path / "checkpoints" / "nemo-toy--step=2-last.ckpt")
    second = python("single_gpu.py", *ONE, "--checkpoint-dir", tmp_path).stdout  # stdout and stderr
    assert "warning: 2 *last.ckpt files" in second and "resuming from the one with the most progress" in second
    assert re.search(r"^\[rank0\] resumed from \S+step=4-last\.ckpt: epoch 2, step 4$", second, re.M), \
        second[-3000:]
    assert epochs(second) == [(2, 2, 8)]
    (tmp_path / "checkpoints" / "nemo-toy--step=2-last.ckpt").unlink()
    assert_same_weights(weights(reference[0]), weights(tmp_path))
    third = python("single_gpu.py", *ONE, "--checkpoint-dir", tmp_path).stdout
    assert re.search(r"^\[rank0\] resumed from \S+: epoch 3, step 8$", third, re.M) and not epochs(third)
    assert "[rank0] done: 8 steps" in third


def preempted_run(args, sig, at_step):
    """single_gpu.py, `sig` to every process of the run (as Slurm signals a step: the script and its DataLoader
    workers) once it reports step `at_step`; (exit code, output)."""
    proc = subprocess.Popen([str(env_python("nemo")), "single_gpu.py", *map(str, args)], cwd=FOLDER, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, deadline = [], time.monotonic() + 180
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.match(rf"\[rank0\] epoch 1 \| batch \d+/128 \| step {at_step} ", line):
                os.killpg(proc.pid, sig)  # the script, its DataLoader workers
            assert time.monotonic() < deadline, "".join(lines[-50:])
        proc.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, "".join(lines)


def test_preemption_checkpoints_exits_75_and_the_rerun_resumes(tmp_path):
    """SIGUSR1 to every process of the run (as Slurm signals a step), DataLoader workers included: the step ends,
    *-last.ckpt is saved, exit 75; the rerun resumes from it through exp_manager. SIGTERM (a time limit, scancel)
    to every process of the rerun does the same (issue #27: Lightning's own SIGTERM handler ended the run with exit
    0 and no checkpoint of ours, so nothing requeued it); the third run finishes the schedule. The .nemo archive is
    exported at the real end of training only, not inside the 90 s warning."""
    args = ["--epochs", "1", "--dataset-size", "1024", "--batch-size", "8", "--log-every", "10", "--num-workers", "2",
            "--checkpoint-dir", tmp_path]  # 128 steps
    nemo_file, resumed_from = tmp_path / "checkpoints" / "nemo-toy.nemo", 0
    for sig, at_step in (signal.SIGUSR1, 20), (signal.SIGTERM, None):
        at_step = at_step or resumed_from + 20
        code, out = preempted_run(args, sig, at_step)
        assert code == 75, out[-3000:]
        if resumed_from:
            assert re.search(rf"^\[rank0\] resumed from \S+-last\.ckpt: epoch 1, step {resumed_from}$", out, re.M), \
                out[-3000:]
        step = int(re.search(r"^\[rank0\] preempted at step (\d+): checkpoint saved", out, re.M).group(1))
        assert at_step <= step < 128 and step % 10 == 0, out[-3000:]  # the step of the line, or a later one
        assert not any(s in out for s in ("Traceback", "DataLoader worker", "Received SIGTERM")), out[-3000:]
        assert last_checkpoint(tmp_path)["global_step"] == step and not nemo_file.exists()
        resumed_from = step
    again = python("single_gpu.py", *map(str, args)).stdout
    assert re.search(rf"^\[rank0\] resumed from \S+-last\.ckpt: epoch 1, step {step}$", again, re.M), again[-3000:]
    assert "[rank0] done: 128 steps" in again and last_checkpoint(tmp_path)["global_step"] == 128
    assert nemo_file.exists()



def test_a_crash_after_a_mid_epoch_snapshot_resumes_to_the_uninterrupted_weights(reference, tmp_path):
    """--save-every-steps 3 (#27): killed (SIGKILL) right after the step-6 snapshot, mid-epoch 2, the rerun
    resumes at step 6 and ends with the weights of the run that never stopped: it trained epoch 2's last two
    batches, not its first two again (a plain DataLoader restarts the epoch: Lightning warned "your dataloader is
    not resumable", and so did every mid-epoch preemption resume here)."""
    from test_contract import CRASH  # the contract's crash: SIGKILL right after a line

    args = [*ONE, "--log-every", "1", "--save-every-steps", "3", "--checkpoint-dir", tmp_path]
    python("-c", CRASH, r"snapshot saved to .+ \(step 6\)", "single_gpu.py", *args, check=False)
    again = python("single_gpu.py", *args).stdout
    assert re.search(r"^\[rank0\] resumed from \S+-last\.ckpt: epoch 2, step 6$", again, re.M), again[-3000:]
    assert "not resumable" not in again, again[-3000:]
    assert_same_weights(weights(reference[0]), weights(tmp_path))


def test_a_preemption_at_the_last_step_still_exports_the_nemo_file(tmp_path):
    """A preemption that stops the run at its last step (the signal came within its last CHECK_EVERY steps) ends
    training: the .nemo archive is exported, as at any real end. Without it the archive was lost for good: the
    requeued run resumes a finished run, trains 0 steps and never reaches on_train_end, where NeMo exports it.
    The signal counts as received before training (toolkit.PREEMPTION set): the stop falls on step 10 of 10."""
    start = ("import runpy, sys, toolkit; toolkit.PREEMPTION.requested = True; sys.argv[0] = 'single_gpu.py'; "
             "runpy.run_path('single_gpu.py', run_name='__main__')")
    out = python("-c", start, "--epochs", "1", "--dataset-size", "40", "--batch-size", "4", "--checkpoint-dir",
                 tmp_path, expect_fail=True).stdout
    assert re.search(r"^\[rank0\] preempted at step 10: checkpoint saved; exiting with 75", out, re.M), out[-3000:]
    assert last_checkpoint(tmp_path)["global_step"] == 10
    assert (tmp_path / "checkpoints" / "nemo-toy.nemo").exists()


# ------------------------------------------------------------------------------------------ Hydra overrides


def test_flags_and_overrides_compose_into_one_config():
    out = python("single_gpu.py", "--epochs", "5", "--checkpoint-dir", "/tmp/a b", "model.optim.lr=0.2",
                 "trainer.precision=bf16-mixed", "--print-config").stdout
    assert re.search(r"^  max_epochs: 5$", out, re.M) and re.search(r"^    lr: 0\.2$", out, re.M), out
    assert "explicit_log_dir: /tmp/a b" in out and "precision: bf16-mixed" in out


@pytest.mark.parametrize("args, message", [
    (["model.optim.lrr=0.1"], "invalid override: Could not override 'model.optim.lrr'"),
    (["trainer.max_epochs=three"], "trainer.max_epochs (--epochs) must be of type int, got 'three'"),
    (["model.train_ds.batch_size=0"], "model.train_ds.batch_size (--batch-size) must be an integer >= 1"),
    (["--epochs", "2", "trainer.max_epochs=3"], "trainer.max_epochs is set twice"),
    (["--config-path", "{tmp}/none"], "--config-path {tmp}/none: no such directory"),
    (["--config-path", "{tmp}", "--config-name", "nope"], "--config-name nope: there is no {tmp}/nope.yaml"),
    (["-cp", "{tmp}", "-cn", "thin"], "{tmp}/thin.yaml lacks 42 key(s) of conf/config.yaml that the recipe reads: "
                                      "seed, trainer.devices"),
    (["-cp", "{tmp}", "-cn", "broken"], "{tmp}/broken.yaml is not valid YAML: while parsing a flow sequence"),
    (["exp_manager.create_preemption_callback=true"], "exp_manager.create_preemption_callback must be false"),
], ids=["unknown-key", "wrong-type", "out-of-range", "set-twice", "config-path", "config-name", "config-keys",
        "config-yaml", "nemo-preemption-callback"])
def test_bad_config_is_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "thin.yaml").write_text("name: thin\n")  # a config of the user's own without the recipe's keys
    (tmp_path / "broken.yaml").write_text("name: [thin\n")
    args, message = [a.format(tmp=tmp_path) for a in args], message.format(tmp=tmp_path)
    proc = subprocess.run([str(env_python("nemo")), "single_gpu.py", *args, "--checkpoint-dir", str(tmp_path / "c")],
                          cwd=FOLDER, env=clean_env(), capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "c").exists()


BATCH_SHELL = {"SLURM_JOB_ID": 4242, "SLURM_NTASKS": 2, "SLURM_NTASKS_PER_NODE": 2, "SLURM_NNODES": 1,
               "SLURM_PROCID": 0}


@pytest.mark.parametrize("script, env, message", [
    ("multigpu_torchrun.py", {}, "start this script with torchrun"),
    ("multinode.py", BATCH_SHELL, "started without srun"),
], ids=["no-torchrun", "no-srun"])
def test_launch_without_the_launcher_is_one_line(script, env, message):
    proc = python(script, *ONE, env=clean_env(**env), expect_fail=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stdout and "Traceback" not in proc.stdout


# ------------------------------------------------------------------------------- GPU truth (issue #22), on CPU

SMOKE = ["--epochs", "2", "--dataset-size", "16", "--batch-size", "4", "--log-every", "1"]


@pytest.mark.parametrize("script, args, env, given", [
    ("single_gpu.py", SMOKE, {"SLURM_GPUS_ON_NODE": "2"}, "SLURM_GPUS_ON_NODE=2"),
    ("single_gpu.py", [*SMOKE, "recipe.backend=nccl"], {}, "--backend nccl"),
    ("multigpu_torchrun.py", [*SMOKE, "--backend", "nccl"], {}, "--backend nccl"),
    ("megatron_parallel.py", [], {"SLURM_GPUS_ON_NODE": "1"}, "SLURM_GPUS_ON_NODE=1"),
], ids=["slurm-gpus", "nccl-override", "nccl-before-torchrun", "megatron"])
def test_no_silent_cpu_is_one_line_and_exit_2(tmp_path, script, args, env, given):
    """CONTRACT.md C12 with this CPU-only torch: given GPUs or nccl (by the flag or its Hydra override: the
    composed config's value), the script stops right after its command line (before NeMo's imports, before
    multigpu_torchrun.py's torchrun check), with one line and nothing written."""
    ckpt = [] if script == "megatron_parallel.py" else ["--checkpoint-dir", str(tmp_path / "c")]
    proc = subprocess.run([str(env_python("nemo")), script, *args, *ckpt], cwd=FOLDER, env=clean_env(**env),
                          capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert given in errors[0] and "rather than training on the CPU" in errors[0], errors[0]
    assert "Traceback" not in proc.stderr + proc.stdout and not (tmp_path / "c").exists()


# One process of .venvs/nemo checks the seams with torch's GPU answers patched in (this machine has no GPU); each
# check prints one JSON line {check: result} (an exception is a result too), the tests below read them.
GPU_FACTS = r"""
import json, os, sys, tempfile, warnings
from types import SimpleNamespace
from unittest import mock
import torch
import lightning.pytorch as pl
from lightning.fabric.accelerators import cuda as fabric_cuda
from omegaconf import OmegaConf
import cluster, recipe

""" + LIGHTNING_FACT_CHECK + r"""

def gpus(count, calls):  # torch and Lightning see `count` CUDA devices; set_device only records
    return [mock.patch("torch.cuda.is_available", return_value=True),
            mock.patch("torch.cuda.device_count", return_value=count),
            mock.patch.object(fabric_cuda, "num_cuda_devices", return_value=count),
            mock.patch("torch.cuda.set_device", side_effect=lambda d: calls.append(("set_device", str(d))))]

TORCHRUN = dict(RANK="3", LOCAL_RANK="3", GROUP_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4",
                MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", TORCHELASTIC_RUN_ID="test")

def patched(visible, extra, f):
    calls = []
    patches = [*gpus(visible, calls), mock.patch.dict(os.environ, TORCHRUN), *extra(calls)]
    for p in patches:
        p.start()
    try:
        return f(calls)
    finally:
        for p in reversed(patches):
            p.stop()

def fake_init(calls):
    def init(backend, **kwargs):
        calls.append(("init_process_group", backend, str(kwargs.get("device_id"))))
    return [mock.patch.object(cluster, "rendezvous_store"), mock.patch("atexit.register"),
            mock.patch("torch.distributed.init_process_group", side_effect=init)]

def init_distributed(visible):
    cfg = SimpleNamespace(recipe=SimpleNamespace(backend="auto", timeout=5),
                          exp_manager=SimpleNamespace(explicit_log_dir=tempfile.mkdtemp()))
    return patched(visible, fake_init, lambda calls: (cluster.init_distributed(cfg), calls)[1])

def root_device(visible):
    cfg = OmegaConf.create({"recipe": {"backend": "auto", "timeout": 5}})
    return patched(visible, lambda calls: [], lambda calls: str(pl.Trainer(
        accelerator="auto", devices=4, num_nodes=1, strategy=recipe.ddp(cfg, per_node=4), logger=False,
        enable_checkpointing=False, enable_progress_bar=False).strategy.root_device))

def megatron(visible):
    import megatron_parallel
    def stop(backend, **kwargs):
        raise RuntimeError(f"init_process_group {backend} device_id={kwargs.get('device_id')}")
    args = SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, backend="auto", timeout=5)
    def go(calls):
        try:
            megatron_parallel.setup(args)
        except RuntimeError as e:
            return [*calls, str(e)]
    return patched(visible, lambda calls: [mock.patch("torch.distributed.init_process_group", side_effect=stop)],
                   go)

check("init_one_visible")(lambda: init_distributed(1))
check("init_four_visible")(lambda: init_distributed(4))
check("root_one_visible")(lambda: root_device(1))
check("root_four_visible")(lambda: root_device(4))
check("megatron_one_visible")(lambda: megatron(1))

def tf32_in_fit(device, precision):  # the callbacks fit() gives the Trainer, their setup hook on this device
    torch.set_float32_matmul_precision("highest")
    captured = {}
    def trainer(**kwargs):
        captured.update(kwargs)
        raise KeyboardInterrupt  # stop fit() here
    cfg = cluster._compose([])
    with mock.patch.object(recipe.pl, "Trainer", side_effect=trainer):
        try:
            recipe.fit(cfg, 0.0, devices=1)
        except KeyboardInterrupt:
            pass
    fake = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), precision=precision)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for callback in captured["callbacks"]:
            if hasattr(callback, "setup"):
                callback.setup(fake, None, "fit")
        result = [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
                  torch.backends.cudnn.conv.fp32_precision, [str(w.message) for w in said]]
    torch.set_float32_matmul_precision("highest")
    return result

check("tf32_cuda_fp32")(lambda: tf32_in_fit("cuda:0", "32-true"))
check("tf32_cuda_bf16")(lambda: tf32_in_fit("cuda:0", "bf16-mixed"))
check("tf32_cpu_fp32")(lambda: tf32_in_fit("cpu", "32-true"))

def pinned(device):  # the loader ToyClassifier builds for a Trainer on this device
    cfg = cluster._compose(["model.train_ds.dataset_size=16", "model.train_ds.batch_size=4"])
    model = recipe.ToyClassifier(OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True)))
    trainer = SimpleNamespace(global_rank=0, world_size=1, strategy=SimpleNamespace(root_device=torch.device(device)))
    with mock.patch.object(type(model), "trainer", trainer):
        return model.train_dataloader().pin_memory

check("pin_cuda")(lambda: pinned("cuda:0"))
check("pin_cpu")(lambda: pinned("cpu"))
"""


@pytest.fixture(scope="module")
def gpu_facts():
    out = python("-c", GPU_FACTS, timeout=180).stdout
    print(out[-4000:])
    return {k: v for line in out.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


def test_torchrun_process_sets_its_gpu_then_binds_nccl_to_it(gpu_facts):
    """torch.cuda.set_device before init_process_group, and NCCL's communicator bound to that GPU (device_id=),
    which is local rank modulo the GPUs the process sees: LOCAL_RANK 3 that sees one GPU is cuda:0, not cuda:3.
    megatron_parallel.py too."""
    assert gpu_facts["init_one_visible"] == [["set_device", "cuda:0"], ["init_process_group", "nccl", "cuda:0"]]
    assert gpu_facts["init_four_visible"] == [["set_device", "cuda:3"], ["init_process_group", "nccl", "cuda:3"]]
    assert gpu_facts["megatron_one_visible"] == [["set_device", "cuda:0"], "init_process_group nccl device_id=cuda:0"]


def test_lightning_root_device_is_the_gpu_init_distributed_chose(gpu_facts):
    """Lightning's DDP reuses the process group; its root device (parallel_devices[local rank]) must be the GPU the
    group's communicator was bound to, not Lightning's own cuda:<local rank>."""
    assert_lightning_root_device_is_the_bound_gpu(gpu_facts)


def test_tf32_for_fp32_runs_on_the_gpu_only_and_without_warnings(gpu_facts):
    """CONTRACT.md C10, through the callbacks fit() gives the Trainer: TF32 matmuls and convolutions for fp32 on a
    GPU, by the API whose state Lightning can still read (torch.get_float32_matmul_precision), with no warning;
    nothing under --amp or on the CPU."""
    assert_tf32_for_fp32_on_the_gpu_only(gpu_facts)


def test_loader_pins_memory_on_the_gpu_only(gpu_facts):
    assert (gpu_facts["pin_cuda"], gpu_facts["pin_cpu"]) == (True, False)


# ------------------------------------------------------------------------------------------ Megatron-Core


def documented_layout(world, tp, pp):
    """Megatron-Core's documented rank order (parallel_state.initialize_model_parallel, order "tp-cp-ep-dp-pp"):
    rank = tp_rank + tp * (dp_rank + dp * pp_rank). TP groups are runs of tp consecutive ranks; a DP group takes
    one rank per TP group inside a pipeline stage; a PP group takes the same (tp, dp) position in every stage."""
    dp = world // (tp * pp)
    rank = {(t, d, p): t + tp * (d + dp * p) for t in range(tp) for d in range(dp) for p in range(pp)}
    layout = {}
    for (t, d, p), r in rank.items():
        layout[r] = {"tp": [rank[(i, d, p)] for i in range(tp)], "dp": [rank[(t, i, p)] for i in range(dp)],
                     "pp": [rank[(t, d, i)] for i in range(pp)]}
    return layout


@pytest.mark.parametrize("world, tp, pp", [(4, 2, 1), (2, 1, 2)], ids=["4=tp2xdp2", "2=pp2"])
def test_megatron_group_layout_and_stages(tmp_path, world, tp, pp):
    """The groups in Megatron's documented order, and each rank builds only its pipeline stage: 2 layers, the
    embedding on the first stage alone, the output layer and loss on the last alone (on CPU the script stops after
    the build: Megatron-Core's training step needs CUDA)."""
    layout_file = tmp_path / "layout.json"
    out = run([*torchrun("nemo"), "--standalone", "--nproc_per_node", world, "megatron_parallel.py",
               "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
               "--layout-file", layout_file], cwd=FOLDER, timeout=240).stdout
    assert f"[rank0] world size {world} = tensor {tp} x pipeline {pp} x data {world // (tp * pp)}" in out, out[-3000:]
    got = {int(r): v for r, v in json.loads(layout_file.read_text()).items()}
    assert {r: {k: v[k] for k in ("tp", "pp", "dp")} for r, v in got.items()} == documented_layout(world, tp, pp)
    for r, v in got.items():
        stage = v["pp"].index(r)
        assert v["stage"]["stage"] == stage and v["stage"]["layers"] == 2, v
        assert (v["stage"]["embedding"], v["stage"]["output_layer"]) == (stage == 0, stage == pp - 1), v


@pytest.mark.parametrize("sizes, world, message", [
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2,
     "tensor 2 x pipeline 2 = 4 model-parallel ranks, but the world size is 2"),
    (["--tensor-model-parallel-size", "3"], 3, "--tensor-model-parallel-size 3 must divide the model's 4 attention "
                                               "heads"),
], ids=["too-many-ranks", "tp-and-heads"])
def test_megatron_bad_layout_is_one_line(sizes, world, message):
    """Checked before any rendezvous: rank 0 of the launch (as torchrun sets it) stops at once. TP must also split
    the 4 heads whole (before: TP 3 went on to the rendezvous and waited for the other ranks)."""
    env = clean_env(RANK=0, WORLD_SIZE=world, LOCAL_RANK=0, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=free_port())
    proc = subprocess.run([str(env_python("nemo")), "megatron_parallel.py", *sizes], cwd=FOLDER, env=env,
                          capture_output=True, text=True, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ NeMo-Run

def nemo_run_launch(*args, env=None, timeout=120):
    """launch_nemo_run.py with NeMo-Run's own environment (.venvs/nemo-run, requirements-run.txt)."""
    return subprocess.run([str(env_python("nemo-run")), "launch_nemo_run.py", *map(str, args)], cwd=FOLDER,
                          env=env or clean_env(COLUMNS=400), capture_output=True, text=True, timeout=timeout)


def test_nemo_run_dry_run_prints_the_job_script(tmp_path):
    """--dryrun: the sbatch script NeMo-Run's SlurmExecutor would submit -- one task per GPU on every node,
    Slurm's warning signal to every rank, requeue on failure, the recipe's rendezvous, srun's own
    --cpus-per-task, multinode.py run by the training interpreter with the training flags -- and nothing
    submitted."""
    proc = nemo_run_launch("--nodes", 2, "--gpus-per-node", 4, "--cpus-per-gpu", 2, "--account", "acct",
                           "--partition", "gpu", "--time", "01:30:00", "--python", "/opt/nemo-env/bin/python",
                           "--name", "toy", "--checkpoint-dir", tmp_path / "ckpt", "--dryrun",
                           "--", "--epochs", 3, "model.optim.lr=0.05",
                           env=clean_env(COLUMNS=400, NEMORUN_HOME=tmp_path / "home"))
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR1@90", "#SBATCH --account=acct", "#SBATCH --job-name=nemo-run-toy\n",
                 "#SBATCH --partition=gpu", "#SBATCH --time=01:30:00", "export TORCHX_MAX_RETRIES=3",
                 "export OMP_NUM_THREADS=2", "export MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))",
                 "scontrol requeue"):
        assert line in out, f"{line!r} not in the job script:\n{out[-4000:]}"
    step = re.search(r"^\s*srun .*$", out, re.M)
    assert step and "--cpus-per-task=2" in step[0], out[-4000:]
    assert (f"/opt/nemo-env/bin/python {FOLDER / 'multinode.py'} --checkpoint-dir {tmp_path / 'ckpt'} "
            f"--epochs 3 model.optim.lr=0.05") in step[0], step[0]


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "argument --nodes: must be a positive integer, got 0"),
    (["--time", "90"], "argument --time: want [D-]HH:MM[:SS], got 90"),
    (["--retries", "-1"], "--retries must be >= 0, got -1"),
], ids=["nodes", "time", "retries"])
def test_nemo_run_bad_arguments_are_one_line(args, message):
    proc = nemo_run_launch(*args, "--dryrun")
    errors = [ln for ln in proc.stderr.splitlines() if ERROR_LINE.match(ln)]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------------ private API


def private_names(path):
    """(line, name) of each private name (a leading underscore) that the module at `path` takes from elsewhere: an
    attribute it does not define itself (`checkpoint._save_last_checkpoint`, `self._cfg` of a base class), an
    import of one, or an import from a module path with a private part."""
    tree = ast.parse(path.read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.ImportFrom):
            names = [*(node.module or "").split("."), *(a.name for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [part for a in node.names for part in a.name.split(".")]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.startswith("_") and not n.endswith("__") and n not in own]
    return found


def test_private_api_is_used_in_cluster_py_alone_each_use_tagged_with_the_pinned_version():
    """NeMo's, Lightning's and Megatron-Core's private names break without notice on an upgrade: none is used
    outside cluster.py, and there each sits on, or right below, a `# WORKAROUND(package version, ...)` line. A
    tagged package pinned in requirements.txt names the pinned version (the one it was checked against): a new pin
    fails here until each workaround is checked again."""
    pins = dict(re.findall(r"^([\w-]+)(?:\[\w,]+\])?==(\S+)", (FOLDER / "requirements.txt").read_text(), re.M))
    wrong = []
    for path in sorted(FOLDER.glob("*.py")):
        if path.name == "toolkit.py":
            continue  # the same file in every folder, standard library only (test_contract.py)
        lines = path.read_text().splitlines()
        for n, name in private_names(path):
            if path.name != "cluster.py" or not any("# WORKAROUND(" in lines[i] for i in (n - 2, n - 1) if i >= 0):
                wrong.append(f"nemo/{path.name}:{n} uses the private {name}: in cluster.py only, under a WORKAROUND")
        for n, line in enumerate(lines, 1):
            for package, version in re.findall(r"# WORKAROUND\(([\w-]+) ([\w.]+),", line):
                if not pins.get(package, version).startswith(version):
                    wrong.append(f"nemo/{path.name}:{n}: {package} {version} checked, {pins[package]} pinned")
    assert not wrong, "\n".join(wrong)
