"""slurm_templates/ submitted for real to the local two-node cluster (n1, n2 with 8 fake GPUs each).

Templates run unmodified; the tests only shrink the shape on the sbatch command line (2 ranks per node instead
of 8: this machine has 2 cores) and pass the interpreter as PYTHON.
"""

import json
import os
import re
import subprocess

import pytest
from helpers import ROOT
from slurm_fixtures import GLOO, LOCAL_NET

pytestmark = pytest.mark.slurm

TEMPLATES = ROOT / "slurm_templates"
TOOLS = TEMPLATES / "tools"
SMALL = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1", "--time=00:05:00"]


def ranks_and_hosts(log: str) -> dict[int, str]:
    """rank -> host from the doctor's per-rank lines."""
    return {int(r): h for r, h in re.findall(r"\[doctor\] rank (\d+)/\d+ .*? host (\S+)", log)}


def test_selftest(slurm_cluster, tmp_path):
    job = slurm_cluster.run(TEMPLATES / "local_cluster" / "selftest.sbatch", output=tmp_path / "job.out",
                            env={"OUT_DIR": tmp_path / "files"}, timeout=60).assert_ok()
    assert "selftest OK" in job.log, job.describe()
    assert re.search(r"^0: selftest rank=0 node=0 host=n1 gpus=0,1,2,3,4,5,6,7$", job.log, re.M), job.describe()
    assert re.search(r"^1: selftest rank=1 node=1 host=n2 gpus=0,1,2,3,4,5,6,7$", job.log, re.M), job.describe()
    files = sorted(p.name for p in (tmp_path / "files").iterdir())
    assert files == [f"selftest-{job.job_id}-rank0.txt", f"selftest-{job.job_id}-rank1.txt"]
    assert f"master=n1({LOCAL_NET}.11)" in (tmp_path / "files" / files[1]).read_text()



def test_a_tests_leftover_jobs_are_cancelled_before_the_next_test(slurm_cluster, tmp_path):
    """A test that fails while its jobs run (or stops waiting for them) must not leave them holding the cores and
    GPUs the next test's jobs expect: slurm_fixtures cancels them at its teardown (cancel_leftovers)."""
    script = tmp_path / "sleep.sbatch"
    script.write_text("#!/bin/bash\nsleep 300\n")
    job_id = slurm_cluster.submit(script, sbatch_args=["--nodes=1", "--time=00:05:00"], output=tmp_path / "job.out")
    assert slurm_cluster.cancel_leftovers() == [job_id]
    assert not slurm_cluster.client("squeue", "-h", "-j", job_id, check=False).stdout.strip()
    assert slurm_cluster.job_info(job_id).get("JobState") == "CANCELLED"

# Cores per rank in the affinity tests: every node has this machine's cores (local_cluster/start.sh), at least 2.
CORES = 2
FIX = "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK\n"


def affinity_job(cluster, python, tmp_path, template):
    """`template` + doctor.py on 2 nodes x 1 rank x CORES cores; every rank reports os.sched_getaffinity(0)."""
    shape = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", f"--cpus-per-task={CORES}", "--time=00:05:00"]
    return cluster.run(template, TOOLS / "doctor.py", *GLOO, "--report-dir", tmp_path / "report", "--timeout", 60,
                       sbatch_args=shape, output=tmp_path / "job.out", env={"PYTHON": python}, timeout=90)


def test_ranks_run_on_the_cores_they_asked_for(slurm_cluster, slurm_python, tmp_path):
    """The cluster binds every task to its cores (task/affinity) like a production one; with the template's
    SRUN_CPUS_PER_TASK every rank may run on exactly --cpus-per-task cores."""
    job = affinity_job(slurm_cluster, slurm_python, tmp_path, TEMPLATES / "srun_per_gpu.sbatch").assert_ok()
    reports = [json.loads((tmp_path / "report" / f"doctor-rank{r}.json").read_text()) for r in range(2)]
    assert [(r["host"], len(r["cpu_affinity"])) for r in reports] == [("n1", CORES), ("n2", CORES)], job.describe()
    assert re.search(rf"\[doctor\] rank 0/2 .* host n1 \| cores \S+ \({CORES}\) \|", job.log), job.describe()


