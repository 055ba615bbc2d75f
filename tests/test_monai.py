"""monai/ recipes, launched for real on CPU with gloo: the torchrun run every other launch pattern must equal
(tests/test_behaviour.py compares them), the distributed Dice, preemption and resume, Decathlon-layout NIfTI data
written here, and bad input.

Volumes are tiny (20^3, crops 16^3) and there are 15 cases (12 training, 3 validation), so a 2-rank run trains
in about a second; most of each launch is importing torch and MONAI.
"""

import gzip
import json
import re
import shutil
import signal
import struct

import numpy as np
import pytest
import torch
from helpers import (ROOT, assert_same_weights, clean_env, env_python, epoch_lines, free_port, run, teardown_checked,
                     torchrun)
from recipes import (NO_SILENT_CPU_CHECK, PROBE_CHECKS, RECIPES, TF32_CHECK, assert_no_silent_cpu, scripts_not_run,
                     shared_dir, wait_all)

pytestmark = [pytest.mark.monai, pytest.mark.timeout(300)]

FOLDER = ROOT / "monai"
CASES, ROI = 12, 16  # 12 training cases (+ 3 validation cases)
SMALL = ["--epochs", "2", "--dataset-size", str(CASES), "--roi-size", str(ROI), "--log-every", "1"]
STEPS = 2 * (12 // 2)  # 12 training cases, 2 ranks x batch 1 (or 1 rank x batch 2): 6 steps per epoch
ERROR_LINE = re.compile(r"^(\[rank\d+\] )?error: ")


def python(*args, **kw):
    return run([env_python("monai"), *args], cwd=FOLDER, **kw)


def torchrun_standalone(script, nproc, *args, **kw):
    return run([*torchrun("monai"), "--standalone", "--nproc_per_node", str(nproc), FOLDER / script, *args],
               cwd=FOLDER, **kw)


def snapshot(ckpt_dir, name="snapshot.pt"):
    return torch.load(ckpt_dir / name, map_location="cpu", weights_only=True)


def validation_dice(out):
    return [float(x) for x in re.findall(r"^\[rank0\] validation dice (\S+) over", out, re.M)]


def assert_one_error_line(proc, message):
    assert proc.returncode == 2, proc.stdout
    errors = [ln for ln in proc.stdout.splitlines() if ERROR_LINE.match(ln)]
    assert len(errors) == 1 and message in errors[0], proc.stdout
    assert "Traceback" not in proc.stdout


# ------------------------------------------------------------------------------------------ NIfTI, written here


def write_nifti(path, volume, spacing=1.5):
    """A gzipped NIfTI-1 file (348-byte header, 4 bytes of no extension, voxels in Fortran order), written from
    the format's specification rather than with nibabel, so the recipe's reader is checked against the format."""
    codes = {np.dtype(np.uint8): (2, 8), np.dtype(np.float32): (16, 32)}
    datatype, bitpix = codes[volume.dtype]
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, volume.ndim, *volume.shape, *[1] * (7 - volume.ndim))
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1.0, *[spacing] * 3, *[1.0] * 4)
    struct.pack_into("<f", header, 108, 352.0)  # vox_offset
    struct.pack_into("<f", header, 112, 1.0)  # scl_slope
    struct.pack_into("<hh", header, 252, 0, 1)  # qform_code unknown, sform_code scanner
    for row in range(3):
        srow = [0.0, 0.0, 0.0, 0.0]
        srow[row] = spacing
        struct.pack_into("<4f", header, 280 + 16 * row, *srow)
    header[344:348] = b"n+1\0"
    with gzip.open(path, "wb") as f:
        f.write(bytes(header) + volume.tobytes(order="F"))


def write_task(folder, cases=6, edge=20, seed=0):
    """A Medical Segmentation Decathlon task folder: dataset.json, imagesTr/, labelsTr/ with cubes in noise."""
    rng = np.random.default_rng(seed)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    training = []
    for i in range(cases):
        label = np.zeros((edge,) * 3, np.uint8)
        lo = rng.integers(2, edge // 2, size=3)
        label[lo[0]:lo[0] + 6, lo[1]:lo[1] + 6, lo[2]:lo[2] + 6] = 1
        image = (label + rng.normal(0, 0.3, label.shape)).astype(np.float32)
        write_nifti(folder / "imagesTr" / f"cube_{i}.nii.gz", image)
        write_nifti(folder / "labelsTr" / f"cube_{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/cube_{i}.nii.gz", "label": f"./labelsTr/cube_{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({
        "name": "Cubes", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "cube"},
        "numTraining": cases, "training": training, "test": []}))
    return folder


