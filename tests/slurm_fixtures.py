"""The local Slurm cluster as a pytest fixture, and a helper that submits a job and waits for its end.

Registered from conftest.py (`pytest_plugins`). The cluster (slurm_templates/local_cluster) is started once
per session, only when a test asks for it. Each session holds a lease (start.sh --lease PID) and gives it back
at the end (stop.sh --release PID): the cluster stops when the last session using it ends, and a cluster
started by hand is left running. Where it cannot start (not root, not Linux) the Slurm tests skip locally and
fail in CI.

Jobs run on emulated nodes n1..n2 that share this filesystem, so they use the per-folder virtualenvs.
"""

import os
import platform
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from helpers import ROOT, clean_env, env_python, unavailable, without_group

LOCAL_CLUSTER = ROOT / "slurm_templates" / "local_cluster"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}
CLIENT_TIMEOUT = 30  # every client call: a dead controller must not hang the suite
# Which cluster instance (start.sh's SLURM_LOCAL_DIR, _PREFIX, _NET, ...): taken from the test's own
# environment, which clean_env() would otherwise strip with every other SLURM_* variable.
LOCAL_SETTINGS = {k: v for k, v in os.environ.items() if k.startswith("SLURM_LOCAL_")}
LOCAL_NET = LOCAL_SETTINGS.get("SLURM_LOCAL_NET", "10.77.0")


def cluster_env(**overrides) -> dict:
    """clean_env() plus the SLURM_LOCAL_* settings that name the cluster instance (for start/stop/run.sh)."""
    return {**clean_env(**overrides), **LOCAL_SETTINGS}

_job_times: list[tuple[str, str, str, float]] = []  # (test, job id, final state, seconds) for the summary
_new_jobs: list[tuple[str, str, str, float]] = []  # the running test's jobs, not yet in a report
_submitted: list[str] = []  # the running test's job ids, cancelled at its teardown if still live
_cluster: list["SlurmCluster"] = []  # the session's cluster, once started


def current_test() -> str:
    """The running test's node id (without the @group pytest-xdist's loadgroup appends)."""
    return without_group(os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0])


@dataclass
class Job:
    job_id: str
    state: str
    exit_code: int
    signal: int
    log: str
    seconds: float
    info: dict = field(repr=False)

    def describe(self) -> str:
        return (f"job {self.job_id}: JobState={self.state} ExitCode={self.exit_code}:{self.signal} "
                f"Reason={self.info.get('Reason')} Restarts={self.info.get('Restarts')} after {self.seconds:.1f} s"
                f"\n--- job log ---\n{self.log[-6000:]}")

    def assert_ok(self) -> "Job":
        """JobState=COMPLETED and exit code 0 -- never trust the exit code alone (a cancelled job can be 0)."""
        assert self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0, self.describe()
        return self