def test_template_without_srun_cpus_per_task_gets_one_core(slurm_cluster, slurm_python, tmp_path):
    """The same template without its SRUN_CPUS_PER_TASK line: srun (Slurm 22.05-23.02) asks for 1 core per task,
    every rank is bound to one core, and the doctor fails with one clear line instead of training slowly."""
    template = (TEMPLATES / "srun_per_gpu.sbatch").read_text()
    assert FIX in template
    unfixed = tmp_path / "srun_per_gpu_unfixed.sbatch"
    unfixed.write_text(template.replace(FIX, ""))
    job = affinity_job(slurm_cluster, slurm_python, tmp_path, unfixed)
    assert job.state == "FAILED" and job.exit_code != 0, job.describe()
    assert re.search(rf"^\d: \[doctor\] FAIL: rank \d on n\d: bound to 1 CPU core\(s\) \(\d+\) but "
                     rf"SLURM_CPUS_PER_TASK={CORES}: srun does not pass --cpus-per-task on", job.log, re.M), \
        job.describe()


# Every template that sizes something from SLURM_GPUS_ON_NODE (`X=${SLURM_GPUS_ON_NODE...` or
# `X=${X:-${SLURM_GPUS_ON_NODE...`), found by what it says: a new one, or one that goes back to `:-1`, is checked.
GPU_SIZED = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.sbatch")
                   if re.search(r"\w+=\$\{(\w+:-\$\{)?SLURM_GPUS_ON_NODE", p.read_text()))