# ------------------------------------------------------------------------------------------ reference runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Where the first run writes the synthetic task folder: the data dir of tests/recipes.py's monai runs too."""
    return shared_dir(tmp_path_factory, "monai-data")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process, batch 2, --val-every left at its default (2): validated after the last epoch only."""
    ckpt = tmp_path_factory.mktemp("single")
    out = python("single_gpu.py", *SMALL, "--batch-size", "2", "--data-dir", data_dir, "--checkpoint-dir", ckpt).stdout
    return ckpt, out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """2 ranks x batch 1 under torchrun, validated every epoch: what every other 2-rank launch must reproduce (the
    partitions depend on the world size, so a 2-rank run is compared with 2-rank runs): tests/recipes.py's run, which
    test_behaviour.py compares with the other launch patterns."""
    ran = RECIPES["monai"].run(tmp_path_factory, "torchrun")
    return ran.ckpt, ran.out


def test_single_process_writes_the_decathlon_layout_and_learns(reference, data_dir):
    ckpt, out = reference
    task = data_dir / f"synthetic-{CASES}+3cases-20vox"
    meta = json.loads((task / "dataset.json").read_text())
    assert len(meta["training"]) == CASES and len(meta["validation"]) == 3
    assert len(list((task / "imagesTr").glob("*.nii.gz"))) == len(list((task / "labelsTr").glob("*.nii.gz"))) == 15
    assert "12 training + 3 validation cases | 12 cached per rank | batch 2/rank x 4 crops | 6 steps/epoch" in out
    lines = epoch_lines(out)
    assert [(e.epoch, e.epochs, e.step, e.metric) for e in lines] == [(1, 2, 6, "dice"), (2, 2, 12, "dice")]
    # --val-every 2 (the default): epoch 1 not validated (dice nan), epoch 2 is (the last epoch always is)
    assert lines[0].value != lines[0].value and 0 <= lines[1].value <= 1 and len(validation_dice(out)) == 1, out
    snap = snapshot(ckpt)
    assert {"model", "optimizer", "scheduler", "epoch", "step", "batch_in_epoch", "world_size", "rng"} <= snap.keys()
    assert (snap["epoch"], snap["step"], snap["world_size"]) == (2, STEPS, 1)
    assert (ckpt / "snapshot.prev.pt").exists() and not list(ckpt.glob("*.tmp")) and not list(ckpt.glob("*.new"))
    best = snapshot(ckpt, "best_model.pt")
    assert best["dice"] == pytest.approx(max(validation_dice(out)), abs=1e-6)


def test_torchrun_ddp_caches_a_partition_per_rank_and_validates_every_epoch(ddp_run):
    ckpt, out = ddp_run
    assert "[rank0] world size 2 | device cpu | 12 training + 3 validation cases | 6 cached per rank" in out, out
    assert "[rank1] epoch" not in out
    assert teardown_checked(out, ranks=2), f"a DDP model outlived its process group (leave_process_group):\n{out}"
    assert [e.epoch for e in epoch_lines(out)] == [1, 2] and len(validation_dice(out)) == 2, out  # --val-every 1
    assert all(0 <= e.value <= 1 for e in epoch_lines(out)), out


DICE_OF_ALL = """
import os, torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete
from cluster import Ranks, parse_args
from recipe import build_dataset, build_model
args = parse_args("")
data = build_dataset(args, Ranks())  # one process: every validation case is its own
model = build_model(data).eval()
model.load_state_dict(torch.load(os.environ["SNAPSHOT"], weights_only=True)["model"])
metric = DiceMetric(include_background=False, reduction="mean")
to_pred, to_label = AsDiscrete(argmax=True, to_onehot=2), AsDiscrete(to_onehot=2)
with torch.no_grad():
    for case in data.val_cases:
        logits = sliding_window_inference(case["image"][None], (args.roi_size,) * 3, 4, model, overlap=0.25)
        metric(y_pred=[to_pred(logits[0])], y=[to_label(case["label"])])
print(f"cases {len(data.val_cases)} dice {metric.aggregate().item():.8f}")
"""


def test_distributed_dice_equals_one_process_over_the_union_of_shards(ddp_run, data_dir):
    """Each rank scored its own validation cases (2 + 1) and the sums were added over ranks; that must equal
    MONAI's DiceMetric over all 3 cases in one process, with the same final weights."""
    ckpt, out = ddp_run
    proc = python("-c", DICE_OF_ALL, *SMALL, "--batch-size", "1", "--data-dir", data_dir,
                  env=clean_env(SNAPSHOT=ckpt / "snapshot.pt"))
    one_process = float(re.search(r"cases 3 dice (\S+)", proc.stdout).group(1))
    assert validation_dice(out)[-1] == pytest.approx(one_process, abs=1e-6)


