"""Every pytorch/ sbatch template submitted for real to the local two-node cluster, as a user would (from
inside pytorch/, interpreter in PYTHON), plus slurm_templates/ running pytorch recipes: the array sweep and
the preemption test of pytorch/multinode.sbatch (USR1 -> checkpoint -> requeue -> resume -> same weights as an
uninterrupted run, then the same run resubmitted).

The tests only shrink the shape on the sbatch command line (this machine has 2 cores) and pass small
training arguments; a later --checkpoint-dir overrides the template's own. The independent one-job tests
(single GPU, spawn, torchrun, fsdp, the uninterrupted multinode run) get their jobs from one fixture that runs them
side by side, a few at a time; the tests that signal, kill or stop a job's processes run theirs alone.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, env_python
from slurm_fixtures import GLOO, cluster_env, hosts, progress_step, requeued_once, run_jobs, template_job
from test_slurm_templates import STOPPABLE  # a program that exits 75 on USR1

pytestmark = pytest.mark.slurm

PYTORCH = ROOT / "pytorch"
TEMPLATES = ROOT / "slurm_templates"
TINY = ["--epochs", 2, "--dataset-size", 512, "--batch-size", 16, "--log-every", 8, "--seed", 0]
# The preemption run needs enough steps that USR1 lands mid-training: 2 ranks (one per node) x 16 = 32 samples
# per step, 2048 samples -> 64 steps per epoch, 192 steps (a few seconds). Two ranks, not four: a sum of two
# gradients is the same in any order, so "equal weights" can be checked bit for bit. With four ranks a resumed
# run differs from an uninterrupted one in the last bits (measured: 4e-7 after a resume at an epoch boundary,
# growing to 3.6e-3 by the end after a mid-epoch resume), also under plain torchrun without Slurm -- most likely
# the first step after a restart reduces gradients in a different order (DDP rebuilds its buckets after the
# first step, and gloo's ring sums four values in a chunk-dependent order).
LONG = ["--epochs", 3, "--dataset-size", 2048, "--batch-size", 16, "--log-every", 8, "--seed", 0, *GLOO]
LONG_STEPS = 192
ONE_PER_NODE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
TWO_GPUS = ["--gpus-per-node=2", "--cpus-per-task=2"]


@pytest.fixture(scope="module")
def pytorch_python():
    return env_python("pytorch")


def snapshot(directory):
    path = directory / "snapshot.pt"
    assert path.exists(), f"no snapshot in {directory}: {sorted(p.name for p in directory.iterdir())}"
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_ranks(log: str, expected: dict[int, str]):
    """multinode.py prints `[rankR] host H | local rank L` from every rank."""
    seen = hosts(log)
    assert seen == expected, f"ranks/hosts in the log: {seen}, expected {expected}\n{log[-3000:]}"


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory, request):
    """The jobs of the one-job template tests below (single GPU, spawn, torchrun, fsdp) and the uninterrupted
    multinode.sbatch run (test_multinode_srun; the preemption tests compare against it), run together: {test name:
    (job, checkpoint dir)}."""
    done = run_jobs(request, tmp_path_factory, {
        "test_single_gpu": template_job("pytorch", "single_gpu.sbatch", ["--cpus-per-task=1"], *TINY),
        "test_multigpu_spawn": template_job("pytorch", "multigpu.sbatch", TWO_GPUS, *TINY),
        "test_multigpu_torchrun": template_job("pytorch", "multigpu_torchrun.sbatch", TWO_GPUS, *TINY),
        "test_multinode_srun": template_job("pytorch", "multinode.sbatch", ONE_PER_NODE, *LONG),
        "test_fsdp": template_job("pytorch", "fsdp.sbatch", ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1"],
                                  *TINY)})
    return {name: (job, job_dir / "ckpt") for name, (job, job_dir) in done.items()}


def test_single_gpu(jobs):
    """One GPU given, whichever: jobs sharing the node (run_together) hold the others."""
    job, ckpt = jobs["test_single_gpu"]
    job.assert_ok()
    assert job.info["NodeList"] in {"n1", "n2"}, job.describe()
    assert re.search(rf"job {job.job_id} \(run single-gpu\) on {job.info['NodeList']}: GPUs '\d'", job.log), \
        job.describe()
    assert "epoch 2/2" in job.log, job.describe()
    assert snapshot(ckpt)["step"] == 2 * 512 // 16


def test_multigpu_spawn(jobs):
    """mp.spawn inside one task: the script starts 2 workers itself (no CUDA here)."""
    job, ckpt = jobs["test_multigpu_spawn"]
    job.assert_ok()
    assert "[rank0] world size 2" in job.log, job.describe()
    assert snapshot(ckpt)["step"] == 2 * 512 // (16 * 2)


def test_multigpu_torchrun(jobs):
    """Two workers on the two GPUs given (two distinct ones; which: jobs sharing the node hold others)."""
    job, ckpt = jobs["test_multigpu_torchrun"]
    job.assert_ok()
    gpus = re.search(r": 2 workers, GPUs '(\d),(\d)'", job.log)
    assert gpus and gpus[1] != gpus[2], job.describe()
    assert "[rank0] world size 2" in job.log, job.describe()
    assert snapshot(ckpt)["step"] == 2 * 512 // (16 * 2)


def test_multinode_torchrun_preemption_requeue_resume(slurm_cluster, pytorch_python, tmp_path):
    """srun starts one torchrun per node on n1 and n2; each starts 2 workers (SLURM_GPUS_ON_NODE). USR1 to the
    batch shell mid-training (what --signal=B:USR1@90 does) -> srun -> the torchrun agents, which handle it
    (--signals-to-handle) and pass it to their workers -> snapshot -> the job requeues itself -> the requeued
    run resumes from the snapshot and completes. Slurm signals every process of the step, so the workers get
    USR1 directly too; without --signals-to-handle the agents die of it ("User defined signal 1"), srun's
    --kill-on-bad-exit ends the step, and the workers' save races that kill (lost on GPUs, where a save takes
    seconds)."""
    events = {}
    on_poll = slurm_cluster.preempt_at(8, epoch=1, events=events)
    ckpt = tmp_path / "ckpt"
    job = slurm_cluster.run(PYTORCH / "multinode_torchrun.sbatch", *LONG, "--checkpoint-dir", ckpt,
                            sbatch_args=["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2", "--time=00:10:00"],
                            cwd=PYTORCH, output=tmp_path / "job.out", env={"PYTHON": pytorch_python},
                            timeout=300, on_poll=on_poll).assert_ok()
    assert job.info["NodeList"] == "n[1-2]", job.describe()
    assert events["signalled"] and job.info["Restarts"] == "1", job.describe()
    first, _, second = job.log.partition("restart 1 of at most 3")
    assert_ranks(first, {0: "n1", 1: "n1", 2: "n2", 3: "n2"})
    assert "[rank0] world size 4 | backend gloo" in first and "| nodes 2" in first, job.describe()
    assert "User defined signal 1" not in first, f"a torchrun agent died of USR1\n{job.describe()}"
    for needle in ("requeue: got USR1, forwarding it", "preempted at step",
                   "after the signal; requeueing job"):
        assert needle in first, f"{needle!r} missing before the requeue\n{job.describe()}"
    stopped_at = int(re.search(r"preempted at step (\d+)", first).group(1))
    steps = LONG_STEPS // 2  # 4 ranks
    assert 8 <= stopped_at < steps, job.describe()
    assert re.search(rf"resumed from \S+: epoch \d, step {stopped_at}", second), job.describe()
    assert f"done: {steps} steps" in second and snapshot(ckpt)["step"] == steps, job.describe()


@pytest.fixture(scope="module")
def reference_run(jobs):
    """multinode.sbatch on 2 nodes x 1 task, uninterrupted (from `jobs`): the preemption tests compare against it."""
    job, ckpt = jobs["test_multinode_srun"]
    return job.assert_ok(), ckpt


def test_multinode_srun(reference_run):
    job, ckpt = reference_run
    assert job.info["NodeList"] == "n[1-2]", job.describe()
    assert_ranks(job.log, {0: "n1", 1: "n2"})
    assert "[rank0] world size 2 | backend gloo" in job.log and "| nodes 2" in job.log, job.describe()
    assert snapshot(ckpt)["step"] == LONG_STEPS


def test_fsdp(jobs):
    """fsdp.sbatch (torchrun per node) stretched over both nodes: 2 nodes x 1 worker."""
    job, ckpt = jobs["test_fsdp"]
    job.assert_ok()
    assert job.info["NodeList"] == "n[1-2]", job.describe()
    assert "[rank0] world size 2" in job.log, job.describe()
    assert re.search(r"^1: ", job.log, re.M), f"no output from the second node's task\n{job.describe()}"
    # A sharded (DCP) checkpoint: one shard per rank, written from n1 and n2 onto the shared filesystem.
    assert (ckpt / "latest").read_text().strip() == "step-00000032"
    assert {p.name for p in (ckpt / "step-00000032").iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}


def test_array_sweep(slurm_cluster, pytorch_python, tmp_path):
    """slurm_templates/array_sweep.sbatch over pytorch/single_gpu.py: 4 array tasks, own port and directory."""
    sweep = tmp_path / "sweep"
    job_id = slurm_cluster.submit(TEMPLATES / "array_sweep.sbatch", PYTORCH / "single_gpu.py", "--epochs", 1,
                                  "--dataset-size", 256, "--batch-size", 16, "--seed", 0, *GLOO,
                                  sbatch_args=["--cpus-per-task=1"], output=tmp_path / "sweep-%a.out",
                                  env={"PYTHON": pytorch_python, "SWEEP_DIR": sweep})
    jobs = slurm_cluster.wait_array(job_id, lambda i: tmp_path / f"sweep-{i}.out", tasks=4)
    for job in jobs:
        job.assert_ok()
    lrs = ["0.1", "0.05", "0.02", "0.01"]
    ports = set()
    for index, lr in enumerate(lrs):
        out_dir = sweep / f"task-{index}-lr-{lr}"
        config = dict(kv.split("=") for kv in (out_dir / "config.txt").read_text().split())
        assert config["lr"] == lr
        ports.add(config["port"])
        assert snapshot(out_dir)["step"] == 256 // 16
        assert f"task {index} (job {jobs[index].job_id}): lr={lr}" in jobs[index].log, jobs[index].describe()
    assert len(ports) == 4, f"array tasks shared a MASTER_PORT: {ports}"


@pytest.fixture(scope="module")
def preempted_run(slurm_cluster, pytorch_python, tmp_path_factory):
    """pytorch/multinode.sbatch as submitted by a user, from a copy of the folder (its run directory checkpoints/$RUN
    lands there): SIGTERM to the batch shell mid-training (--signal=B:TERM@N, scancel --batch --signal=TERM), which
    passes it on as USR1 (srun would SIGKILL its tasks on a TERM) -> snapshot -> exit 75 -> scontrol requeue ->
    resume."""
    folder = tmp_path_factory.mktemp("preempt") / "pytorch"
    shutil.copytree(PYTORCH, folder, ignore=shutil.ignore_patterns("checkpoints", "__pycache__", "*.out"))
    events = {}
    on_poll = slurm_cluster.preempt_at(16, epoch=1, signal="TERM", events=events)
    job = slurm_cluster.run(folder / "multinode.sbatch", *LONG, sbatch_args=[*ONE_PER_NODE, "--time=00:10:00"],
                            cwd=folder, output=folder / "job.out", env={"PYTHON": pytorch_python, "RUN": "exp1"},
                            timeout=240, on_poll=on_poll)
    return job, events, folder


def test_preemption_requeue_resume(preempted_run, reference_run):
    """multinode.sbatch's own trap + requeue: the requeued job resumes from checkpoints/$RUN and COMPLETES with
    the same final weights as the uninterrupted reference run."""
    job, events, folder = preempted_run
    job.assert_ok()
    assert events["signalled"], f"training never reached step 16 of epoch 1\n{job.describe()}"
    assert job.info["Restarts"] == "1", job.describe()
    log = job.log
    for needle in ("requeue: got TERM, forwarding it as USR1", "preempted at step",
                   "after checkpointing; requeueing job", "run exp1, restart 1 of at most 3",
                   "resumed from checkpoints/exp1", f"done: {LONG_STEPS} steps"):
        assert needle in log, f"{needle!r} missing\n{job.describe()}"
    preempted_at = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 16 <= preempted_at < LONG_STEPS, job.describe()
    assert_ranks(log.split("restart 1 of at most")[1], {0: "n1", 1: "n2"})

    resumed, reference = snapshot(folder / "checkpoints" / "exp1"), snapshot(reference_run[1])
    assert resumed["step"] == reference["step"] == LONG_STEPS
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after preempt/requeue/resume"


def test_one_node_torchrun_template_preempted_requeues_and_resumes_exactly(slurm_cluster, reference_run, tmp_path):
    """multigpu_torchrun.sbatch preempted as Slurm's preemption with GraceTime does it: SIGTERM to every process of
    the step -- torchrun's agent and its workers -- and none to the batch shell. The workers save and exit 75, the
    agent exits 1 (SignalException), and the shell had forwarded no signal: the block took it for a crash and the
    job FAILED with its snapshot saved. The ranks' saved flag (toolkit.PreemptionFlag.saved) tells it now:
    requeue -> the resumed run ends with the uninterrupted run's weights, bit for bit (2 ranks, as the reference).
    (#27: this template had no --signal and no requeue at all before.)"""
    events = {}
    job, ckpt = slurm_cluster.recipe("pytorch", "multigpu_torchrun.sbatch", tmp_path,
                                     ["--nodes=1", "--gpus-per-node=2", "--cpus-per-task=2", "--time=00:10:00"],
                                     *LONG, timeout=300, on_poll=slurm_cluster.preempt_at(16, epoch=1, to="steps",
                                                                                          signal="TERM", events=events))
    _, second, stopped = requeued_once(job, events, 16, LONG_STEPS, torchrun=True, forwarded=None)
    assert not list((ROOT / "pytorch").glob(".preempted-*")), "the saved flag was left behind"
    assert re.search(rf"resumed from \S+: epoch \d, step {stopped}", second), job.describe()
    resumed, reference = snapshot(ckpt), snapshot(reference_run[1])
    assert resumed["step"] == reference["step"] == LONG_STEPS
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after preempt/requeue/resume"


def test_resubmitted_run_resumes(slurm_cluster, pytorch_python, preempted_run, tmp_path):
    """The same run submitted again (a new job id, as after a time-limit kill) finds checkpoints/$RUN: it resumes
    the finished run, trains nothing and says so, instead of starting over."""
    _, _, folder = preempted_run
    job = slurm_cluster.run(folder / "multinode.sbatch", *LONG, sbatch_args=ONE_PER_NODE, cwd=folder,
                            output=tmp_path / "job.out", env={"PYTHON": pytorch_python, "RUN": "exp1"},
                            timeout=150).assert_ok()
    assert job.job_id != preempted_run[0].job_id
    for needle in ("run exp1, restart 0 of at most 3", "resumed from checkpoints/exp1", f"done: {LONG_STEPS} steps"):
        assert needle in job.log, f"{needle!r} missing\n{job.describe()}"
    assert "snapshot saved" not in job.log, job.describe()



def test_node_loss_requeue_resume(slurm_cluster, pytorch_python, reference_run, tmp_path):
    """Node n2 dies mid-training (local_cluster/node.sh fail: every process of n2, slurmd included, SIGKILLed;
    nobody tells the controller). The rank on n1 says in one line that it lost its peer; srun waits for the
    controller, which declares n2 DOWN after SlurmdTimeout and -- the template has --requeue -- requeues the job
    (a NODE_FAIL record) instead of failing it. n2 comes back, the requeued job resumes from the last snapshot
    (the end of epoch 1) and ends with the uninterrupted run's weights, bit for bit."""
    events = {"failed": False, "booted": False}

    def on_poll(info, log):
        if not events["failed"] and progress_step(log, 2) >= LONG_STEPS // 3 + 16:  # past the epoch-1 snapshot
            slurm_cluster.node("fail", "n2")
            events["failed"] = True
        if events["failed"] and not events["booted"] and info["JobState"] == "PENDING":
            slurm_cluster.node("boot", "n2")  # repaired (or replaced) after the job was requeued
            events["booted"] = True
        if events["booted"]:
            slurm_cluster.release_requeued(info, events, after=20)

    try:
        ckpt = tmp_path / "ckpt"
        job = slurm_cluster.run(PYTORCH / "multinode.sbatch", *LONG, "--checkpoint-dir", ckpt,
                                sbatch_args=[*ONE_PER_NODE, "--time=00:10:00"], cwd=PYTORCH,
                                output=tmp_path / "job.out", env={"PYTHON": pytorch_python}, timeout=400,
                                on_poll=on_poll).assert_ok()
    finally:
        if events["failed"] and not events["booted"]:
            slurm_cluster.node("boot", "n2")  # whatever happened, the next test needs both nodes
    assert events["booted"] and job.info["Restarts"] == "1", job.describe()
    first, _, second = job.log.partition("restart 1 of at most 3")
    assert "srun: error: Node failure on n2" in first and "Traceback" not in first, job.describe()
    lost = [ln for ln in first.splitlines() if "error: lost contact with another rank" in ln]
    assert len(lost) == 1 and lost[0].startswith("0: [rank0] error: "), job.describe()
    jobcomp = (Path(cluster_env().get("SLURM_LOCAL_DIR", "/var/tmp/slurm-local")) / "log" / "jobcomp.log")
    states = re.findall(rf"^JobId={job.job_id} .*?JobState=(\S+)", jobcomp.read_text(), re.M)
    assert states[-2:] == ["NODE_FAIL", "COMPLETED"], states
    # The newest snapshot before n2 died: the end of epoch 1 (step 64), or of epoch 2 when the node's death lagged
    # behind a fast epoch (seen in a loaded CI rehearsal: the kill landed after step 128 was saved).
    saved = int(re.findall(r"snapshot saved to \S+ \(step (\d+)\)", first)[-1])
    assert saved in (64, 128), job.describe()
    assert re.search(rf"resumed from \S+: epoch {saved // 64 + 1}, step {saved}\b", second), job.describe()
    assert_ranks(second, {0: "n1", 1: "n2"})
    resumed, reference = snapshot(ckpt), snapshot(reference_run[1])
    assert resumed["step"] == reference["step"] == LONG_STEPS
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after node loss/requeue/resume"
    for _ in range(150):  # n2 answers again (ReturnToService=2) before the next test wants both nodes
        if slurm_cluster.node_state("n2") in {"idle", "mixed", "allocated"}:
            break
        time.sleep(0.2)


def test_multinode_torchrun_worker_killed_requeue_resume(slurm_cluster, pytorch_python, reference_run,
                                                         tmp_path_factory):
    """srun torchrun on 2 nodes x 1 worker, the worker on n2 killed (kill -9) after the epoch-1 snapshot.
    torchrun's --max-restarts cannot restart across nodes (the agents count restarts differently), so the step
    fails -- and multinode_torchrun.sbatch requeues the job because a newer snapshot than at its start exists; the
    requeued run resumes from it and ends with the uninterrupted run's weights. (Before: the job ended FAILED.)"""
    folder = tmp_path_factory.mktemp("worker_killed") / "pytorch"
    shutil.copytree(PYTORCH, folder, ignore=shutil.ignore_patterns("checkpoints", "__pycache__", "*.out"))
    events = {"killed": False}

    def on_poll(info, log):
        if not events["killed"] and progress_step(log, 2) >= LONG_STEPS // 3 + 16:
            events["killed"] = kill_worker("n2")
        if events["killed"]:
            slurm_cluster.release_requeued(info, events)

    job = slurm_cluster.run(folder / "multinode_torchrun.sbatch", *LONG,
                            sbatch_args=[*ONE_PER_NODE, "--time=00:10:00"], cwd=folder, output=folder / "job.out",
                            env={"PYTHON": pytorch_python, "RUN": "exp1"}, timeout=300, on_poll=on_poll).assert_ok()
    assert events["killed"] and job.info["Restarts"] == "1", job.describe()
    first, _, second = job.log.partition("restart 1 of at most 3")
    assert "after saving new progress; requeueing job" in first, job.describe()
    assert re.search(r"resumed from \S+: epoch 2, step 64\b", second), job.describe()
    resumed, reference = snapshot(folder / "checkpoints" / "exp1"), snapshot(reference_run[1])
    assert resumed["step"] == reference["step"] == LONG_STEPS
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"{name} differs after kill/requeue/resume"


def rank_pid(node):
    """The pid of the training process (not the torchrun agent) running on local-cluster node `node`, or None."""
    netns = f"{cluster_env().get('SLURM_LOCAL_PREFIX', 'slurmlc')}-{node}"
    pids = subprocess.run(["ip", "netns", "pids", netns], stdout=subprocess.PIPE, text=True).stdout.split()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"multinode.py") for a in argv) and b"torch.distributed.run" not in argv:
            return int(pid)
    return None


