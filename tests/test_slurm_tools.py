"""slurm_templates/tools without Slurm: the benchmark's arithmetic, the doctor's configuration checks, and both
tools under plain torchrun (so they are exercised even where the local cluster cannot run); stacks.py with
stand-ins for scontrol and srun, and once against a real job of the local cluster (marked slurm)."""

import faulthandler
import importlib.util
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import traceback

import pytest

from helpers import ROOT, clean_env, free_port, run, torchrun, unavailable

TOOLS = ROOT / "slurm_templates" / "tools"


def load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = load("allreduce_bench")
doctor = load("doctor")
stacks = load("stacks")
fr_report = load("fr_report")


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


def clean_launch_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TORCHELASTIC_")) or key in {
                "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NCCL_SOCKET_IFNAME",
                "GLOO_SOCKET_IFNAME"}:
            monkeypatch.delenv(key)


def fake_dns(monkeypatch, table, host):
    """Name resolution as a node with this /etc/hosts would answer it; this machine's hostname is `host`."""
    def getaddrinfo(name, *args, **kwargs):
        if name not in table:
            raise doctor.socket.gaierror(-2, "Name or service not known")
        family = doctor.socket.AF_INET6 if ":" in table[name] else doctor.socket.AF_INET
        return [(family, doctor.socket.SOCK_STREAM, 6, "", (table[name], 0))]
    monkeypatch.setattr(doctor.socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(doctor.socket, "gethostname", lambda: host)


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
    clean_launch_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake_dns(monkeypatch, {"n1": "10.0.0.1", "localhost": "127.0.0.1"}, host="n1")
    problems = doctor.checks(doctor.launch_env())
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


# A Debian/Ubuntu node: its own name on 127.0.1.1 in /etc/hosts, the other node's name on the network.
DEBIAN_N1 = {"n1": "127.0.1.1", "n2": "10.0.0.2", "localhost": "127.0.0.1", "ip6-localhost": "::1"}


@pytest.mark.parametrize("nnodes, env, problem", [
    (2, {"MASTER_ADDR": "n1"}, "MASTER_ADDR=n1 with 2 nodes: other nodes cannot reach it: it resolves to "
                               "127.0.1.1 on n1 (an /etc/hosts line `127.0.1.1 n1`"),
    (2, {"MASTER_ADDR": "ip6-localhost", "GLOO_SOCKET_IFNAME": "eth0"}, "it resolves to ::1 on n1"),
    (2, {"MASTER_ADDR": "n2"}, "this node's hostname n1 with 2 nodes: other nodes cannot reach it: it resolves "
                               "to 127.0.1.1 on n1"),
    (1, {"MASTER_ADDR": "n3"}, "MASTER_ADDR=n3 does not resolve on n1"),
    (1, {"MASTER_ADDR": "n1"}, None),  # one node: loopback is where everyone is
    (2, {"MASTER_ADDR": "n2", "GLOO_SOCKET_IFNAME": "eth0"}, None),  # gloo binds to eth0, not the hostname
], ids=["master-127.0.1.1", "master-::1", "own-hostname-127.0.1.1", "unresolvable", "one-node", "gloo-ifname"])
def test_doctor_fails_addresses_other_nodes_cannot_reach(monkeypatch, nnodes, env, problem):
    """#23: a name that resolves to loopback on a node of a multi-node job is unreachable from the others (the
    rendezvous at MASTER_ADDR, or gloo's address from the hostname); a name that does not resolve ends the
    rendezvous before it starts. Each is a FAIL naming the host, the address and the fix."""
    fake_dns(monkeypatch, DEBIAN_N1, host="n1")
    problems = doctor.address_problems(nnodes, "n1", env)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems
        assert "export " in problems[0] or "set MASTER_ADDR" in problems[0], problems


NICS = ["docker0", "eth0", "ibp65s0", "ibs1", "lo"]


@pytest.mark.parametrize("spec, selected", [
    ("ib", ["ibp65s0", "ibs1"]),  # a prefix, as NCCL reads it
    ("ib0", []),  # the old template hint: no interface of an IPoIB node with PCI names
    ("=ibs1", ["ibs1"]), ("=ib", []),  # '=': exact names
    ("^docker,lo", ["eth0", "ibp65s0", "ibs1"]), ("^=eth0", ["docker0", "ibp65s0", "ibs1", "lo"]),  # '^': all but
    ("eth,ibs", ["eth0", "ibs1"]),
])
def test_nccl_socket_ifname_is_a_prefix_list(spec, selected):
    assert doctor.nccl_selects(spec, NICS) == selected


def test_the_templates_hint_an_nccl_socket_ifname_that_selects_ipoib_interfaces_by_any_name():
    """#23: the templates' commented hint was the exact name ib0, which IPoIB interfaces named after their PCI slot
    (ibp65s0, ibs1) do not have; as a prefix, `ib` selects them all."""
    hints = {}
    for script in [*ROOT.glob("*/*.sbatch"), *ROOT.glob("slurm_templates/tools/*.sbatch")]:
        for spec in re.findall(r"^# export NCCL_SOCKET_IFNAME=(\S+)", script.read_text(), re.M):
            hints[script.relative_to(ROOT).as_posix()] = spec
    assert len(hints) >= 10, hints
    for script, spec in hints.items():
        assert doctor.nccl_selects(spec, ["eth0", "ib0", "ibp65s0", "ibs1", "lo"]) == ["ib0", "ibp65s0", "ibs1"], script


@pytest.mark.parametrize("env, problem", [
    ({"NCCL_SOCKET_IFNAME": "ib0"}, "NCCL_SOCKET_IFNAME=ib0 selects none of the interfaces of n1 (docker0, eth0, "
                                    "ibp65s0, ibs1, lo): NCCL reads each name as a prefix"),
    ({"GLOO_SOCKET_IFNAME": "eth0,ib"}, "GLOO_SOCKET_IFNAME=eth0,ib: no interface ib on n1 (docker0, eth0, "
                                        "ibp65s0, ibs1, lo); gloo takes exact names"),
    ({"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "ibs1,eth0"}, None),
], ids=["nccl-ib0", "gloo-prefix", "both-fine"])
def test_doctor_fails_a_socket_ifname_that_names_no_interface_here(monkeypatch, env, problem):
    monkeypatch.setattr(doctor.socket, "if_nameindex", lambda: list(enumerate(reversed(NICS), 1)))
    problems = doctor.interface_problems("n1", env)
    assert problems == ([] if problem is None else [problems[0]]) and (problem is None or problem in problems[0])


def fake_sys(monkeypatch, tmp_path, files):
    """A /sys of the files given (path -> content) for the doctor to read."""
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text + "\n")
    monkeypatch.setattr(doctor, "SYS", str(tmp_path))


def test_doctor_warns_of_a_memlock_limit_only_where_infiniband_is(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor.resource, "getrlimit", lambda what: (65536, 65536))
    fake_sys(monkeypatch, tmp_path, {"class/net/eth0/mtu": "1500"})
    assert doctor.memlock_warning() == ""  # no InfiniBand: the limit does not matter
    fake_sys(monkeypatch, tmp_path, {"class/infiniband/mlx5_0/node_type": "1: CA"})
    warning = doctor.memlock_warning()
    assert warning.startswith("locked-memory limit 64 KiB (ulimit -l) with InfiniBand here (mlx5_0)"), warning
    assert "ibv_reg_mr failed" in warning and "ulimit -l unlimited" in warning and "MEMLOCK" in warning
    unlimited = doctor.resource.RLIM_INFINITY
    monkeypatch.setattr(doctor.resource, "getrlimit", lambda what: (unlimited, unlimited))
    assert doctor.memlock_warning() == ""


def test_doctor_warns_of_a_rank_far_from_its_gpu(monkeypatch, tmp_path):
    """The GPU on NUMA node 1 (cores 32-63): a rank on cores 0-1 has no core near it."""
    fake_sys(monkeypatch, tmp_path, {"bus/pci/devices/0000:dc:00.0/numa_node": "1",
                                     "bus/pci/devices/0000:1b:00.0/numa_node": "-1",
                                     "devices/system/node/node1/cpulist": "32-63"})
    warning = doctor.numa_warning("0000:dc:00.0", {0, 1})
    assert warning.startswith("GPU 0000:dc:00.0 is on NUMA node 1 (cores 32-63) but this rank runs on cores "
                              "0-1"), warning
    assert "torchrun --numa-binding=node" in warning
    assert doctor.numa_warning("0000:dc:00.0", {1, 33}) == ""  # one core near is enough
    assert doctor.numa_warning("0000:1b:00.0", {0}) == ""  # -1: the firmware does not say
    assert doctor.numa_warning(None, {0}) == ""  # a torch that gives no PCI address
    assert doctor.parse_cpu_list("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}


def test_doctor_fails_nccl_on_sockets_between_nodes_where_a_fast_fabric_is(monkeypatch, tmp_path):
    """#23: NCCL falls back to TCP sockets without a word when InfiniBand/EFA/Slingshot does not come up. The doctor
    reads the network from NCCL's INFO lines (as NCCL 2.2x prints them) and fails sockets between nodes on a node
    that has a fast fabric; without one it warns; on one node, or on a fast network, it says nothing."""
    socket_log = ("n1:4711:4711 [0] NCCL INFO NET/IB : No device found.\n"
                  "n1:4711:4711 [0] NCCL INFO NET/Socket : Using [0]eth0:10.1.0.1<0>\n"
                  "n1:4711:4711 [0] NCCL INFO Using network Socket\n")
    assert doctor.nccl_network(socket_log) == "Socket"
    assert doctor.nccl_network("n1:1:1 [0] NCCL INFO Using network AWS Libfabric\n") == "AWS Libfabric"
    assert doctor.nccl_network("n1:1:1 [0] NCCL INFO cudaDriverVersion 13000\n") is None
    fake_sys(monkeypatch, tmp_path, {"class/net/eth0/mtu": "1500"})
    assert doctor.fabric_devices() == []
    level, why = doctor.transport_problem("Socket", 2, doctor.fabric_devices())
    assert level == "WARN" and "Ethernet-only" in why, why
    fake_sys(monkeypatch, tmp_path, {"class/infiniband/mlx5_0/node_type": "1: CA", "class/cxi/cxi0/device": "x"})
    assert doctor.fabric_devices() == ["mlx5_0", "cxi0"]
    level, why = doctor.transport_problem("Socket", 2, doctor.fabric_devices())
    assert level == "FAIL" and "mlx5_0, cxi0" in why and "fabric block" in why and "NCCL_NET" in why, why
    assert doctor.transport_problem("IB", 2, ["mlx5_0"]) == ("", "")
    assert doctor.transport_problem("Socket", 1, ["mlx5_0"]) == ("", "")  # one node: NVLink/shared memory
    assert doctor.transport_problem(None, 2, ["mlx5_0"]) == ("", "")  # no INFO lines (NCCL_DEBUG set by you)


class NoWatchdog:
    def __init__(self, *args):
        self.daemon = False

    def start(self):
        pass

    def cancel(self):
        pass


def test_doctor_prints_warn_and_fail_lines_in_its_format(monkeypatch, tmp_path, capsys):
    """The new checks through main(), one process: WARN lines leave the exit code alone, a FAIL line exits 3."""
    clean_launch_env(monkeypatch)
    monkeypatch.setattr("sys.argv", ["doctor.py", "--backend", "gloo"])
    monkeypatch.setattr(doctor.threading, "Timer", NoWatchdog)  # a FAIL here leaves main() before it is cancelled
    monkeypatch.setattr(doctor.resource, "getrlimit", lambda what: (65536, 65536))
    fake_sys(monkeypatch, tmp_path, {"class/infiniband/mlx5_0/node_type": "1: CA"})
    monkeypatch.setattr(doctor.socket, "gethostname", lambda: "n1")
    doctor.main()
    out = capsys.readouterr().out
    assert "[doctor] WARN: rank 0 on n1: locked-memory limit 64 KiB" in out, out
    assert "[doctor] OK: 1 ranks on 1 host(s)" in out, out

    def exit_now(code):
        raise SystemExit(code)
    monkeypatch.setattr(doctor.os, "_exit", exit_now)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "no-such-nic")
    with pytest.raises(SystemExit) as ended:
        doctor.main()
    assert ended.value.code == doctor.EXIT_FAIL
    assert "[doctor] FAIL: rank 0 on n1: NCCL_SOCKET_IFNAME=no-such-nic selects none" in capsys.readouterr().out


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


# stacks.py: a "rank" that waits in a function named after it (line 5), and says when it is there; with
# fork="os.fork()" a child does the same (a DataLoader worker: another process with the rank's environment).
STUCK = """import os, time
{fork}
def {name}():
    os.write(1, f"ready {{os.getpid()}}\\n".encode())  # one write: parent and child share the pipe
    time.sleep(300)
{name}()
"""
PY_SPY = ROOT / ".venvs" / "slurm_templates" / "bin" / "py-spy"


def fake_slurm(monkeypatch, tmp_path, scontrol: str):
    """scontrol answers `scontrol`; srun runs its command here, once (the node part on this one "node")."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in {"scontrol": scontrol, "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"'}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


def test_stacks_writes_one_file_per_rank_and_says_where_each_rank_is(monkeypatch, tmp_path, capsys):
    """#23: the stacks of a running job's ranks on demand: each process with SLURM_JOB_ID=<job> gets a file named
    after its rank (RANK, else SLURM_PROCID; host and pid without either) holding py-spy's dump, and one line says
    which function its main thread is in. Where py-spy may not attach, one line says what to do."""
    if not PY_SPY.exists():
        unavailable(f"{PY_SPY} missing: run tools/envs.sh slurm_templates")
    clean_launch_env(monkeypatch)
    job = str(900000000 + os.getpid())  # no real job has it
    fake_slurm(monkeypatch, tmp_path, f"echo JobId={job} JobName=t JobState=RUNNING NumNodes=1 WorkDir={tmp_path}")
    ranks = [({"RANK": "0"}, "wait_for_peers"), ({"SLURM_PROCID": "1"}, "save_snapshot"), ({}, "no_rank_here")]
    procs = []
    try:
        for env, name in ranks:
            fork = "os.fork()" if env == {"RANK": "0"} else ""
            (tmp_path / f"{name}.py").write_text(STUCK.format(name=name, fork=fork))
            procs.append(subprocess.Popen([sys.executable, tmp_path / f"{name}.py"], stdout=subprocess.PIPE,
                                          text=True, env={**os.environ, "SLURM_JOB_ID": job, **env},
                                          start_new_session=True))
        ready = [p.stdout.readline() for p in procs] + [procs[0].stdout.readline()]  # rank 0's child too
        assert all(line.startswith("ready ") for line in ready), ready
        child = ({int(line.split()[1]) for line in (ready[0], ready[3])} - {procs[0].pid}).pop()
        code = stacks.main([job, "--py-spy", str(PY_SPY)])
        out = capsys.readouterr().out
        (tmp_path / "py-spy").write_text("#!/bin/sh\necho 'Permission Denied: Try running again with elevated "
                                         "permissions by going sudo' >&2\nexit 1\n")  # py-spy 0.4.3's words
        (tmp_path / "py-spy").chmod(0o755)
        # ... named as an array task this time: its processes carry the task's own id (scontrol's JobId).
        refused = stacks.main([f"{job}_7", "--py-spy", str(tmp_path / "py-spy"), "--out", str(tmp_path / "refused")])
        refused_out = capsys.readouterr().out
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)  # rank 0's child too
            p.wait()
    assert code == 0, out
    dumps = tmp_path / "stacks" / job
    host = stacks.socket.gethostname()
    files = {"rank0.txt": "wait_for_peers", f"rank0-{host}-pid{child}.txt": "wait_for_peers",
             "rank1.txt": "save_snapshot", f"{host}-pid{procs[2].pid}.txt": "no_rank_here"}
    assert sorted(f.name for f in dumps.iterdir()) == sorted(files)
    for file, name in files.items():
        assert f"{name} ({name}.py:5)" in (dumps / file).read_text()
    assert out.splitlines() == [
        f"rank 0 ({host} pid {procs[0].pid}): in wait_for_peers (wait_for_peers.py:5)",
        f"rank 0 ({host} pid {child}, child of pid {procs[0].pid}): in wait_for_peers (wait_for_peers.py:5)",
        f"rank 1 ({host} pid {procs[1].pid}): in save_snapshot (save_snapshot.py:5)",
        f"no rank ({host} pid {procs[2].pid}): in no_rank_here (no_rank_here.py:5)",
        f"stacks of job {job}: {dumps}"], out
    assert refused == 1
    assert f"rank 0 ({host} pid {procs[0].pid}): py-spy failed: Permission Denied: Try running" in refused_out
    hint = [line for line in refused_out.splitlines() if "ptrace" in line]
    assert len(hint) == 1 and "ptrace_scope" in hint[0] and "CAP_SYS_PTRACE" in hint[0], refused_out


def test_stacks_lists_a_ranks_own_process_before_its_children_whatever_the_pids():
    """The summary's order does not depend on pid numbers: a rank's process first, then its DataLoader workers
    (pids wrap; the launcher that started the rank may have a larger pid than the rank's worker -- seen in CI)."""
    def rec(pid, ppid, rank):
        return {"host": "n1", "pid": pid, "ppid": ppid, "rank": rank, "ok": True,
                "where": "f (x.py:1)", "text": "", "argv": []}
    lines, ok = stacks.summary([rec(600, 500, 0), rec(500, 9000, 0), rec(700, 9000, 1)])
    assert ok and lines == ["rank 0 (n1 pid 500): in f (x.py:1)",
                            "rank 0 (n1 pid 600, child of pid 500): in f (x.py:1)",
                            "rank 1 (n1 pid 700): in f (x.py:1)"], lines


@pytest.mark.parametrize("args, scontrol, said", [
    (["12x"], "exit 99", "'12x' is not a job id"),
    (["123"], "echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1",
     "no job 123: scontrol says: slurm_load_jobs error: Invalid job id specified"),
    (["123"], "echo JobId=123 JobState=PENDING NumNodes=2", "job 123 is PENDING, not running"),
    ([], "exit 99", "the following arguments are required: job"),
], ids=["not-a-job-id", "no-such-job", "pending", "no-job"])
def test_stacks_bad_input_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys, args, scontrol, said):
    fake_slurm(monkeypatch, tmp_path, scontrol)
    assert stacks.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"error: {said}") and captured.err.count("\n") == 1, \
        captured.err


def fr_entry(seq: int, name: str, state: str, sizes=((4,),)) -> dict:
    """One collective as torch 2.13's Flight Recorder dumps it (the keys of a real gloo dump; NCCL's are the same)."""
    return {"record_id": seq - 1, "pg_id": 0, "process_group": ("0", "default_pg"), "thread_name": "python",
            "thread_id": "1", "collective_seq_id": seq, "p2p_seq_id": 0, "op_id": seq, "profiling_name": name,
            "time_created_ns": seq, "input_sizes": [list(s) for s in sizes], "input_dtypes": ["Float"],
            "output_sizes": [list(s) for s in sizes], "output_dtypes": ["Float"], "state": state,
            "time_discovered_started_ns": None, "time_discovered_completed_ns": None, "retired": state == "completed",
            "timeout_ms": 600000, "is_p2p": False, "duration_ms": None,
            "frames": [{"name": name.split(":")[1], "filename": "/venv/lib/python3.11/site-packages/torch/distributed/"
                        "distributed_c10d.py", "line": 3245},  # innermost first; then a deprecation wrapper (seen)
                       {"name": "wrapper", "filename": "/venv/lib/python3.11/site-packages/typing_extensions.py",
                        "line": 3140}, {"name": "train_step", "filename": "/job/recipe.py", "line": 88}]}


NCCL_PG_CONFIG = {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1]"}}  # a row per group, by its name
# gloo's in torch 2.13: one row, key and name empty, the default group's ranks ('[]' once in a second group)
GLOO_PG_CONFIG = {"": {"name": "", "desc": "", "ranks": "[0, 1]"}}


def write_fr_dumps(folder, entries_by_rank: dict, ranks: str = "[0, 1]", pg_config=None):
    folder.mkdir(parents=True, exist_ok=True)
    for rank, entries in entries_by_rank.items():
        dump = {"version": "2.10", "comm_lib_version": "2.27.5", "entries": entries,
                "pg_config": pg_config or {"0": {"name": "0", "desc": "default_pg", "ranks": ranks}},
                "pg_status": {"0": {"last_enqueued_collective": entries[-1]["collective_seq_id"]}}}
        (folder / f"nccl_trace_rank_{rank}").write_bytes(pickle.dumps(dump))


def test_fr_report_names_the_rank_that_is_behind_and_the_collective_the_others_wait_in(tmp_path, capsys):
    """#23: rank 1 completed collective #2 and never entered #3, where rank 0 waits: the report says so in one
    line, by sequence id, with the code that issued each; torch's own analyser runs after it."""
    done = [fr_entry(1, "nccl:broadcast", "completed"), fr_entry(2, "nccl:all_reduce", "completed")]
    write_fr_dumps(tmp_path / "debug", {0: [*done, fr_entry(3, "nccl:_allgather_base", "started")], 1: done})
    fake = tmp_path / "torchfrtrace"
    fake.write_text('#!/bin/sh\necho "torchfrtrace got $*"\n')
    fake.chmod(0o755)
    assert fr_report.main([str(tmp_path / "debug"), "--torchfrtrace", str(fake)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == ("rank 1 is behind in process group 0 (default_pg): its last collective is #2 nccl:all_reduce "
                      "(completed) from train_step (recipe.py:88), 1 behind ranks 0, which wait in #3 "
                      "nccl:_allgather_base (started) from train_step (recipe.py:88)"), out
    assert out[-1] == f"torchfrtrace got {tmp_path / 'debug'} --prefix nccl_trace_rank_", out
    # The other shapes of a hang: different collectives at one id; every rank inside one; a rank with no dump.
    lines = fr_report.report({0: {"entries": [*done, fr_entry(3, "nccl:all_reduce", "started")], "pg_config": {},
                                  "version": "2.10"},
                              1: {"entries": [*done, fr_entry(3, "nccl:broadcast", "started")], "pg_config": {},
                                  "version": "2.10"}}, tmp_path)
    assert lines[1].startswith("ranks disagree in process group 0 (default_pg) at #3 (a desync"), lines
    write_fr_dumps(tmp_path / "all", {0: done[:1], 1: [*done[:1], fr_entry(2, "nccl:all_reduce", "started")]},
                   ranks="[0, 1, 2]")
    lines = fr_report.report(fr_report.load(tmp_path / "all", "nccl_trace_rank_"), tmp_path / "all")
    assert lines[1].startswith("no dump from rank 2: "), lines
    assert lines[2].startswith("rank 0 is behind"), lines


@pytest.mark.parametrize("pg_config", [GLOO_PG_CONFIG, NCCL_PG_CONFIG], ids=["gloo", "nccl"])
def test_fr_report_names_the_rank_without_a_dump_as_the_one_the_others_wait_for(tmp_path, capsys, pg_config):
    """The dump of one rank of a 2-rank job (toolkit.HANG's case: the live rank dumps, the stopped one cannot):
    the job's ranks come from the process group's ranks in the dump, rank 1 is named as the one without a dump
    and rank 0 as waiting for it in #3 -- before, the report said "every rank entered #3 ... the collective itself
    hangs". torchfrtrace, which stops on a missing rank, is told to go on."""
    entries = [fr_entry(1, "gloo:broadcast", "scheduled"), fr_entry(2, "gloo:all_reduce", "scheduled"),
               fr_entry(3, "gloo:all_reduce", "scheduled")]  # gloo leaves every entry 'scheduled' (torch 2.13)
    write_fr_dumps(tmp_path / "debug", {0: entries}, pg_config=pg_config)
    fake = tmp_path / "torchfrtrace"
    fake.write_text('#!/bin/sh\necho "torchfrtrace got $*"\n')
    fake.chmod(0o755)
    assert fr_report.main([str(tmp_path / "debug"), "--torchfrtrace", str(fake)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"1 rank dumps in {tmp_path / 'debug'} (ranks 0 of the job's 0-1, "), out
    assert out[1].startswith("no dump from rank 1: the likely culprit"), out
    assert out[2] == ("rank 1 left no dump; in process group 0 (default_pg) rank 0 waits for it in #3 "
                      "gloo:all_reduce (scheduled) from train_step (recipe.py:88)"), out
    assert not [line for line in out if "every rank" in line], out
    assert out[-1] == f"torchfrtrace got {tmp_path / 'debug'} --prefix nccl_trace_rank_ --allow-incomplete-ranks"


def test_fr_report_says_when_the_dumps_do_not_name_the_jobs_ranks(tmp_path, capsys):
    """gloo's dumps name no rank once the rank is in a second process group ('[]'): the report does not claim
    that every rank entered the collective, and --world-size names the ranks without a dump."""
    entries = [fr_entry(1, "gloo:all_reduce", "scheduled"), fr_entry(2, "gloo:all_reduce", "scheduled")]
    write_fr_dumps(tmp_path, {0: entries}, pg_config={"": {"name": "", "desc": "", "ranks": "[]"}})
    dumps = fr_report.load(tmp_path, "nccl_trace_rank_")
    lines = fr_report.report(dumps, tmp_path)
    assert "the job's ranks are unknown" in lines[0] and "--world-size" in lines[0], lines
    assert lines[1].startswith("the ranks that left a dump (0) wait in #2 gloo:all_reduce "), lines
    assert not [line for line in lines if "every rank" in line], lines
    assert fr_report.main([str(tmp_path), "--world-size", "2", "--torchfrtrace", "off"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"1 rank dumps in {tmp_path} (ranks 0 of the job's 0-1, by --world-size"), lines
    assert lines[1].startswith("no dump from rank 1: "), lines
    assert lines[2].startswith("rank 1 left no dump; in process group 0 (default_pg) rank 0 waits for it in #2"), lines
    # Without --world-size: the stack file toolkit.HANG wrote beside the dump says how many ranks the job has.
    (tmp_path / "rank0.stack.txt").write_text("rank 0 of 2, pid 10 on n1, step 3, 2026-12-07 15:57:59: Timed out\n")
    assert fr_report.main([str(tmp_path), "--torchfrtrace", "off"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"1 rank dumps in {tmp_path} (ranks 0 of the job's 0-1, by the stack files"), lines
    assert lines[1].startswith("no dump from rank 1: "), lines


def write_stack_files(folder):
    """rank0.stack.txt and rank1.stalled.txt as toolkit.HANG writes them (C13): a header line, then the traceback
    of the wait that timed out, or faulthandler's dump of every thread (the newest first, the main thread last).
    The innermost frames are a library's (torch's all_reduce, threading's wait), the job's own code below them."""
    folder.mkdir(parents=True, exist_ok=True)
    library = {}
    exec(compile("def all_reduce():\n    raise RuntimeError('[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_"
                 "buffer.cc:78] Timed out waiting 5000ms for recv operation to complete')\n",
                 "/venv/lib/python3.11/site-packages/torch/distributed/distributed_c10d.py", "exec"), library)
    exec(compile("def wait(dump, file):\n    dump(file=file, all_threads=True)\n",
                 "/usr/lib/python3.11/threading.py", "exec"), library)

    def train_step():
        library["all_reduce"]()

    try:
        train_step()
    except RuntimeError as e:
        error = e
    with open(folder / "rank0.stack.txt", "w") as f:
        f.write(f"rank 0 of 2, pid 10 on n1, step 3, 2026-12-07 15:57:59: {error}\n\nwhere it waited:\n"
                f"{''.join(traceback.format_exception(error))}\nevery thread now:\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)

    def stuck_loading_data():  # rank 1's; rank 0's watcher fires too while it waits in the collective
        for rank in (1, 0):
            with open(folder / f"rank{rank}.stalled.txt", "w") as f:
                f.write(f"rank {rank} of 2, pid 11 on n2, 2026-12-07 15:58:00: no step since step 3 for 301 s "
                        "(--timeout 300): stuck here, or in a phase longer than --timeout (a validation, a save)"
                        "\n\nevery thread:\n")
                f.flush()
                library["wait"](faulthandler.dump_traceback, f)

    stop = threading.Event()
    watcher = threading.Thread(target=stop.wait, name="hang-watcher")  # another thread: listed before the main one
    watcher.start()
    try:
        stuck_loading_data()
    finally:
        stop.set()
        watcher.join()


def test_fr_report_says_where_each_rank_that_left_a_stack_is(tmp_path, capsys):
    """C13's stack files are part of the report: rank N timed out in a collective (rank<N>.stack.txt: where it
    waited, the job's own frame under torch's) or stalled (rank<N>.stalled.txt: its main thread's top frame and the
    job's own frame under it); a folder with stacks and no Flight Recorder dump is still a report (before: exit 2)."""
    write_stack_files(tmp_path)
    write_fr_dumps(tmp_path, {0: [fr_entry(1, "gloo:all_reduce", "scheduled")]}, pg_config=GLOO_PG_CONFIG)
    assert fr_report.main([str(tmp_path), "--torchfrtrace", "off"]) == 0
    out = capsys.readouterr().out.splitlines()
    this = os.path.basename(__file__)
    assert re.fullmatch(rf"rank 0 timed out at step 3 in all_reduce \(distributed_c10d.py:2\), from train_step "
                        rf"\({this}:\d+\): Timed out waiting 5000ms for recv operation to complete \(rank0.stack.txt\)",
                        out[-3]), out
    stalled = rf"stalled, no step since step 3 for 301 s: in wait \(threading.py:2\), from stuck_loading_data " \
              rf"\({this}:\d+\)"
    assert re.fullmatch(rf"rank 0 {stalled} \(rank0.stalled.txt\) -- the same wait: it timed out in a collective at "
                        rf"that step", out[-2]), out
    assert re.fullmatch(rf"rank 1 {stalled} \(rank1.stalled.txt\)", out[-1]), out
    assert out[1].startswith("no dump from rank 1: "), out
    (tmp_path / "nccl_trace_rank_0").unlink()
    assert fr_report.main([str(tmp_path), "--torchfrtrace", "off"]) == 0
    alone = capsys.readouterr().out.splitlines()
    assert alone[0].startswith(f"no Flight Recorder dumps (nccl_trace_rank_<rank>) in {tmp_path}: "), alone
    assert alone[1:] == out[-3:], alone


def test_fr_report_without_dumps_is_one_line_and_exit_2(tmp_path, capsys):
    assert fr_report.main([str(tmp_path), "--torchfrtrace", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no Flight Recorder dumps (nccl_trace_rank_<rank>) in {tmp_path}: ") and \
        err.count("\n") == 1, err


@pytest.mark.slurm
def test_stacks_of_a_running_two_node_job(slurm_cluster, slurm_python, tmp_path):
    """stacks.py against a real job of 2 nodes (srun_per_gpu.sbatch, one rank per node) that waits in a known
    function: one file per rank with that function, and one line per rank naming it and its node."""
    (tmp_path / "stuck.py").write_text(STUCK.format(name="wait_for_peers", fork=""))
    log = tmp_path / "job.out"
    shape = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1", "--time=00:05:00"]
    job_id = slurm_cluster.submit(ROOT / "slurm_templates" / "srun_per_gpu.sbatch", tmp_path / "stuck.py",
                                  sbatch_args=shape, cwd=tmp_path, output=log, env={"PYTHON": slurm_python})
    dumped = {}

    def on_poll(info, text):
        if not dumped and len(re.findall(r"^\d: ready \d+$", text, re.M)) == 2:  # both ranks inside
            dumped["run"] = slurm_cluster.client(slurm_python, TOOLS / "stacks.py", job_id, "--out",
                                                 tmp_path / "stacks", timeout=150, check=False)
            slurm_cluster.client("scancel", job_id, check=False)

    job = slurm_cluster.wait(job_id, log, timeout=180, on_poll=on_poll)
    assert dumped, f"the ranks never reached wait_for_peers\n{job.describe()}"
    out = dumped["run"].stdout
    assert dumped["run"].returncode == 0, out
    for rank, host in ((0, "n1"), (1, "n2")):
        assert "wait_for_peers (" in (tmp_path / "stacks" / f"rank{rank}.txt").read_text(), out
        assert re.search(rf"^rank {rank} \({host} pid \d+\): in wait_for_peers \(stuck.py:5\)$", out, re.M), out