def parse_scontrol(text: str) -> dict:
    """`scontrol show job -o` output (one line of Key=Value) as a dict."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


class SlurmCluster:
    def client(self, *args, timeout: float = CLIENT_TIMEOUT, env: dict | None = None, cwd=ROOT,
               check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command inside the cluster's namespace (local_cluster/run.sh), with a timeout."""
        cmd = [str(LOCAL_CLUSTER / "run.sh"), *map(str, args)]
        try:
            proc = subprocess.run(cmd, cwd=cwd, env=env or cluster_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            if not check:  # the caller takes any outcome (a signal to a job that may be ending: scancel retries)
                return subprocess.CompletedProcess(cmd, 124, "")
            pytest.fail(f"Slurm client timed out after {timeout}s: {shlex.join(cmd)}", pytrace=False)
        if check and proc.returncode != 0:
            pytest.fail(f"exit {proc.returncode}: {shlex.join(cmd)}\n{proc.stdout}", pytrace=False)
        return proc

    def job_info(self, job_id: str) -> dict:
        return parse_scontrol(self.client("scontrol", "show", "job", "-o", job_id).stdout)

    def submit(self, script, *args, sbatch_args=(), cwd=ROOT, output: Path, env: dict | None = None) -> str:
        """sbatch --parsable with our own --output file; `env` is added to the job's environment."""
        output.parent.mkdir(parents=True, exist_ok=True)
        cmd = ["sbatch", "--parsable", f"--output={output}", "--export=ALL", *sbatch_args, script, *args]
        proc = self.client(*cmd, cwd=cwd, env=cluster_env(**(env or {})))
        job_id = proc.stdout.strip().splitlines()[-1].split(";")[0]
        _submitted.append(job_id)
        return job_id

    def cancel_leftovers(self, timeout: float = 90) -> list[str]:
        """Cancel the jobs this test submitted that are still queued or running, and wait until they are gone: a
        test that fails (or stops waiting) must not leave a job holding the cores and GPUs the next test's jobs
        expect (seen: a ray job left RUNNING made the next test's job get GPU 1 instead of 0)."""
        ids = list(dict.fromkeys(_submitted))
        _submitted.clear()
        if not ids:
            return []
        live = self.client("squeue", "-h", "-o", "%i", "-j", ",".join(ids), check=False).stdout.split()
        if live:
            self.client("scancel", *live, check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.client(
                    "squeue", "-h", "-o", "%i", "-j", ",".join(live), check=False).stdout.split():
                time.sleep(0.5)
        return live

    def wait(self, job_id: str, output: Path, timeout: float = 120, on_poll=None, name: str = "") -> Job:
        """Poll `scontrol show job` until a final state (faster than `sbatch --wait`, and it never hangs).

        on_poll(info, log) is called on every poll while the job is not finished (e.g. to signal it).
        """
        start = time.monotonic()
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "?")
            log = output.read_text(errors="replace") if output.exists() else ""
            if state in TERMINAL:
                break
            if time.monotonic() - start > timeout:
                self.client("scancel", job_id, check=False)
                pytest.fail(f"job {job_id} not finished after {timeout}s (JobState={state}, "
                            f"Reason={info.get('Reason')}); cancelled\n--- job log ---\n{log[-6000:]}", pytrace=False)
            if on_poll is not None:
                on_poll(info, log)
            time.sleep(0.2)
        return self._finished(job_id, info, state, output, time.monotonic() - start, name or current_test())

    def _finished(self, job_id: str, info: dict, state: str, output: Path, seconds: float, name: str) -> Job:
        code, _, sig = info.get("ExitCode", "-1:0").partition(":")
        time.sleep(0.1)  # the last lines of the log may land just after the state changes
        log = output.read_text(errors="replace") if output.exists() else ""
        _new_jobs.append((name, job_id, state, seconds))
        return Job(job_id, state, int(code), int(sig or 0), log, seconds, info)

    def run_together(self, jobs: dict, *, prefix: str = "", at_once: int = 3, timeout: float = 240) -> dict:
        """Independent jobs submitted and waited for together: much of a job's time here is scheduling, start-up
        and teardown, not CPU, so side by side they cost about what the slowest costs. `jobs` maps a name (the
        job table's, after `prefix`: the test that asserts on the job) to a callable that submits the job and
        returns (job id, its output file); at most `at_once` are submitted at a time (two cores: more only slow
        each other). Returns {name: Job} in the given order. A job not finished `timeout` s after its submission
        is cancelled and comes back as JobState=UNFINISHED, so that only the test asserting on it fails.

        Called from a module-scoped fixture, the jobs count as the first test's (_submitted): they are all
        finished when it returns, so that test's teardown (cancel_leftovers) cancels nothing -- unless the
        fixture failed half-way, and then it should."""
        todo, running, done = list(jobs.items()), {}, {}
        while todo or running:
            while todo and len(running) < at_once:
                name, submit = todo.pop(0)
                job_id, output = submit()
                running[name] = (job_id, Path(output), time.monotonic())
            for name, (job_id, output, start) in list(running.items()):
                info = self.job_info(job_id)
                state = info.get("JobState", "?")
                late = time.monotonic() - start > timeout
                if state in TERMINAL or late:
                    if state not in TERMINAL:
                        self.client("scancel", job_id, check=False)
                        state, info = "UNFINISHED", {**info, "Reason": f"not finished after {timeout}s; cancelled"}
                    done[name] = self._finished(job_id, info, state, output, time.monotonic() - start,
                                                prefix + name)
                    del running[name]
            time.sleep(0.2)
        return {name: done[name] for name in jobs}

    def submit_recipe(self, folder: str, template: str, tmp_path: Path, sbatch_args, *args,
                      env: dict | None = None) -> tuple[str, Path]:
        """recipe()'s submission alone, for run_together: (job id, output file); the checkpoints go to
        tmp_path/ckpt."""
        output = tmp_path / "job.out"
        job_id = self.submit(ROOT / folder / template, *args, *GLOO, "--checkpoint-dir", tmp_path / "ckpt",
                             sbatch_args=sbatch_args, cwd=ROOT / folder, output=output,
                             env={"PYTHON": env_python(folder), **(env or {})})
        return job_id, output

    def wait_array(self, job_id: str, output_of, tasks: int, timeout: float = 180) -> list[Job]:
        """Wait for every task of job array `job_id`; output_of(index) is that task's log file."""
        start = time.monotonic()
        while True:
            lines = self.client("scontrol", "show", "job", "-o", job_id).stdout.strip().splitlines()
            infos = {int(i["ArrayTaskId"]): i for i in map(parse_scontrol, lines)
                     if i.get("ArrayTaskId", "").isdigit()}
            if len(infos) == tasks and all(i.get("JobState") in TERMINAL for i in infos.values()):
                break
            if time.monotonic() - start > timeout:
                self.client("scancel", job_id, check=False)
                states = {k: (i.get("JobState"), i.get("Reason")) for k, i in sorted(infos.items())}
                pytest.fail(f"array job {job_id} not finished after {timeout}s: {states}; cancelled", pytrace=False)
            time.sleep(0.3)
        seconds = time.monotonic() - start
        jobs = []
        for index, info in sorted(infos.items()):
            code, _, sig = info.get("ExitCode", "-1:0").partition(":")
            out = Path(output_of(index))
            log = out.read_text(errors="replace") if out.exists() else ""
            jobs.append(Job(info["JobId"], info["JobState"], int(code), int(sig or 0), log, seconds, info))
        name = current_test()
        _new_jobs.append((f"{name} ({tasks} array tasks)", job_id, ",".join(sorted({j.state for j in jobs})), seconds))
        return jobs

    def release_requeued(self, info: dict, events: dict, after: float = 2) -> None:
        """From an on_poll callback: start a requeued job now instead of after its ~2 min BeginTime -- but not
        in the same second as the requeue, or slurmd refuses the new credential ("Job credential revoked" ->
        FAILED). Sets events["released"] once done. After a node failure wait longer (`after`): the first run's
        srun may still be trying to reach the lost node, and when it gives up it cancels "step N.0" -- the same
        id as the requeued run's first step, which it then kills (seen: the resumed run Terminated after 1 s)."""
        if events.get("released") or info.get("JobState") != "PENDING" or int(info.get("Restarts", 0)) < 1:
            return
        events["requeued_at"] = events.get("requeued_at") or time.monotonic()
        if time.monotonic() - events["requeued_at"] >= after:
            self.client("scontrol", "update", f"jobid={info['JobId']}", "StartTime=now")
            events["released"] = True

    def node(self, action: str, name: str) -> None:
        """local_cluster/node.sh: `fail` kills every process of node `name` (its slurmd, job steps and ranks, as
        a power cut does; the controller finds out by itself), `boot` starts its slurmd again."""
        proc = subprocess.run([str(LOCAL_CLUSTER / "node.sh"), action, name], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=60, env=cluster_env())
        if proc.returncode != 0:
            pytest.fail(f"node.sh {action} {name} failed:\n{proc.stdout}", pytrace=False)

    def node_state(self, name: str) -> str:
        return self.client("sinfo", "-h", "-N", "-n", name, "-o", "%T").stdout.strip()

    def preempt_when(self, condition, *, to: str = "batch", signal: str = "USR1", events: dict | None = None):
        """An on_poll callback: once condition(log) holds (a callable, or a regular expression the log must match),
        send `signal`, then start the requeued job at once. `to` says to what, as Slurm would send it:
        - "batch": the batch shell alone, which forwards it: what --signal=B:USR1@90 does before the time limit;
        - "steps": every process of every step, DataLoader workers included, not the batch shell (nor srun, which
          is part of it): what preemption with GraceTime sends (SIGTERM; slurmctld's KILL_STEPS_ONLY);
        - "full": all of that and the batch shell (scancel --full; the TERM of a time limit or scancel also
          reaches srun, which then SIGKILLs its tasks -- nothing can save then).
        `events` (optional) records "signalled", "requeued_at", "released" for the test to check."""
        events = {} if events is None else events
        events.setdefault("signalled", False)
        holds = condition if callable(condition) else (lambda log: re.search(condition, log, re.M))

        def on_poll(info, log):
            if not events["signalled"] and holds(log):
                self.client("scancel", *{"batch": ["--batch"], "full": ["--full"], "steps": []}[to],
                            f"--signal={signal}", info["JobId"])
                events["signalled"] = True
            if events["signalled"]:
                self.release_requeued(info, events)

        return on_poll

    def preempt_at(self, step: int, *, epoch: int | None = None, **kwargs):
        """preempt_when rank 0's progress lines (C3) have reached `step` (in `epoch`, when given)."""
        return self.preempt_when(lambda log: progress_step(log, epoch) >= step, **kwargs)

    def recipe(self, folder: str, template: str, tmp_path: Path, sbatch_args, *args, **kwargs) -> tuple[Job, Path]:
        """Submit one of <folder>'s templates from inside the folder with the folder's environment, the arguments
        after it going to its script plus --checkpoint-dir under tmp_path and --backend gloo (GLOO); wait;
        return (job, checkpoint dir)."""
        job_id, output = self.submit_recipe(folder, template, tmp_path, sbatch_args, *args, env=kwargs.pop("env", {}))
        return self.wait(job_id, output, **kwargs), tmp_path / "ckpt"

    def run(self, script, *args, sbatch_args=(), cwd=ROOT, output: Path, env: dict | None = None,
            timeout: float = 120, on_poll=None) -> Job:
        """Submit, wait, return the finished job (state, exit code, log)."""
        job_id = self.submit(script, *args, sbatch_args=sbatch_args, cwd=cwd, output=output, env=env)
        return self.wait(job_id, output, timeout=timeout, on_poll=on_poll)


def template_job(folder: str, template: str, sbatch_args, *args, env: dict | None = None):
    """One of <folder>'s templates as a job for run_jobs: job dir -> (job id, output file), its checkpoints in job
    dir/ckpt (SlurmCluster.submit_recipe); "{dir}" in an argument is the job dir."""
    def submit(job_dir):
        filled = [a.format(dir=job_dir) if isinstance(a, str) else a for a in args]
        return _cluster[0].submit_recipe(folder, template, job_dir, sbatch_args, *filled, env=env)
    return submit


def template_rows(folder: str, rows, *args) -> dict:
    """test_template_runs' rows (pytest params: template, sbatch args, ...) as run_jobs' jobs, named by the test
    that asserts on each: {"test_template_runs[ID]": template_job}, every one with the script arguments `args`."""
    return {f"test_template_runs[{p.id}]": template_job(folder, *p.values[:2], *args) for p in rows}


def run_jobs(request, tmp_path_factory, jobs: dict, *, at_once: int = 3, timeout: float = 240) -> dict:
    """From a module-scoped fixture: the independent jobs of the module's tests, each in a folder of its own,
    submitted and waited for together (SlurmCluster.run_together, the job table naming each by the test that
    asserts on it). `jobs` maps that name to a submitter: job dir -> (job id, output file) (template_job, or the
    test file's own). Returns {name: (Job, job dir)}; a template job's checkpoints are in job dir/ckpt."""
    dirs = {name: tmp_path_factory.mktemp("job") for name in jobs}
    done = _cluster[0].run_together({name: partial(submit, dirs[name]) for name, submit in jobs.items()},
                                    prefix=module_prefix(request), at_once=at_once, timeout=timeout)
    return {name: (job, dirs[name]) for name, job in done.items()}


def module_prefix(request) -> str:
    """For run_together from a module-scoped fixture: the test file's node id and "::", so that the job table names
    each job by the test that asserts on it."""
    return without_group(request.node.nodeid) + "::"


def hosts(log: str) -> dict[int, str]:
    """{rank: host} from the `[rankR] host H |` line the multinode scripts print (those that do) from every rank."""
    return {int(r): h for r, h in re.findall(r"\[rank(\d+)\] host (\S+) \|", log)}


def progress_step(log: str, epoch: int | None = None) -> int:
    """The last step rank 0's progress lines (C3: `[rank0] epoch 2 | batch 5/16 | step 21 | loss ...`) have
    reached in a job log (only those of `epoch` when given), 0 before the first."""
    which = r"\d+" if epoch is None else str(epoch)
    return max((int(n) for n in re.findall(rf"^(?:\d+: )?\[rank0\] epoch {which} \|[^\n]*?\bstep (\d+)", log, re.M)),
               default=0)


def requeued_once(job: "Job", events: dict, at_step: int, total_steps: int,
                  requeue_line: str = "after checkpointing; requeueing job",
                  torchrun: bool = False, forwarded: str | None = "USR1") -> tuple[str, str, int]:
    """What every preempted template job must show (C7, C8): signalled once training reached `at_step`; the
    signal forwarded; the ranks stopped at a step they agreed on (a multiple of toolkit's CHECK_EVERY, 10) and
    saved; the template requeued the job once and the requeued run started and completed; no traceback and no
    DataLoader worker killed by the signal. Returns (log before the requeue, log after it, the step stopped at)."""
    job.assert_ok()
    assert events["signalled"], f"training never reached step {at_step}\n{job.describe()}"
    assert job.info["Restarts"] == "1", job.describe()
    first, _, second = job.log.partition("restart 1 of at most 3")
    assert second, f"the requeued run never started\n{job.describe()}"
    # forwarded: the signal the batch shell got and passed on (None: the steps got it directly, see preempt_when)
    for needle in ([f"requeue: got {forwarded}, forwarding it"] if forwarded else []) + ["preempted at step",
                                                                                          requeue_line]:
        assert needle in first, f"{needle!r} missing before the requeue\n{job.describe()}"
    # torchrun's agent ends a handled signal with its own SignalException traceback (torch 2.13), one per agent;
    # any other traceback is the recipe's.
    agents = len(re.findall(r"SignalException: Process \d+ got signal", job.log)) if torchrun else 0
    assert "DataLoader worker" not in job.log and job.log.count("Traceback") == agents, job.describe()
    stopped = int(re.search(r"preempted at step (\d+)", first).group(1))
    assert at_step <= stopped < total_steps and stopped % 10 == 0, job.describe()
    return first, second, stopped


# The local cluster's GPUs are fake (/dev/null devices in gres.conf): its jobs are given GPUs that torch cannot use,
# and a recipe given GPUs it cannot use stops rather than train on the CPU (CONTRACT C12) -- unless it is asked for
# gloo explicitly, as every test job here is.
GLOO = ("--backend", "gloo")


def shape(nodes: int, tasks_per_node: int = 1, gpus_per_node: int | None = None, cpus: int = 1,
          time: str = "00:15:00") -> list[str]:
    """sbatch options for a job of `nodes` x `tasks_per_node` (one task per GPU unless gpus_per_node says).

    The time limit is generous: the tests' own timeouts bound a job, and the templates' --signal=B:USR1@90 must not
    fire on a slow job (jobs run side by side on two busy cores, run_together: at 5 min a 3-minute modulus job got
    its USR1 after training and requeued itself)."""
    return [f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
            f"--gpus-per-node={gpus_per_node or tasks_per_node}", f"--cpus-per-task={cpus}", f"--time={time}"]


# test_template_runs' rows that the torch folders share, as pytest parameters (template, sbatch args, world size):
# one GPU, then mp.spawn and torchrun on 2 (fake) GPUs of one node -- 2 CPU workers under --backend gloo -- and
# multinode.sbatch one task per GPU on one node or across two. A folder adds its own rows.
ONE_NODE = [
    pytest.param("single_gpu.sbatch", shape(1, 1), 1, id="single_gpu"),
    pytest.param("multigpu.sbatch", shape(1, 1, gpus_per_node=2), 2, id="spawn"),
    pytest.param("multigpu_torchrun.sbatch", shape(1, 1, gpus_per_node=2), 2, id="torchrun"),  # SLURM_GPUS_ON_NODE
]
MULTINODE_1X2 = pytest.param("multinode.sbatch", shape(1, 2), 2, id="multinode-1x2")
# multinode.sbatch on 2 nodes x 1 task: test_slurm_preemption.py, every folder's straight run


@pytest.fixture(scope="session")
def slurm_cluster():
    """The local cluster (2 nodes n1, n2 with 8 fake GPUs each), started once for the session."""
    if platform.system() != "Linux":
        unavailable("the local Slurm cluster needs Linux (network namespaces)")
    if os.geteuid() != 0:
        unavailable("the local Slurm cluster needs root: run the Slurm tests as root (CI does)")
    try:
        proc = subprocess.run([str(LOCAL_CLUSTER / "start.sh"), "--lease", str(os.getpid())],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                              env=cluster_env())
    except subprocess.TimeoutExpired:
        unavailable("slurm_templates/local_cluster/start.sh did not finish in 600 s")
    if proc.returncode != 0:
        unavailable(f"slurm_templates/local_cluster/start.sh failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    _cluster.append(SlurmCluster())
    yield _cluster[0]
    subprocess.run([str(LOCAL_CLUSTER / "stop.sh"), "--release", str(os.getpid())], timeout=360, check=False,
                   env=cluster_env())


@pytest.fixture(scope="session")
def slurm_python():
    """The interpreter jobs use for slurm_templates/ tools (.venvs/slurm_templates)."""
    return env_python("slurm_templates")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    if _cluster and _submitted:
        _cluster[0].cancel_leftovers()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's jobs travel in its teardown report: under pytest-xdist the tests run in worker processes, and
    only reports reach the process that prints the summary."""
    outcome = yield
    if call.when == "teardown" and _new_jobs:
        outcome.get_result().user_properties.append(("slurm_jobs", list(_new_jobs)))
        _new_jobs.clear()


def pytest_runtest_logreport(report):
    for key, jobs in report.user_properties:
        if key == "slurm_jobs":
            _job_times.extend(tuple(job) for job in jobs)


def pytest_terminal_summary(terminalreporter):
    if not _job_times:
        return
    terminalreporter.section("Slurm jobs (submit to final state)")
    for test, job_id, state, seconds in _job_times:
        terminalreporter.write_line(f"{seconds:7.1f} s  job {job_id:>5}  {state:<10} {test}")
    terminalreporter.write_line(f"{sum(t[3] for t in _job_times):7.1f} s  total over {len(_job_times)} jobs")