# ------------------------------------------------------------------------------------------ preemption, resume


def test_preempted_srun_ranks_save_exit_75_and_resume_exactly(ddp_run, data_dir, tmp_path):
    """SIGUSR1 to both srun-style ranks as soon as they are up: they agree to stop at the first check
    (PREEMPTION.CHECK_EVERY), rank 0 saves at once (no validation first), both exit 75; the relaunch resumes
    mid-epoch and ends with the uninterrupted run's weights."""
    args = [*SMALL, "--batch-size", "1", "--checkpoint-dir", tmp_path]
    procs = RECIPES["monai"].srun([*args, "--data-dir", data_dir], 2, free_port())
    head = []
    for line in procs[0].stdout:  # rank 0 is past its rendezvous: both ranks' handlers are installed
        head.append(line)
        if "[rank0] host" in line:
            break
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    codes, outs = wait_all(procs)
    outs[0] = "".join(head) + outs[0]
    assert codes == [75, 75], "\n".join(outs)
    # the way out with SystemExit(75) in flight frees the model before the process group (leave_process_group)
    assert all(teardown_checked(out, ranks=1) for out in outs), "\n".join(outs)
    stopped_at = int(re.search(r"preempted at step (\d+): snapshot saved", outs[0]).group(1))
    assert 0 < stopped_at < STEPS and snapshot(tmp_path)["step"] == stopped_at
    # between the last step and the snapshot nothing but the save: the seconds before the kill are not spent validating
    after_last_step = outs[0].split(f"| step {stopped_at} | loss ")[1].splitlines()[1:]
    assert after_last_step[0] == f"[rank0] snapshot saved to {tmp_path} (step {stopped_at})", outs[0]

    codes, outs = wait_all(RECIPES["monai"].srun([*args, "--data-dir", data_dir], 2, free_port()))
    assert codes == [0, 0], "\n".join(outs)
    assert "[rank0] host" in outs[0] and "[rank1] host" in outs[1]  # ranks came from SLURM_PROCID
    epoch = stopped_at // (STEPS // 2) + 1  # 6 steps per epoch; the check at step 10 is batch 4 of epoch 2
    assert f"resumed from {tmp_path / 'snapshot.pt'}: epoch {epoch}, step {stopped_at}" in outs[0]
    assert_same_weights(snapshot(tmp_path)["model"], snapshot(ddp_run[0])["model"])


