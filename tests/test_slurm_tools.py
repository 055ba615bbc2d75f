"""slurm_templates/tools without Slurm: the benchmark's arithmetic, the doctor's configuration checks, and both
tools under plain torchrun (so they are exercised even where the local cluster cannot run)."""

import importlib.util
import json
import os

import pytest

from helpers import ROOT, clean_env, free_port, run, torchrun

TOOLS = ROOT / "slurm_templates" / "tools"


def load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("allreduce_bench")
doctor = load("doctor")


def test_bus_bandwidth_uses_nccl_tests_definition():
    assert bench.bus_bandwidth(10.0, 2) == pytest.approx(10.0)  # 2(n-1)/n = 1
    assert bench.bus_bandwidth(10.0, 4) == pytest.approx(15.0)
    assert bench.bus_bandwidth(10.0, 16) == pytest.approx(18.75)
    assert bench.bus_bandwidth(10.0, 1) == 10.0


def test_the_default_sweep_reaches_the_sizes_where_a_fabric_shows_its_bandwidth():
    """#22: the default sweep stopped at 4 MB, where a healthy InfiniBand/NVLink fabric is still latency-bound
    and looks broken; it now ends at 1 GB, as nccl-tests' usual sweep does."""
    args = bench.build_parser().parse_args([])
    swept = bench.sizes(bench.parse_size(args.min_bytes), bench.parse_size(args.max_bytes), args.factor)
    assert swept[0] == 4096 and swept[-1] == 1 << 30, swept


def test_sizes():
    assert bench.parse_size("4K") == 4096 and bench.parse_size("1MB") == 1 << 20 and bench.parse_size("512") == 512
    assert bench.sizes(1024, 16384, 4) == [1024, 4096, 16384]


@pytest.mark.parametrize("env, problem", [
    ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "localhost", "MASTER_PORT": "1", "SLURM_NNODES": "2"},
     "MASTER_ADDR=localhost with 2 nodes"),
    ({"RANK": "0", "WORLD_SIZE": "16", "MASTER_ADDR": "n1", "MASTER_PORT": "1", "TORCHELASTIC_RUN_ID": "x",
      "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2"},
     "double launch"),
    # More cores asked for than this process may run on: what srun without SRUN_CPUS_PER_TASK does.
    ({"SLURM_CPUS_PER_TASK": str(len(os.sched_getaffinity(0)) + 1)},
     f"bound to {len(os.sched_getaffinity(0))} CPU core(s)"),
    ({"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1", "SLURM_NNODES": "2",
      "SLURM_CPUS_PER_TASK": str(len(os.sched_getaffinity(0)))}, None),
], ids=["no-master-addr", "localhost", "double-launch", "too-few-cores", "ok"])
def test_doctor_checks(monkeypatch, env, problem):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}:
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    problems = doctor.checks(doctor.launch_env())
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_doctor_fails_a_job_given_gpus_that_torch_cannot_use():
    """CONTRACT C12 in the doctor: given GPUs, --backend auto and no usable CUDA (this machine) is a problem;
    --backend gloo asked for, or no GPUs given, is not."""
    problem = doctor.gpus_unusable("auto", False, {"SLURM_GPUS_ON_NODE": "4"})
    assert problem.startswith("SLURM_GPUS_ON_NODE=4 but torch ") and "cannot use a GPU" in problem, problem
    assert "CUDA_VISIBLE_DEVICES=0,1 but" in doctor.gpus_unusable("auto", False, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert doctor.gpus_unusable("gloo", False, {"SLURM_GPUS_ON_NODE": "4"}) == ""
    assert doctor.gpus_unusable("auto", True, {"SLURM_GPUS_ON_NODE": "4"}) == ""
    assert doctor.gpus_unusable("auto", False, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == ""


def test_one_gpu_per_task_is_a_valid_layout_and_more_tasks_than_gpus_is_not():
    """#22: the doctor failed --gpus-per-task layouts the recipes support (task 3 sees one GPU: cuda:0, not an
    'invalid device ordinal'); what does fail is more tasks than the GPUs they all see."""
    assert not doctor.shared_gpu(3, 1)  # --gpus-per-task=1: each task its own GPU
    assert not doctor.shared_gpu(3, 4)  # 4 tasks, 4 GPUs visible to each
    assert doctor.shared_gpu(5, 4)  # 8 tasks, 4 GPUs: ranks 4..7 would share


def test_cpu_list():
    assert doctor.cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and doctor.cpu_list([3]) == "3"


def test_doctor_and_bench_under_torchrun(tmp_path):
    env = clean_env()
    out = run([*torchrun("slurm_templates"), "--standalone", "--nproc-per-node", 2, TOOLS / "doctor.py",
               "--report-dir", tmp_path, "--timeout", 60], env=env, timeout=120).stdout
    assert "[doctor] OK: 2 ranks on 1 host(s), all-reduce verified" in out
    assert json.loads((tmp_path / "doctor-rank1.json").read_text())["rank"] == 1
    port = free_port()
    out = run([*torchrun("slurm_templates"), "--nnodes", 1, "--nproc-per-node", 2, "--master-port", port,
               TOOLS / "allreduce_bench.py", "--max-bytes", "64K", "--iters", 3, "--json", tmp_path / "b.json"],
              env=env, timeout=120).stdout
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["bytes"] for r in rows] == [4096, 16384, 65536] and all(r["wrong"] == 0 for r in rows)
    assert "busbw(GB/s)" in out


def test_local_cluster_declares_the_cores_this_machine_has_whatever_omp_num_threads_says():
    """The tests run with OMP_NUM_THREADS=1, and `nproc` honours it: a cluster started from a test then declared
    1-CPU nodes and every 2-core job failed with "Requested node configuration is not available"."""
    cores = len(os.sched_getaffinity(0))
    declared = run(["bash", "-c", '. "$1"; echo "$LC_CPUS"', "_", ROOT / "slurm_templates/local_cluster/common.sh"],
                   env=clean_env(OMP_NUM_THREADS=1)).stdout.split()[-1]
    assert int(declared) == cores