def kill_worker(node):
    """kill -9 the training worker (not the torchrun agent) running on local-cluster node `node`."""
    pid = rank_pid(node)
    if pid:
        os.kill(pid, signal.SIGKILL)
    return bool(pid)


def test_a_hung_rank_ends_the_job_with_evidence(slurm_cluster, pytorch_python, tmp_path):
    """C13 through multinode.sbatch (#23): rank 1 on n2 is stopped (SIGSTOP: alive, not answering) after step 2.
    Rank 0's next collective runs out --timeout 5: it leaves its stack in <checkpoint-dir>/debug/<job id>/, prints
    one line naming rank 1 as the rank that stopped answering (not "died"), exits 1; srun ends the stopped rank
    (--kill-on-bad-exit) and the job FAILS with that line in its log, within the bound -- not at its time limit."""
    stopped = {}

    def on_poll(info, log):
        if not stopped and re.search(r"^0: \[rank0\] epoch 1 \|[^\n]*\| step 2 \|", log, re.M):
            stopped["pid"] = rank_pid("n2")
            if stopped["pid"]:
                os.kill(stopped["pid"], signal.SIGSTOP)

    args = ["--epochs", 100, "--dataset-size", 512, "--batch-size", 16, "--log-every", 1, "--timeout", 5]
    job, ckpt = slurm_cluster.recipe("pytorch", "multinode.sbatch", tmp_path, [*ONE_PER_NODE, "--time=00:05:00"],
                                     *args, env={"PYTHON": pytorch_python}, timeout=150, on_poll=on_poll)
    assert stopped.get("pid"), f"rank 1 was never stopped\n{job.describe()}"
    assert job.state == "FAILED" and job.exit_code == 1, job.describe()
    # The first error line is rank 0's, and its only one. (srun then ends the step: SIGCONT and SIGTERM to rank 1,
    # which wakes, finds rank 0 gone and says so in a line of its own -- true by then, and after rank 0's.)
    errors = re.findall(r"^\d+: (?:\[rank\d+\] )?error: .*$", job.log, re.M)
    assert errors and errors[0].startswith("0: [rank0] error: "), job.describe()
    assert len([e for e in errors if e.startswith("0: ")]) == 1, job.describe()
    assert "rank 1 stopped answering" in errors[0] and "died" not in errors[0], errors[0]
    assert "within --timeout 5 s" in errors[0], errors[0]
    assert "Traceback" not in job.log, job.describe()
    stack = (ckpt / "debug" / job.job_id / "rank0.stack.txt").read_text()
    assert "where it waited:" in stack and "every thread now:" in stack, stack[-2000:]


