"""lightning/ recipes on CPU (gloo), every one launched as a real process with .venvs/lightning.

Tiny data (a few steps per epoch) keeps the whole file to about a minute on two idle cores.
"""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port, run,
                     run_killing_a_worker_twice, torchrun)
from recipes import (LIGHTNING_FACT_CHECK, RECIPES, assert_lightning_root_device_is_the_bound_gpu,
                     assert_tf32_for_fp32_on_the_gpu_only, wait_all)

pytestmark = [pytest.mark.lightning, pytest.mark.timeout(300)]

FOLDER = ROOT / "lightning"
# 256 samples, 2 ranks x batch 32: 4 steps per epoch
SMALL = ["--epochs", "2", "--dataset-size", "256", "--batch-size", "32", "--log-every", "2"]


def script(name):
    return FOLDER / name


def weights(checkpoint_dir):
    ckpt = torch.load(checkpoint_dir / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt


def world_size(output):
    return int(re.search(r"^\[rank0\] world size (\d+) \|", output, re.M).group(1))


def run_slurm_tasks(args, *, ntasks, timeout=120):
    """multinode.py as `ntasks` srun tasks on this host (tests/recipes.py); (exit codes, outputs)."""
    codes, outputs = wait_all(RECIPES["lightning"].srun(args, ntasks, free_port()), timeout)
    sys.stdout.write("\n".join(f"--- task {r} ---\n{o[-2000:]}" for r, o in enumerate(outputs)))
    return codes, outputs


def test_multigpu_spawn_two_ranks_writes_timings(tmp_path):
    timings = tmp_path / "timings.json"
    out = run([env_python("lightning"), script("multigpu.py"), *SMALL, "--nprocs", "2",
               "--checkpoint-dir", tmp_path / "ckpt", "--timings-file", timings],
              env=clean_env(MASTER_PORT=free_port())).stdout
    assert len(epoch_lines(out)) == 2 and world_size(out) == 2
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    t = json.loads(timings.read_text())
    assert t["world_size"] == 2 and t["batch_size"] == 32
    assert len(t["step_end_times"]) == 8  # 2 epochs x 256 / (2 x 32)
    assert t["start_time"] < t["step_end_times"][0] <= t["step_end_times"][-1]


def test_multinode_emulated_slurm_two_tasks(tmp_path):
    """Two tasks on one node, started the way srun starts them: Lightning takes the ranks from SLURM_*."""
    codes, outputs = run_slurm_tasks([*SMALL, "--checkpoint-dir", tmp_path], ntasks=2)
    assert codes == [0, 0]
    assert len(epoch_lines(outputs[0])) == 2 and world_size(outputs[0]) == 2
    assert not epoch_lines(outputs[1])  # reporting is rank 0's job
    assert weights(tmp_path)[1]["global_step"] == 8


def test_a_rank_lost_mid_training_is_one_clear_line(tmp_path):
    """kill -9 of one task (its node died): the survivor's next all-reduce fails; it says so in one line and
    exits 1 instead of printing Lightning's and gloo's traceback wall."""
    procs = RECIPES["lightning"].srun(["--epochs", "100", *SMALL[2:-1], "1", "--timeout", "60"], 2, free_port())
    first = ""
    for line in procs[0].stdout:
        first += line
        if "| step 3 |" in line:
            os.killpg(procs[1].pid, signal.SIGKILL)
            break
    codes, outputs = wait_all(procs, timeout=120)
    out = first + outputs[0]
    errors = [ln for ln in out.splitlines() if re.match(r"\[rank0\] error: ", ln)]
    assert codes[0] == 1 and len(errors) == 1 and "Traceback" not in out, out
    assert "lost contact with another rank" in errors[0], errors


def test_multinode_devices_mismatch_is_a_clear_error(tmp_path):
    """--devices 1 with --ntasks-per-node=2: one clear line and exit 2 on every task, not a hang."""
    codes, outputs = run_slurm_tasks([*SMALL, "--devices", "1", "--checkpoint-dir", tmp_path], ntasks=2, timeout=60)
    assert codes == [2, 2]
    assert "--devices 1 but the job has --ntasks-per-node=2" in outputs[0]
    assert "Traceback" not in outputs[0] + outputs[1]
    assert "error:" not in outputs[1]  # printed once, by task 0


def resume_base():
    return [env_python("lightning"), script("single_gpu.py"), "--dataset-size", "256", "--batch-size", "32",
            "--log-every", "1000"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """2 epochs of 8 steps, uninterrupted: what every stopped and resumed run must end with."""
    ckpt = tmp_path_factory.mktemp("straight")
    run([*resume_base(), "--epochs", "2", "--checkpoint-dir", ckpt])
    return ckpt


def test_resume_from_last_ckpt_matches_uninterrupted_run(straight, tmp_path):
    """2 epochs straight == 1 epoch, stop, then resume from last.ckpt for the second (same weights)."""
    resumed = tmp_path / "resumed"
    base = resume_base()
    run([*base, "--epochs", "2", "--max-steps", "8", "--checkpoint-dir", resumed])  # stops after epoch 1
    assert weights(resumed)[1]["global_step"] == 8
    out = run([*base, "--epochs", "2", "--checkpoint-dir", resumed]).stdout
    assert "Restored all states from the checkpoint" in out
    assert weights(resumed)[1]["global_step"] == 16
    assert_same_weights(weights(straight)[0], weights(resumed)[0])


def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(tmp_path):
    """A worker killed (kill -9) after the first epoch's checkpoint, and again right after the restart resumed:
    torchrun --max-restarts restarts both workers twice, they resume and end with the uninterrupted run's
    weights. (Before: the restarted workers failed in gloo's connectFullMesh -- torch 2.13's agent store still
    held the dead workers' addresses -- until the restarts were used up; cluster.rendezvous_store gives each
    attempt its own key prefix.)"""
    args = ["--epochs", "3", "--dataset-size", "1024", "--batch-size", "32", "--log-every", "1000",
            "--timeout", "60"]
    launch = [*torchrun("lightning"), "--standalone", "--nproc_per_node", "2"]
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    run([*launch, script("multigpu_torchrun.py"), *args, "--checkpoint-dir", straight])
    cmd = [*launch, "--max-restarts", "2", script("multigpu_torchrun.py"), *args, "--checkpoint-dir", restarted]
    code, out, kills = run_killing_a_worker_twice(cmd)
    assert code == 0 and "connectFullMesh" not in out, out
    assert kills == 2 and len(re.findall(r"\[rank0\] resumed from \S+: epoch 2, step 16", out)) == 2, out
    assert "done: 48 steps" in out, out
    assert_same_weights(weights(straight)[0], weights(restarted)[0])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_preempted_mid_epoch_resumes_after_the_batches_it_trained(straight, tmp_path, sig):
    """A preemption signal at step 2: the run stops at step 10 (PREEMPTION.CHECK_EVERY), batch 2 of epoch 2, saves
    preempted-step=10.ckpt and exits 75; resumed, epoch 2 goes on with batch 3 and the weights equal the
    uninterrupted run's. Both found by the fault soak: before recipe.ResumableLoader Lightning restarted epoch 2 at
    its first batch; before Preemption.on_train_start, SIGTERM reached Lightning's own handler, which ended the
    run at the next batch with exit 0 and no checkpoint."""
    args = [*resume_base(), "--epochs", "2", "--log-every", "2", "--checkpoint-dir", tmp_path]
    proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "| step 2 |" in line:  # training is under way
            proc.send_signal(sig)
    assert proc.wait(timeout=120) == 75, "".join(seen)
    assert "preempted at step 10" in "".join(seen), "".join(seen)
    out = run([*resume_base(), "--epochs", "2", "--checkpoint-dir", tmp_path]).stdout
    assert "preempted-step=10.ckpt: epoch 2, step 10" in out and "not resumable" not in out, out
    assert weights(tmp_path)[1]["global_step"] == 16
    assert_same_weights(weights(straight)[0], weights(tmp_path)[0])


# sbatch's batch shell: the job's SLURM_NTASKS but no SLURM_STEP_ID, because srun was forgotten
BATCH_SHELL = {"SLURM_JOB_ID": 4242, "SLURM_NTASKS": 2, "SLURM_NTASKS_PER_NODE": 2, "SLURM_NNODES": 1,
               "SLURM_PROCID": 0}


@pytest.mark.parametrize("cmd, env, message", [
    (["single_gpu.py", "--data", "mnist"], {}, "invalid choice: 'mnist'"),
    (["multigpu_torchrun.py"], {}, "start this script with torchrun"),
    (["multinode.py"], {}, "submit multinode.sbatch"),
    (["multinode.py"], BATCH_SHELL, "started without srun"),
    (["single_gpu.py", "--dataset-size", "16"], {}, "too small for one step"),
], ids=["mnist", "no-torchrun", "no-slurm", "no-srun", "tiny-dataset"])
def test_bad_input_is_a_clear_error(tmp_path, cmd, env, message):
    proc = run([env_python("lightning"), script(cmd[0]), *cmd[1:], "--checkpoint-dir", tmp_path],
               env=clean_env(**env), expect_fail=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stdout
    assert "Traceback" not in proc.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.lint
def test_sbatch_templates_pair_tasks_with_lightning():
    """The pairing Lightning needs (the contract tests lint every template): one task per device where its
    SLURMEnvironment runs, exactly one task where Lightning or torchrun spawn the workers."""
    templates = sorted(FOLDER.glob("*.sbatch"))
    assert [t.stem for t in templates] == ["multigpu", "multigpu_torchrun", "multinode", "single_gpu"]
    for path in templates:
        text = path.read_text()
        assert f'{path.stem}.py --checkpoint-dir "checkpoints/$RUN" "$@"' in text, path.name
        assert "#SBATCH --requeue" in text, path.name  # every template that trains is preemption-safe (C8)
        if path.stem != "multinode":
            assert "#SBATCH --ntasks-per-node=1 " in text, path.name


PRECISION_RULE = """
from types import SimpleNamespace
from unittest import mock
import recipe
for capability in [(7, 0), (7, 5), (8, 0), (9, 0)]:
    with mock.patch("torch.cuda.is_available", return_value=True), \\
         mock.patch("torch.cuda.get_device_capability", return_value=capability), \\
         mock.patch("torch.cuda.is_bf16_supported", return_value=True):  # True on V100/T4 too (emulation)
        print(capability, recipe.mixed_precision(SimpleNamespace(amp=True)))
print("cpu", recipe.mixed_precision(SimpleNamespace(amp=True)), recipe.mixed_precision(SimpleNamespace(amp=False)))
"""


def test_amp_rule_bf16_only_where_native():
    """--amp: bf16 by compute capability (never by is_bf16_supported(), which counts emulation), else fp16."""
    out = run([env_python("lightning"), "-c", PRECISION_RULE], cwd=FOLDER).stdout.splitlines()
    assert [ln for ln in out if ln[:1] in "(c"] == [
        "(7, 0) 16-mixed", "(7, 5) 16-mixed", "(8, 0) bf16-mixed", "(9, 0) bf16-mixed", "cpu bf16-mixed 32-true"]


RESUME_CHOICE = """
import sys, torch, cluster
d = sys.argv[1]
torch.save({"global_step": 130}, f"{d}/epoch=2-step=130.ckpt")  # what ModelCheckpoint writes after the stop
torch.save({"global_step": 130}, f"{d}/preempted-step=130.ckpt")  # saved at the step boundary, mid-epoch
torch.save({"global_step": 64}, f"{d}/zz-late-but-older.ckpt")  # newest file, least progress
print(cluster.resume_from(d))
"""


def test_resume_takes_the_most_progress_and_the_preemption_checkpoint_on_a_tie(tmp_path):
    """Never the newest file; on equal steps the preemption checkpoint, because the epoch checkpoint Lightning
    writes after a mid-epoch stop claims the epoch ran to its end (a resumed run then skipped its rest)."""
    out = run([env_python("lightning"), "-c", RESUME_CHOICE, tmp_path], cwd=FOLDER).stdout.strip().splitlines()
    assert out[-1] == str(tmp_path / "preempted-step=130.ckpt")


# ---------------------------------------------------------------------------------- GPU truth (issue #22), on CPU
# One process of .venvs/lightning checks the seams with torch's GPU answers patched in (this machine has no GPU);
# each check prints one JSON line {check: result} (an exception is a result too), the tests below read them.
GPU_FACTS = r"""
import json, os, sys, warnings
from types import SimpleNamespace
from unittest import mock
import torch
import lightning.pytorch as pl
from lightning.fabric.accelerators import cuda as fabric_cuda
import cluster, recipe, toolkit

""" + LIGHTNING_FACT_CHECK + r"""

def gpus(count):  # torch and Lightning see `count` CUDA devices; set_device only records
    calls = []
    patches = [mock.patch("torch.cuda.is_available", return_value=True),
               mock.patch("torch.cuda.device_count", return_value=count),
               mock.patch.object(fabric_cuda, "num_cuda_devices", return_value=count),
               mock.patch("torch.cuda.set_device", side_effect=lambda d: calls.append(("set_device", str(d))))]
    return patches, calls

TORCHRUN = dict(RANK="3", LOCAL_RANK="3", GROUP_RANK="0", WORLD_SIZE="4", LOCAL_WORLD_SIZE="4",
                MASTER_ADDR="127.0.0.1", MASTER_PORT="29999", TORCHELASTIC_RUN_ID="test")

def init_distributed(visible):
    patches, calls = gpus(visible)
    def fake_init(backend, **kwargs):
        calls.append(("init_process_group", backend, str(kwargs.get("device_id"))))
    patches += [mock.patch.dict(os.environ, TORCHRUN), mock.patch.object(cluster, "rendezvous_store"),
                mock.patch("torch.distributed.init_process_group", side_effect=fake_init),
                mock.patch("atexit.register")]
    for p in patches:
        p.start()
    try:
        cluster.init_distributed(SimpleNamespace(backend="auto", timeout=5))
    finally:
        for p in reversed(patches):
            p.stop()
    return calls

def root_device(visible):
    patches, _ = gpus(visible)
    patches.append(mock.patch.dict(os.environ, TORCHRUN))
    for p in patches:
        p.start()
    try:
        args = SimpleNamespace(backend="auto", timeout=5)
        trainer = pl.Trainer(accelerator="auto", devices=4, num_nodes=1, strategy=recipe.ddp(args, per_node=4),
                             logger=False, enable_checkpointing=False, enable_progress_bar=False)
        return str(trainer.strategy.root_device)
    finally:
        for p in reversed(patches):
            p.stop()

check("init_one_visible")(lambda: init_distributed(1))
check("init_four_visible")(lambda: init_distributed(4))
check("root_one_visible")(lambda: root_device(1))
check("root_four_visible")(lambda: root_device(4))

def tf32(device, precision):
    torch.set_float32_matmul_precision("highest")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        callback = [c for c in recipe.trainer_options(SimpleNamespace(
            checkpoint_dir=None, timings_file=None, log_every=1, epochs=1, max_steps=None, amp=False), 0.0
        )["callbacks"] if type(c).__name__ == "TF32"][0]
        callback.setup(SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                                       precision=precision), None, "fit")
        result = [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
                  torch.backends.cudnn.conv.fp32_precision, [str(w.message) for w in said]]
    torch.set_float32_matmul_precision("highest")
    return result

check("tf32_cuda_fp32")(lambda: tf32("cuda:0", "32-true"))
check("tf32_cuda_bf16")(lambda: tf32("cuda:0", "bf16-mixed"))
check("tf32_cpu_fp32")(lambda: tf32("cpu", "32-true"))

def pinned(device):
    args = SimpleNamespace(seed=0, batch_size=4, num_workers=0)
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    return recipe.build_loader(recipe.synthetic_dataset(16), args, 0, 1, trainer).pin_memory

check("pin_cuda")(lambda: pinned("cuda:0"))
check("pin_cpu")(lambda: pinned("cpu"))

def refused(script, argv, env):  # the script's main() up to where it stops; torch is a CPU-only build here
    module = __import__(script)
    with mock.patch.object(sys, "argv", [f"{script}.py", *argv]), mock.patch.dict(os.environ, env):
        try:
            module.main()
        except toolkit.RecipeError as e:
            return f"RecipeError: {e}"
    return "trained"

SMOKE = ["--epochs", "1", "--dataset-size", "16", "--batch-size", "4", "--max-steps", "1", "--log-every", "1"]
check("c12_slurm_gpus")(lambda: refused("single_gpu", SMOKE, {"SLURM_GPUS_ON_NODE": "2"}))
check("c12_nccl_before_torchrun")(lambda: refused("multigpu_torchrun", [*SMOKE, "--backend", "nccl"], {}))
check("c12_gloo_trains")(lambda: refused("single_gpu", [*SMOKE, "--backend", "gloo"], {"SLURM_GPUS_ON_NODE": "2"}))
"""


@pytest.fixture(scope="module")
def gpu_facts():
    out = run([env_python("lightning"), "-c", GPU_FACTS], cwd=FOLDER, timeout=120).stdout
    print(out[-4000:])
    return {k: v for line in out.splitlines() if line.startswith("{") for k, v in json.loads(line).items()}


def test_torchrun_process_sets_its_gpu_then_binds_nccl_to_it(gpu_facts):
    """torch.cuda.set_device before init_process_group, and NCCL's communicator bound to that GPU (device_id=),
    which is local rank modulo the GPUs the process sees: LOCAL_RANK 3 that sees one GPU is cuda:0, not cuda:3."""
    assert gpu_facts["init_one_visible"] == [["set_device", "cuda:0"], ["init_process_group", "nccl", "cuda:0"]]
    assert gpu_facts["init_four_visible"] == [["set_device", "cuda:3"], ["init_process_group", "nccl", "cuda:3"]]


def test_lightning_root_device_is_the_gpu_init_distributed_chose(gpu_facts):
    """Lightning's DDP reuses the process group; its root device (parallel_devices[local rank]) must be the GPU the
    group's communicator was bound to, not Lightning's own cuda:<local rank>."""
    assert_lightning_root_device_is_the_bound_gpu(gpu_facts)


def test_tf32_for_fp32_runs_on_the_gpu_only_and_without_warnings(gpu_facts):
    """CONTRACT.md C10: TF32 matmuls and convolutions for fp32 on a GPU, through the API whose state Lightning can
    still read (torch.get_float32_matmul_precision), with no warning; nothing under --amp or on the CPU."""
    assert_tf32_for_fp32_on_the_gpu_only(gpu_facts)


def test_loader_pins_memory_on_the_gpu_only(gpu_facts):
    assert (gpu_facts["pin_cuda"], gpu_facts["pin_cpu"]) == (True, False)


def test_no_silent_cpu_stops_before_the_launch_checks(gpu_facts):
    """CONTRACT.md C12 with torch a CPU-only build: given GPUs (SLURM_GPUS_ON_NODE) or --backend nccl, the script
    stops in parse_args, before Lightning picks the CPU and before multigpu_torchrun.py's 'start with torchrun'."""
    assert gpu_facts["c12_slurm_gpus"].startswith("RecipeError: SLURM_GPUS_ON_NODE=2, but torch ")
    assert "rather than training on the CPU" in gpu_facts["c12_slurm_gpus"]
    assert gpu_facts["c12_nccl_before_torchrun"].startswith("RecipeError: --backend nccl, but torch ")
    assert gpu_facts["c12_gloo_trains"] == "trained"
