"""benchmarks/bench.sbatch submitted for real to the local cluster, as on a GPU cluster: the runner stays in the
batch shell and starts every launch with srun (one torchrun per node) inside the job's allocation.

Shrunk to what this 2-core machine can run in about a minute: one node, 2 "GPUs" (GPUS_PER_NODE=2, since
--exclusive hands the job all 8 fake GPUs), raw DDP and the pytorch recipe only, 1 repeat of 6 steps.
"""

import json

import pytest
from helpers import ROOT, env_python

pytestmark = [pytest.mark.slurm, pytest.mark.bench]

BENCH = ROOT / "benchmarks"


def test_bench_sbatch(slurm_cluster, tmp_path):
    for folder in ("pytorch",):  # the runner launches each recipe with its own folder's environment
        env_python(folder)
    out = tmp_path / "bench"
    job = slurm_cluster.run(BENCH / "bench.sbatch", "--repeats", 1, "--steps", 6, "--warmup", 2, "--batch-size", 8,
                            "--no-ceiling", "--recipes", "pytorch", "--launch-timeout", 150, "--out", out,
                            sbatch_args=["--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2", "--time=00:10:00"],
                            cwd=BENCH, output=tmp_path / "job.out",
                            env={"PYTHON": env_python("benchmarks"), "GPUS_PER_NODE": 2}, timeout=400).assert_ok()
    assert "bench: 1 node(s) x 2 GPU(s), world sizes 1,2, rendezvous n1" in job.log, job.describe()
    result = json.loads((out / "results.json").read_text())
    assert result["config"]["launcher"] == "srun" and result["config"]["world_sizes"] == [1, 2]
    runs = {(r["recipe"], r["world_size"]): r for r in result["runs"]}
    assert set(runs) == {("raw DDP", 1), ("raw DDP", 2), ("pytorch", 1), ("pytorch", 2)}, job.describe()
    assert all(r["exit_code"] == 0 and r["timed_steps"] > 0 and r["step_time_s"] > 0 for r in runs.values()), runs
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