@pytest.mark.parametrize("template", GPU_SIZED)
def test_no_gpu_count_fails_before_launching(template, tmp_path):
    """A job without --gpus-per-node (SLURM_GPUS_ON_NODE unset) stops with one clear message before srun, instead
    of silently starting one worker per node. Run by bash with a job's environment; srun and scontrol are
    stand-ins that record a call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("scontrol", "echo n1"), ("srun", "echo SRUN-CALLED; exit 99")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "t",
           "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1", "SLURM_SUBMIT_DIR": tmp_path}
    path = ROOT / template
    proc = subprocess.run(["bash", path, "train.py"], cwd=path.parent, env={k: str(v) for k, v in env.items()},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "SRUN-CALLED" not in proc.stdout, (proc.stdout, proc.stderr)
    assert "SLURM_GPUS_ON_NODE: " in proc.stderr and "--gpus-per-node" in proc.stderr, proc.stderr


def test_doctor_job(slurm_cluster, slurm_python, tmp_path):
    job = slurm_cluster.run(TOOLS / "doctor.sbatch", *GLOO, "--report-dir", tmp_path / "report", "--timeout", 60,
                            sbatch_args=SMALL, cwd=TOOLS, output=tmp_path / "job.out",
                            env={"PYTHON": slurm_python}).assert_ok()
    assert ranks_and_hosts(job.log) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}, job.describe()
    assert "[doctor] OK: 4 ranks on 2 host(s), all-reduce verified" in job.log, job.describe()
    assert "rank0=n1 rank1=n1 rank2=n2 rank3=n2" in job.log
    reports = [json.loads((tmp_path / "report" / f"doctor-rank{r}.json").read_text()) for r in range(4)]
    assert [r["host"] for r in reports] == ["n1", "n1", "n2", "n2"]
    assert all(r["cuda_visible_devices"] == "0,1" for r in reports)
    # 2 ranks x 1 core on each node: bound to one core each, not the same one.
    assert [len(r["cpu_affinity"]) for r in reports] == [1, 1, 1, 1], reports
    assert reports[0]["cpu_affinity"] != reports[1]["cpu_affinity"], reports


BROKEN_JOB = """#!/usr/bin/env bash
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --time=00:02:00
set -euo pipefail
export MASTER_ADDR=@MASTER@ MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
srun --kill-on-bad-exit=1 --label bash -c 'RANK=$SLURM_PROCID WORLD_SIZE=@WORLD@ exec "$PYTHON" "$0" "$@"' "$@"
"""


@pytest.mark.parametrize("master, world, expect", [
    ("localhost", "$SLURM_NTASKS", ": MASTER_ADDR=localhost with 2 nodes: other nodes cannot reach it"),
    ("n1", "3", ": no all-reduce after 8 s. Likely: fewer processes started than WORLD_SIZE=3"),  # any rank
], ids=["localhost-master", "world-size-too-big"])
def test_doctor_reports_broken_launch(slurm_cluster, slurm_python, tmp_path, master, world, expect):
    """Classic launch bugs end in a clear FAIL line and a non-zero exit, not a 30-minute hang."""
    script = tmp_path / "broken.sbatch"
    script.write_text(BROKEN_JOB.replace("@MASTER@", master).replace("@WORLD@", world))
    job = slurm_cluster.run(script, TOOLS / "doctor.py", *GLOO, "--timeout", 8, output=tmp_path / "job.out",
                            env={"PYTHON": slurm_python}, timeout=90)
    assert job.state == "FAILED" and job.exit_code != 0, job.describe()
    assert "[doctor] FAIL: rank " in job.log and expect in job.log, job.describe()


def test_allreduce_bench_job(slurm_cluster, slurm_python, tmp_path):
    out = tmp_path / "bench.json"
    job = slurm_cluster.run(TOOLS / "allreduce_bench.sbatch", "--min-bytes", "4K", "--max-bytes", "256K",
                            "--iters", 5, "--json", out, sbatch_args=SMALL, cwd=TOOLS,
                            output=tmp_path / "job.out", env={"PYTHON": slurm_python}).assert_ok()
    result = json.loads(out.read_text())
    assert result["world_size"] == 4 and result["backend"] == "gloo" and result["hosts"] == ["n1", "n1", "n2", "n2"]
    assert [r["bytes"] for r in result["rows"]] == [4096, 16384, 65536, 262144]
    for row in result["rows"]:
        assert row["wrong"] == 0
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 2 * 3 / 4)  # nccl-tests: 2(n-1)/n
    assert "busbw(GB/s)" in job.log and "# peak busbw" in job.log


def test_torchrun_per_node(slurm_cluster, slurm_python, tmp_path):
    """One torchrun per node, c10d rendezvous on n1; torchrun starts SLURM_GPUS_ON_NODE=2 ranks per node."""
    job = slurm_cluster.run(TEMPLATES / "torchrun_per_node.sbatch", TOOLS / "doctor.py", *GLOO,
                            "--report-dir", tmp_path / "report", sbatch_args=[*SMALL, "--ntasks-per-node=1"],
                            output=tmp_path / "job.out", env={"PYTHON": slurm_python}).assert_ok()
    assert "torchrun_per_node: 2 nodes x 2 processes, rendezvous n1:" in job.log
    hosts = ranks_and_hosts(job.log)
    assert sorted(hosts) == [0, 1, 2, 3] and sorted(hosts.values()) == ["n1", "n1", "n2", "n2"], job.describe()
    assert "launcher torchrun" in job.log
    assert "[doctor] OK: 4 ranks on 2 host(s)" in job.log
    assert len(list((tmp_path / "report").glob("doctor-rank*.json"))) == 4


def test_srun_per_gpu(slurm_cluster, slurm_python, tmp_path):
    job = slurm_cluster.run(TEMPLATES / "srun_per_gpu.sbatch", TOOLS / "doctor.py", *GLOO,
                            "--report-dir", tmp_path / "report", sbatch_args=SMALL,
                            output=tmp_path / "job.out", env={"PYTHON": slurm_python}).assert_ok()
    assert ranks_and_hosts(job.log) == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}, job.describe()
    reports = {r: json.loads((tmp_path / "report" / f"doctor-rank{r}.json").read_text()) for r in range(4)}
    assert [reports[r]["local_rank"] for r in range(4)] == [0, 1, 0, 1]
    assert "[doctor] OK: 4 ranks on 2 host(s)" in job.log


STOPPABLE = """import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: (print("checkpointed", flush=True), sys.exit(75)))
print("training", flush=True)
time.sleep(60)
sys.exit(1)
"""


def test_requeue_restart_cap(slurm_cluster, tmp_path):
    """requeue.sbatch with MAX_RESTARTS=0: the forwarded USR1 makes the program exit 75, but the cap says no
    more requeues, so the job fails with a clear message instead of looping."""
    script = tmp_path / "stoppable.py"
    script.write_text(STOPPABLE)
    on_poll = slurm_cluster.preempt_when(lambda log: log.count("training") == 2)
    job = slurm_cluster.run(TEMPLATES / "requeue.sbatch", script, output=tmp_path / "job.out",
                            sbatch_args=[*SMALL, "--ntasks-per-node=1"], env={"PYTHON": "python3", "MAX_RESTARTS": 0},
                            timeout=60, on_poll=on_poll)
    assert job.state == "FAILED" and job.exit_code == 1 and job.info["Restarts"] == "0", job.describe()
    assert "requeue: got USR1, forwarding it" in job.log, job.describe()
    assert "checkpointed" in job.log, job.describe()
    assert "restarted 0 times already (MAX_RESTARTS=0): giving up" in job.log, job.describe()