def test_multinode_restart_cap(slurm_cluster, tmp_path):
    """multinode.sbatch's own cap: USR1 to the batch shell (what --signal=B:USR1@90 sends) is forwarded to the
    step, the program exits 75, but MAX_RESTARTS=0 allows no requeue: the job FAILS with one clear line instead of
    looping. In a copy of the folder whose multinode.py is a stand-in that only reacts to the signal (the real
    one's side is test_preemption_requeue_resume); the template itself is unchanged."""
    folder = tmp_path / "pytorch"
    folder.mkdir()
    shutil.copy(PYTORCH / "multinode.sbatch", folder)
    (folder / "multinode.py").write_text(STOPPABLE)
    on_poll = slurm_cluster.preempt_when(lambda log: log.count("training") == 2)
    job = slurm_cluster.run(folder / "multinode.sbatch", sbatch_args=ONE_PER_NODE, cwd=folder,
                            output=tmp_path / "job.out", env={"PYTHON": "python3", "MAX_RESTARTS": 0},
                            timeout=60, on_poll=on_poll)
    assert job.state == "FAILED" and job.exit_code == 1 and job.info["Restarts"] == "0", job.describe()
    for needle in ("requeue: got USR1, forwarding it", "checkpointed",
                   "restarted 0 times already (MAX_RESTARTS=0): giving up"):
        assert needle in job.log, f"{needle!r} missing\n{job.describe()}"
