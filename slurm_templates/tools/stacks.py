"""Where is every rank of a running job? The Python stack of each, one file per rank, and one line per rank.

usage: python stacks.py JOBID [--out DIR] [--py-spy PATH] [--include-agents]

One task per node of the job (`srun --overlap --jobid JOBID`, beside the job's own steps) finds the job's Python
processes on its node (SLURM_JOB_ID=JOBID in /proc/PID/environ) and runs `py-spy dump --pid PID` on each. The
stacks land in DIR (default: the job's working directory, stacks/JOBID/) as rank<N>.txt, N from the process's
RANK or SLURM_PROCID (<host>-pid<PID>.txt when it has neither); then one line per rank says where its main
thread is:

    rank 1 (n2 pid 4242): in wait_for_peers (toolkit.py:455)

The rank that is somewhere else than the others is usually the one to look at. torchrun's agents are left out
(they only wait for their workers) unless --include-agents.

py-spy attaches with ptrace: it must run as the job's user, and where kernel.yama.ptrace_scope is 1 (Ubuntu's
default) a process may trace only its own descendants, which the job's ranks are not -- py-spy then gets
"Permission denied". The fixes: ptrace_scope 0 (`sysctl kernel.yama.ptrace_scope=0`, an admin's call), py-spy
given CAP_SYS_PTRACE (`setcap cap_sys_ptrace+ep $(which py-spy)`), or stacks the job prints itself:
`faulthandler.register(signal.SIGUSR2, all_threads=True)` in the script, then `scancel --signal=USR2 JOBID`
(every rank writes its stack to the job's log; not USR1, the templates' preemption signal).

Standard library only. Exit 0: every process found was dumped; 1: none found, or py-spy failed on some;
2: bad input (no such job, a job that is not running), one line.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

SRUN_TIMEOUT = 120  # seconds for the whole dump; a node that does not answer must not hang the tool
PTRACE_HINT = ("py-spy was refused (ptrace): run it as the job's user, and where kernel.yama.ptrace_scope is 1 a "
               "process may trace only its descendants -- ask for ptrace_scope 0 or py-spy with CAP_SYS_PTRACE, or "
               "have the script call faulthandler.register(signal.SIGUSR2, all_threads=True) and send "
               "`scancel --signal=USR2 JOBID` (stacks in the job log)")


PERMISSION = r"permission denied|operation not permitted"  # py-spy's words when ptrace is refused


class BadInput(Exception):
    """Something the user gave that cannot work: one line, exit 2."""


def read_environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = f.read().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in items if b"=" in item)


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"^PPid:\s*(\d+)", f.read(), re.M).group(1))


def command_line(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]


def is_agent(argv: list[str]) -> bool:
    """torchrun's agent (`torchrun ...` or `python -m torch.distributed.run ...`): it only waits for its workers."""
    return "torch.distributed.run" in argv or any(os.path.basename(a) == "torchrun" for a in argv[:2])


def own_lineage() -> set[int]:
    """This process and its ancestors (the step that runs it carries the job's SLURM_JOB_ID too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = parent_of(pid)
        except OSError:
            break
    return pids


def job_processes(job_id: str, include_agents: bool = False) -> list[dict]:
    """The job's Python processes on this node: pid, parent, rank (None when unknown), host, command line.

    On a node of the job, SLURMD_NODENAME keeps out the processes of other nodes where nodes share one process
    table (the local test cluster: one machine, one /proc)."""
    here = os.environ.get("SLURMD_NODENAME")
    skip = own_lineage()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        pid = int(entry)
        try:
            env = read_environ(pid)
            if env.get("SLURM_JOB_ID") != job_id or (here and env.get("SLURMD_NODENAME", here) != here):
                continue
            if not os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("python"):
                continue
            argv, ppid = command_line(pid), parent_of(pid)
        except (OSError, AttributeError):  # gone meanwhile, or another user's process
            continue
        if is_agent(argv) and not include_agents:
            continue
        rank = env.get("RANK", env.get("SLURM_PROCID"))
        found.append({"pid": pid, "ppid": ppid, "rank": int(rank) if rank and rank.isdigit() else None,
                      "host": env.get("SLURMD_NODENAME") or socket.gethostname(), "argv": argv})
    return sorted(found, key=lambda p: p["pid"])


def default_py_spy() -> str:
    """py-spy beside this interpreter (a virtualenv that is not activated), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else (shutil.which("py-spy") or "py-spy")