def test_damaged_snapshot_falls_back_to_the_previous_one(reference, data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    data = (ckpt / "snapshot.pt").read_bytes()
    (ckpt / "snapshot.pt").write_bytes(data[: len(data) // 2])
    out = python("single_gpu.py", *SMALL, "--batch-size", "2", "--data-dir", data_dir, "--checkpoint-dir", ckpt).stdout
    assert f"{ckpt / 'snapshot.pt'} is unreadable" in out
    # the previous snapshot (epoch 1) is used, and only epoch 2 is trained again
    assert f"resumed from {ckpt / 'snapshot.prev.pt'}: epoch 2, step 6" in out and f"done: {STEPS} steps" in out
    assert_same_weights(snapshot(ckpt)["model"], snapshot(reference[0])["model"])
    # (a finished run resumed again trains 0 steps: tests/test_contract.py checks that for every folder)


# ------------------------------------------------------------------------------------------ data written here


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return write_task(tmp_path_factory.mktemp("task") / "Task00_Cubes")


def test_decathlon_task_folder_trains_with_amp(task, tmp_path):
    out = python("single_gpu.py", "--data", "decathlon", "--data-dir", task, "--roi-size", "16", "--epochs", "1",
                 "--batch-size", "1", "--amp", "--checkpoint-dir", tmp_path).stdout
    assert "5 training + 1 validation cases" in out
    (line,) = epoch_lines(out)
    assert line.loss == line.loss and 0 <= line.value <= 1  # finite loss, a Dice in [0, 1]
    assert snapshot(tmp_path)["step"] == 5 and (tmp_path / "best_model.pt").exists()


def broken_copy(task, tmp_path, how):
    bad = tmp_path / "task"
    shutil.copytree(task, bad)
    if how == "missing file":
        (bad / "labelsTr" / "cube_3.nii.gz").unlink()
    elif how == "shape mismatch":
        write_nifti(bad / "labelsTr" / "cube_2.nii.gz", np.zeros((20, 20, 12), np.uint8))
    elif how == "not nifti":
        (bad / "imagesTr" / "cube_1.nii.gz").write_bytes(b"this is not a NIfTI volume")
    elif how == "empty":
        shutil.rmtree(bad)
        bad.mkdir()
    elif how == "missing":
        shutil.rmtree(bad)
    return bad


@pytest.mark.parametrize("how, message", [
    ("empty", "is empty: expected a Medical Segmentation Decathlon task folder"),
    ("missing file", "names labelsTr/cube_3.nii.gz, which does not exist"),
    ("shape mismatch", "label labelsTr/cube_2.nii.gz has shape (20, 20, 12) but its image imagesTr/cube_2.nii.gz "
                       "has (20, 20, 20)"),
    ("not nifti", "cube_1.nii.gz is not a NIfTI file nibabel can read"),
])
def test_bad_data_is_one_clear_line(task, tmp_path, how, message):
    bad = broken_copy(task, tmp_path, how)
    proc = python("single_gpu.py", "--data", "decathlon", "--data-dir", bad, "--roi-size", "16",
                  expect_fail=True, timeout=120)
    assert_one_error_line(proc, message)


def test_bad_data_stops_spawn_before_any_worker_starts(task, tmp_path):
    bad = broken_copy(task, tmp_path, "missing")
    proc = python("multigpu.py", "--nprocs", "2", "--data", "decathlon", "--data-dir", bad, expect_fail=True,
                  timeout=120)
    assert_one_error_line(proc, f"data directory {str(bad)!r} does not exist")


# ------------------------------------------------------------------------------------------ bad launches


def test_bad_arguments_are_rejected_up_front():
    proc = python("single_gpu.py", "--roi-size", "18", expect_fail=True, timeout=60)
    assert_one_error_line(proc, "argument --roi-size: must be a multiple of 4 (the UNet halves it twice), got 18")


def test_world_size_larger_than_the_data(data_dir):
    # 1 training case (+ 1 for validation): 2 ranks cannot share it. Only rank 0 reports it.
    proc = torchrun_standalone("multigpu_torchrun.py", 2, "--dataset-size", "1", "--roi-size", "16", "--batch-size",
                               "1", "--data-dir", data_dir, expect_fail=True, timeout=180)
    errors = [ln for ln in proc.stdout.splitlines() if ERROR_LINE.match(ln)]
    assert errors == ["[rank0] error: the dataset has 1 training cases but the world size is 2: some ranks would "
                      "get no data"], proc.stdout


def test_torchrun_script_without_torchrun():
    proc = python("multigpu_torchrun.py", env=clean_env(WORLD_SIZE=2), expect_fail=True, timeout=60)
    assert_one_error_line(proc, "RANK, LOCAL_RANK not set: launch with `torchrun")


def test_every_recipe_script_is_exercised():
    """Guard: a new script in monai/ must get a test here (or a run in tests/recipes.py's table)."""
    assert scripts_not_run("monai", __file__) == set()


def test_the_readmes_spleen_commands_train_several_steps_per_epoch():
    """#26: the README's Spleen command for multinode.sbatch (2 x 8 GPUs) gave floor(floor(33 / 16) / 2) = 1 step per
    epoch and no --val-every. Every Spleen command it shows now takes at least 2 steps per epoch at its world size
    (33 training cases: 41 labelled, the last fifth validates), and names --val-every when it runs on several GPUs."""
    template = (FOLDER / "multinode.sbatch").read_text()
    nodes, gpus = (int(re.search(rf"^#SBATCH --{n}=(\d+)", template, re.M).group(1))
                   for n in ("nodes", "gpus-per-node"))
    world_sizes = {"single_gpu.py": 1, "multinode.sbatch": nodes * gpus}  # a new Spleen command: add its world size
    text = (FOLDER / "README.md").read_text().replace("\\\n", " ")
    commands = [ln.split() for ln in text.splitlines() if "Task09_Spleen" in ln and re.match(r" *(python|sbatch) ", ln)]
    assert len(commands) >= 2, commands
    for cmd in commands:
        world = world_sizes[cmd[1]]
        batch = int(cmd[cmd.index("--batch-size") + 1]) if "--batch-size" in cmd else 2
        assert 33 // world // batch >= 2, (cmd, world, batch)
        assert world == 1 or "--val-every" in cmd, cmd


# ------------------------------------------------------------------------------------------ GPU facts, patched in

# What a GPU node would answer, patched into the recipes' own code in one process of monai/'s environment (this
# machine has no GPU; importing MONAI once is most of the time): each check returns what it found, or the exception
# it raised, as JSON on the last line.
GPU_PROBE = r'''
import contextlib, io, json, os, sys, tempfile, types
from unittest import mock
import torch
import cluster, recipe, toolkit

''' + PROBE_CHECKS + r'''

def trainer(ckpt, device, loader=None, **flags):
    """A Trainer of the recipe (a tiny UNet, 4 steps per epoch) on the CPU, then moved in thought to `device`."""
    args = types.SimpleNamespace(lr=1e-3, epochs=2, max_steps=None, amp=False, timings_file=None, checkpoint_dir=ckpt,
                                 save_every=1, save_every_steps=None, log_every=100, roi_size=16, batch_size=1,
                                 val_every=1, seed=0, num_workers=0, gpu_cache=False)
    vars(args).update(flags)
    task = recipe.Task(train=list(range(4)), val_cases=[], in_channels=1, num_classes=2, n_train=4, n_val=0)
    loader = list(range(4)) if loader is None else loader(args)
    t = recipe.Trainer(recipe.build_model(task), loader, task, args, cluster.Ranks())
    t.ranks = cluster.Ranks(device=device)
    return t

class Counting(torch.utils.data.Dataset):
    """Cases of 8^3 zeros (the least the UNet takes) that record which were loaded."""
    def __init__(self, n):
        self.n, self.loaded = n, []
    def set_epoch(self, epoch):
        pass
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        self.loaded.append(i)
        return {"image": torch.zeros(1, 8, 8, 8), "label": torch.zeros(1, 8, 8, 8)}

def argv(*flags):
    with mock.patch.object(sys, "argv", ["single_gpu.py", *flags]):
        return cluster.parse_args("probe")

@contextlib.contextmanager
def gpus(visible):
    """torch.cuda as a node with `visible` GPUs answers it: a distinct RNG state per device; a device index that
    does not exist fails as it does there (torch.cuda.default_generators[index]: IndexError)."""
    calls = {"get": [], "set": []}

    def index(device):
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if (device.index or 0) >= visible:
            raise IndexError("tuple index out of range")
        return device.index or 0

    def get_rng_state(device="cuda"):
        calls["get"].append(index(device))
        return torch.full((16,), 100 + index(device), dtype=torch.uint8)

    def set_rng_state(state, device="cuda"):
        calls["set"].append([index(device), int(state[0]), str(state.device), str(state.dtype)])

    with contextlib.ExitStack() as stack:
        for module in (torch.cuda, torch.cuda.random):
            for name, value in (("get_rng_state", get_rng_state), ("set_rng_state", set_rng_state),
                                ("device_count", lambda: visible)):
                stack.enter_context(mock.patch.object(module, name, value))
        stack.enter_context(mock.patch.object(torch.cuda, "is_available", lambda: True))
        yield calls

def emulated_load(real_load, seen, device_tensors):
    """torch.load, recording map_location; tensors mapped to a device other than the CPU are not CPU ByteTensors
    (meta here: torch.set_rng_state rejects them with the TypeError a CUDA tensor gets) if device_tensors."""
    def load(path, map_location=None, **kw):
        seen.append(str(map_location))
        snap = real_load(path, map_location="cpu", **kw)
        if device_tensors and torch.device(map_location).type != "cpu":
            snap = torch.utils._pytree.tree_map(lambda v: v.to("meta") if torch.is_tensor(v) else v, snap)
        return snap
    return load

@check
def resume_on_a_gpu():
    ckpt = tempfile.mkdtemp()
    first = trainer(ckpt, torch.device("cpu"))
    first.step = 3
    first._save_snapshot(0.5)
    saved = torch.get_rng_state().clone()
    torch.manual_seed(123)
    t, seen = trainer(ckpt, torch.device("cuda", 0)), []
    with gpus(1), mock.patch.object(torch, "load", emulated_load(torch.load, seen, device_tensors=True)):
        t._resume()
    return {"map_locations": seen, "step": t.step, "rng_restored": torch.equal(torch.get_rng_state(), saved)}

@check
def requeued_onto_fewer_gpus():
    """Saved by rank 0 on a node with 8 visible GPUs (device cuda:0); resumed on cuda:0 of a node (or a task) that
    sees 1 (torch.load loading to the CPU, to look at the RNG alone)."""
    ckpt = tempfile.mkdtemp()
    with gpus(8) as saving:
        first = trainer(ckpt, torch.device("cuda", 0))
        first.step = 3
        first._save_snapshot(0.5)
    t = trainer(ckpt, torch.device("cuda", 0))
    with gpus(1) as resuming, mock.patch.object(torch, "load", emulated_load(torch.load, [], device_tensors=False)):
        t._resume()
    return {"saved_from": saving["get"], "restored": resuming["set"], "step": t.step}

@check
def old_snapshot_with_every_gpus_state():
    """A snapshot of the previous release (get_rng_state_all: 8 states) resumed by local rank 2 of a task that
    sees 4 GPUs: its own device's state, onto its own device only."""
    state = {"torch": torch.get_rng_state(), "cuda": [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(8)]}
    with gpus(4) as calls:
        cluster.restore_rng(state, torch.device("cuda", 2))
    return calls["set"]

''' + NO_SILENT_CPU_CHECK + r'''
@check
def each_rank_caches_its_partition():
    """build_dataset as ranks 0 and 1 of 2 would call it (in one process: its only collective, a barrier, is
    skipped without a process group), 5 synthetic training cases: which cases each rank's CacheDataset holds."""
    args = argv("--dataset-size", "5", "--roi-size", "16", "--batch-size", "1", "--seed", "-1",  # numpy: 0..2^32-1
                "--data-dir", tempfile.mkdtemp())
    ranks = []
    for rank in (0, 1):
        cache = recipe.build_dataset(args, cluster.Ranks(rank=rank, world_size=2)).train.cached
        ranks.append({"cases": [os.path.basename(c["image"]) for c in cache.data],
                      "cached": sum(item is not None for item in cache._cache), "workers": cache.num_workers})
    return {"ranks": ranks, "cpus": len(os.sched_getaffinity(0))}

def resumed_epoch(gpu_cache):
    """One epoch of 6 cases, then the same epoch resumed at batch 4 (a snapshot taken after 4 steps), then the next
    epoch: the cases each loaded, in order."""
    data = Counting(6)
    t = trainer(None, torch.device("cpu"), loader=lambda args: recipe.build_loader(data, args), gpu_cache=gpu_cache)
    t._run_epoch()
    whole, data.loaded = data.loaded, []
    t.step, t.batch_in_epoch = 4, 4
    t._run_epoch()
    resumed, data.loaded = data.loaded, []
    t.epoch, t.batch_in_epoch = 1, 0
    t._run_epoch()
    return {"whole": whole, "resumed": resumed, "next_epoch": data.loaded}

@check
def resumed_epoch_loads_only_the_batches_left():
    return resumed_epoch(gpu_cache=False)

@check
def resumed_epoch_on_the_gpu_data_path():
    return resumed_epoch(gpu_cache=True)

@check
def gpu_cache_where_it_cannot_work():
    """--gpu-cache without a GPU, and with DataLoader worker processes (which cannot take CUDA tensors): the exit code
    and stderr of parse_args, or the flag's value where it parses."""
    def parse(*flags, visible=0):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), gpus(visible) if visible else contextlib.nullcontext():
            try:
                return {"gpu_cache": argv(*flags).gpu_cache}
            except SystemExit as e:
                return {"exit": e.code, "stderr": err.getvalue().strip()}
    return {"cpu": parse("--gpu-cache"), "workers": parse("--gpu-cache", "--num-workers", "2", visible=1),
            "gpu": parse("--gpu-cache", visible=1), "default": parse(visible=1)}

@check
def gpu_data_path_run_on_the_cpu():
    """--gpu-cache's data path with the CPU as the rank's device (no GPU here; parse_args refuses the flag, so it is
    set after): the loader it builds, and whether its batches equal the default DataLoader's, crop for crop."""
    args = argv("--dataset-size", "4", "--roi-size", "16", "--batch-size", "2", "--data-dir", tempfile.mkdtemp())
    args.gpu_cache = True
    task = recipe.build_dataset(args, cluster.Ranks())
    fast = recipe.build_loader(task.train, args)
    with gpus(1):  # built, not iterated: what it would pin on a GPU node
        pinned = recipe.build_loader(task.train, args).pin_memory
    args.gpu_cache = False
    with gpus(1):
        pinned_default = recipe.build_loader(task.train, args).pin_memory
    plain = recipe.build_loader(task.train, args)
    fast_batches, plain_batches = list(fast), list(plain)
    same = len(fast_batches) == len(plain_batches) == 2 and all(
        torch.equal(a[k], b[k]) for a, b in zip(fast_batches, plain_batches) for k in recipe.KEYS)
    return {"loader": type(fast).__name__, "workers": fast.num_workers, "pinned": pinned,
            "pinned_default": pinned_default, "same_batches": same}

@check
def validates_every_n_epochs():
    """--epochs 5 --val-every 2: the epochs after which the (patched) validation ran."""
    t = trainer(None, torch.device("cpu"), loader=lambda args: recipe.build_loader(Counting(1), args), epochs=5,
                val_every=2)
    validated = []
    t._validate = lambda: validated.append(t.epoch) or 0.5
    t.train()
    return validated

@check
def signal_after_an_epochs_last_check():
    """2 epochs of 4 steps (fewer than PREEMPTION.CHECK_EVERY), --val-every 1, the signal during step 3: what the run
    did after it, in order, and how it ended; then the requeued run: what it validated, and whether it ends with the
    weights of a run never stopped."""
    def run(ckpt):
        return trainer(ckpt, torch.device("cpu"), loader=lambda args: recipe.build_loader(Counting(4), args))

    ckpt = tempfile.mkdtemp()
    torch.manual_seed(0)
    t = run(ckpt)
    events, run_batch, save = [], t._run_batch, t._save_snapshot

    def signalled_in_step_3(image, label):
        toolkit.PREEMPTION.requested = toolkit.PREEMPTION.requested or t.step == 2
        return run_batch(image, label)

    t._run_batch = signalled_in_step_3
    t._validate = lambda: events.append("validate") or 0.5
    t._save_snapshot = lambda dice: events.append(f"save at step {t.step}") or save(dice)
    try:
        t.train()
        events.append("finished")
    except SystemExit as e:
        events.append(f"exit {e.code}")
    finally:
        toolkit.PREEMPTION.requested = False
    requeued, validated = run(ckpt), []
    requeued._validate = lambda: validated.append(f"epoch {requeued.epoch}") or 0.5
    requeued.train()
    torch.manual_seed(0)
    whole = run(tempfile.mkdtemp())
    whole._validate = lambda: 0.5
    whole.train()
    same = all(torch.equal(a, b) for a, b in zip(requeued.net.state_dict().values(), whole.net.state_dict().values()))
    return {"events": events, "validated_after_the_requeue": validated, "same_weights": same}

@check
def bare_commands_fit_the_readmes_world_sizes():
    """The defaults (no flags) at 1 rank, 2 (one node of 2), 8 (a node of 8 GPUs), 16 (2 nodes x 8): steps per
    epoch, or the error that stops the run."""
    args, steps = argv(), {}
    for world in (1, 2, 8, 16):
        try:
            cluster.check_dataset_fits(range(args.dataset_size), world, args.batch_size)
            steps[world] = args.dataset_size // world // args.batch_size
        except toolkit.RecipeError as e:
            steps[world] = str(e)
    return steps

''' + TF32_CHECK + r'''
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def gpu_probe():
    out = run([env_python("monai"), "-c", GPU_PROBE], cwd=FOLDER, timeout=180).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_resume_on_a_gpu_loads_the_snapshot_to_the_cpu(gpu_probe):
    """A requeued GPU job's first resume: the snapshot is loaded to the CPU (model and optimizer copy it onto the
    device), so torch.set_rng_state gets the CPU ByteTensor it requires."""
    found = gpu_probe["resume_on_a_gpu"]
    assert "raised" not in found, found
    assert found["map_locations"] == ["cpu", "cpu"], found  # find_snapshot's look at the step, then the resume
    assert found["step"] == 3 and found["rng_restored"], found


def test_a_job_requeued_onto_fewer_gpus_restores_its_own_gpus_rng(gpu_probe):
    """Only this process's GPU's RNG state is saved and restored: 8 GPUs visible when saved, 1 when resumed (or one
    GPU per task) restores one state onto cuda:0 -- every GPU's state would set devices that do not exist."""
    found = gpu_probe["requeued_onto_fewer_gpus"]
    assert "raised" not in found, found
    assert found["saved_from"] == [0] and found["step"] == 3, found
    assert found["restored"] == [[0, 100, "cpu", "torch.uint8"]], found  # device 0's state, from a CPU ByteTensor
    assert gpu_probe["old_snapshot_with_every_gpus_state"] == [[2, 102, "cpu", "torch.uint8"]]


def test_given_gpus_it_cannot_use_it_stops_rather_than_train_on_the_cpu(gpu_probe):
    """C12, wired into parse_args (every script, before it picks a device)."""
    assert_no_silent_cpu(gpu_probe["given_gpus_that_torch_cannot_use"])



def test_each_rank_caches_only_its_partition(gpu_probe):
    """#26: every rank cached the whole training set (8 copies per 8-GPU node). Now each caches its partition_dataset
    share: disjoint, together every case but the tail that does not divide (5 cases, 2 ranks: 2 + 2, 1 dropped),
    filled with every CPU of the task."""
    found = gpu_probe["each_rank_caches_its_partition"]
    assert "raised" not in found, found
    ranks = found["ranks"]
    assert [len(r["cases"]) for r in ranks] == [2, 2] and [r["cached"] for r in ranks] == [2, 2], found
    mine, theirs = (set(r["cases"]) for r in ranks)
    assert not mine & theirs and len(mine | theirs) == 4, found
    assert mine | theirs < {f"ball_{i:03d}.nii.gz" for i in range(5)}, found  # training cases only
    assert all(r["workers"] == found["cpus"] for r in ranks), found


def test_a_resumed_epoch_does_not_load_the_batches_it_skips(gpu_probe):
    """Resumed at batch 4 of 6, the epoch goes on in the uninterrupted order without loading (reading, augmenting)
    the 4 cases already trained on; the next epoch reshuffles the same partition."""
    found = gpu_probe["resumed_epoch_loads_only_the_batches_left"]
    assert "raised" not in found, found
    assert sorted(found["whole"]) == list(range(6)), found
    assert found["resumed"] == found["whole"][4:], found
    assert sorted(found["next_epoch"]) == list(range(6)) and found["next_epoch"] != found["whole"], found


def test_a_resumed_epoch_on_the_gpu_data_path_does_not_load_the_batches_it_skips(gpu_probe):
    """The same skip at the sampler through --gpu-cache's ThreadDataLoader (its thread reads ahead, in order)."""
    found = gpu_probe["resumed_epoch_on_the_gpu_data_path"]
    assert found == gpu_probe["resumed_epoch_loads_only_the_batches_left"], found


def test_gpu_cache_refuses_in_one_line_where_it_cannot_work(gpu_probe):
    """--gpu-cache keeps the cases in GPU memory: on a machine without one it stops at the command line (exit 2, one
    line), as it does with --num-workers (worker processes cannot take CUDA tensors); with a GPU it is taken."""
    found = gpu_probe["gpu_cache_where_it_cannot_work"]
    assert "raised" not in found, found
    assert found["cpu"] == {"exit": 2, "stderr": "error: --gpu-cache keeps the training cases in GPU memory, but no "
                            "GPU is visible: drop the flag to cache in host memory (see --help)"}, found
    assert found["workers"] == {"exit": 2, "stderr": "error: --gpu-cache augments on the GPU in a thread of this "
                                "process (ThreadDataLoader): --num-workers must be 0 (see --help)"}, found
    assert found["gpu"] == {"gpu_cache": True} and found["default"] == {"gpu_cache": False}, found


def test_the_gpu_data_path_trains_on_the_same_crops(gpu_probe):
    """--gpu-cache (#26): cases cached on the rank's device, batches made by a ThreadDataLoader (a thread, no worker
    processes, nothing to pin), the same crops as the default path: the augmentation is seeded per case, not per
    process."""
    found = gpu_probe["gpu_data_path_run_on_the_cpu"]
    assert found == {"loader": "ThreadDataLoader", "workers": 0, "pinned": False, "pinned_default": True,
                     "same_batches": True}, found


def test_a_signal_after_an_epochs_last_check_is_saved_before_any_validation(gpu_probe):
    """#26: the ranks agree on a signal every PREEMPTION.CHECK_EVERY (10) steps; one that came after an epoch's last
    check went through that epoch's validation first (with 4 steps per epoch, through the whole run). Before a
    validation the ranks agree on it too: saved at once, exit 75, nothing validated."""
    found = gpu_probe["signal_after_an_epochs_last_check"]
    assert "raised" not in found, found
    assert found["events"] == ["save at step 4", "exit 75"], found
    # the validation the signal put off runs after the requeue, and the run ends as if never stopped
    assert found["validated_after_the_requeue"] == ["epoch 1", "epoch 2"] and found["same_weights"], found


def test_val_every_is_honoured(gpu_probe):
    assert gpu_probe["validates_every_n_epochs"] == [2, 4, 5], gpu_probe["validates_every_n_epochs"]


def test_the_bare_command_of_every_launch_pattern_fits_the_default_data(gpu_probe):
    """`torchrun --standalone --nproc_per_node 2 multigpu_torchrun.py` with no flags stopped: 64 cases, too few
    for one step of 2 ranks x batch 64. The defaults give whole steps at every world size the README names."""
    assert gpu_probe["bare_commands_fit_the_readmes_world_sizes"] == {"1": 32, "2": 16, "8": 4, "16": 2}


def test_fp32_on_a_gpu_uses_tf32(gpu_probe):
    """C10/#22: an fp32 run on a GPU puts matmuls and convolutions in TF32 (the folder never did)."""
    assert gpu_probe["tf32_for_fp32_on_cuda"] == ["highest", "high"], gpu_probe["tf32_for_fp32_on_cuda"]