def dump(pid: int, py_spy: str) -> tuple[bool, str]:
    """(True, py-spy's dump) or (False, why not)."""
    try:
        proc = subprocess.run([py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        return False, f"no py-spy at {py_spy} (pip install py-spy, or --py-spy PATH)"
    except subprocess.TimeoutExpired:
        return False, "py-spy did not answer in 60 s"
    if proc.returncode != 0:  # its last line may be advice ("Try running again with elevated permissions")
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"py-spy exit {proc.returncode}"]
        return False, next((line for line in lines if re.search(PERMISSION, line, re.I)), lines[-1])
    return True, proc.stdout


def node_records(job_id: str, py_spy: str, include_agents: bool = False) -> list[dict]:
    """What one node contributes: every Python process of the job here, with its dump."""
    records = []
    for process in job_processes(job_id, include_agents):
        ok, text = dump(process["pid"], py_spy)
        records.append({**process, "ok": ok, "text": text})
    return records


def where(text: str, pid: int) -> str:
    """The innermost frame of the main thread in a py-spy dump: `wait_for_peers (toolkit.py:455)`. The main
    thread is the one py-spy names MainThread, or whose id is the process's (py-spy does not always know names)."""
    threads = re.findall(r'^Thread (\S+) [^\n]*?(?:"([^"\n]*)")?\n((?:[ \t]+\S[^\n]*\n?)*)', text, re.M)
    main = [body for tid, name, body in threads if name == "MainThread" or tid in (str(pid), hex(pid))]
    frames = (main or [body for *_, body in threads] or [""])[0].strip().splitlines()
    if not frames:
        return "no Python frame"
    found = re.match(r"(.*) \((.*):(\d+)\)$", frames[0].strip())
    return f"{found.group(1)} ({os.path.basename(found.group(2))}:{found.group(3)})" if found else frames[0].strip()


def create(out: Path, names: list[str], text: str) -> str:
    """Write `text` under the first of `names` that no one has taken (nodes write into one folder at once)."""
    for name in names:
        try:
            with open(out / name, "x") as f:
                f.write(text)
            return name
        except FileExistsError:
            continue
    raise FileExistsError(out / names[-1])


def write_node(records: list[dict], out: Path) -> list[dict]:
    """Write this node's dumps into `out`, one file per process: rank<N>.txt for a rank's own process, with
    -<host>-pid<PID> for its children (DataLoader workers inherit RANK) and for a second process claiming the
    rank; <host>-pid<PID>.txt without a rank. Returns the records without the stacks, with file and frame."""
    out.mkdir(parents=True, exist_ok=True)
    pids = {r["pid"] for r in records}
    written = []
    for r in sorted(records, key=lambda r: (r["ppid"] in pids, r["pid"])):  # a rank's own process first
        who = f"rank {r['rank']}" if r["rank"] is not None else "no rank"
        text = f"# {who} ({r['host']} pid {r['pid']}): {' '.join(r['argv'])}\n"
        text += r["text"] if r["ok"] else f"py-spy failed: {r['text']}\n"
        mine = f"{r['host']}-pid{r['pid']}.txt"
        names = [mine] if r["rank"] is None else [f"rank{r['rank']}.txt", f"rank{r['rank']}-{mine}"]
        if r["ppid"] in pids and r["rank"] is not None:
            names = names[1:]
        short = {k: v for k, v in r.items() if k != "text"}
        frame, error = (where(r["text"], r["pid"]), "") if r["ok"] else ("", r["text"])
        written.append({**short, "file": create(out, names, text), "where": frame, "error": error})
    return written


def summary(records: list[dict], hosts_without: list[str] = ()) -> tuple[list[str], bool]:
    """One line per process, by rank: where its main thread is, or why py-spy could not say."""
    lines, ok, refused = [], bool(records), False
    pids = {(r["host"], r["pid"]) for r in records}

    def order(r):  # by rank; a rank's own process before its children (never by pid numbers: pids wrap)
        return r["rank"] is None, r["rank"] or 0, (r["host"], r["ppid"]) in pids, r["pid"]

    for r in sorted(records, key=order):
        child = f", child of pid {r['ppid']}" if (r["host"], r["ppid"]) in pids else ""  # a DataLoader worker
        who = (f"rank {r['rank']}" if r["rank"] is not None else "no rank") + f" ({r['host']} pid {r['pid']}{child})"
        if r["ok"]:
            lines.append(f"{who}: in {r['where']}")
        else:
            ok = False
            refused |= bool(re.search(PERMISSION, r["error"], re.I))
            lines.append(f"{who}: py-spy failed: {r['error']}")
    lines += [f"{host}: no Python process of the job" for host in hosts_without]
    if refused:
        lines.append(PTRACE_HINT)
    return lines, ok


def scontrol_job(job_id: str) -> dict:
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise BadInput("scontrol not found: run this where Slurm's commands are (a login node)") from e
    if proc.returncode != 0:
        said = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise BadInput(f"no job {job_id}: scontrol says: {said[-1]}")
    return dict(re.findall(r"(\S+?)=(\S*)", proc.stdout.splitlines()[0] if proc.stdout else ""))


def collect(job_id: str, out: Path | None, py_spy: str | None, include_agents: bool) -> tuple[list[str], bool, Path]:
    """Run the node part on every node of the running job through srun; return (summary, all ok, out dir)."""
    info = scontrol_job(job_id)
    state = info.get("JobState", "?")
    if state != "RUNNING":
        raise BadInput(f"job {job_id} is {state}, not running: there is no stack to dump")
    nodes = int(re.match(r"\d+", info.get("NumNodes", "1")).group())
    out = (out or Path(info.get("WorkDir") or ".") / "stacks" / job_id).resolve()  # the nodes write into it
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("rank*.txt"), *out.glob("*-pid*.txt")]:  # a previous dump of this job
        old.unlink()
    raw = info.get("JobId", job_id)  # an array task's own id (its SLURM_JOB_ID), not ARRAYJOB_TASK
    helper = [sys.executable, str(Path(__file__).resolve()), raw, "--node", "--out", str(out)]
    helper += ["--py-spy", py_spy] if py_spy else []
    helper += ["--include-agents"] if include_agents else []
    srun = ["srun", "--overlap", f"--jobid={raw}", f"--nodes={nodes}", f"--ntasks={nodes}",
            "--ntasks-per-node=1", *helper]
    try:
        proc = subprocess.run(srun, capture_output=True, text=True, timeout=SRUN_TIMEOUT)
    except FileNotFoundError as e:
        raise BadInput("srun not found: run this where Slurm's commands are (a login node)") from e
    except subprocess.TimeoutExpired:
        return [f"srun --overlap --jobid={job_id} did not end in {SRUN_TIMEOUT} s: a node does not answer"], False, out
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not records:
        said = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        return [f"srun exit {proc.returncode}: {said[-1] if said else 'no output'}"], False, out
    lines, ok = summary([r for r in records if "pid" in r], [r["host"] for r in records if r.get("none")])
    return lines, ok and proc.returncode == 0, out


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def parse_args(argv):
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="the running job's id")
    parser.add_argument("--out", type=Path, help="where the files go (default: <job's WorkDir>/stacks/JOBID/)")
    parser.add_argument("--py-spy", help="the py-spy executable (default: beside this python, else on PATH)")
    parser.add_argument("--include-agents", action="store_true", help="dump torchrun's agents too")
    parser.add_argument("--node", action="store_true", help=argparse.SUPPRESS)  # the per-node part, run by srun
    args = parser.parse_args(argv)
    if not re.fullmatch(r"\d+(_\d+)?", args.job):
        raise BadInput(f"{args.job!r} is not a job id (a number, or ARRAYJOB_TASK)")
    if args.node and args.out is None:
        raise BadInput("--node needs --out")
    return args


def run_node(args) -> int:
    """On one node: dump the job's processes here into args.out, one JSON line per process on stdout."""
    records = node_records(args.job, args.py_spy or default_py_spy(), args.include_agents)
    for record in write_node(records, args.out):
        print(json.dumps(record), flush=True)
    if not records:
        print(json.dumps({"host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(), "none": True}))
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.node:
            return run_node(args)
        lines, ok, out = collect(args.job, args.out, args.py_spy, args.include_agents)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"stacks of job {args.job}: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
