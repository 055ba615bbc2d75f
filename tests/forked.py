"""Many command lines of one folder's scripts, each run as `python script.py ARGS` (or `python -c CODE`) would run,
but forked from one process that has already imported what the scripts import.

Why: every interpreter start that imports a framework costs seconds of CPU (nemo ~23 CPU-s, lightning ~10, the
others 3-4; CI's 2 cores are saturated), and most quick checks (--help, bad input refused in one line, a launch
without its launcher) need nothing of a start of their own. FORKED, run by the folder's interpreter from inside the
folder, imports once -- the imports at the top of the scripts its cases run (the `imports` given, else every case's
script of the folder), then each case's `preload` (Python code: `import recipe`, DeepSpeed's late import), run once
before the first case that names it; cases that name none are forked first -- and forks one child per case.

What a child keeps of a real `python script.py ARGS` run: its own exit code (sys.exit("text") prints the text and
exits 1, as the interpreter does), its own stdout and stderr (file descriptors 1 and 2, so output of C code and of
the processes it starts lands there too), its own environment (the parent's plus the case's `env`), a traceback
printed as Python prints one (exit 1), a time bound (SIGALRM after `timeout` seconds: exit -14), and with `setsid`
a session of its own (what it leaves behind is found by the session id, as tests/test_ray.py's Launch finds it).
Each result also says whether it ended by sys.exit (as argparse's --help does) rather than by reaching its end,
and how long it ran.

What it does not keep: a fresh interpreter. A child starts with the parent's modules already imported (import-time
effects, what an import prints or costs, happened once, before the fork: a case that asserts about them must be
forked before that import, as DeepSpeed's are), its signal dispositions, and without the parent's threads; and it
ends by os._exit, so the interpreter's shutdown (atexit, finalizers, a signal landing during it) never runs. Those
checks therefore stay real processes: the exit code 75 kept through a late TERM at shutdown, the resource tracker
outliving USR1, the hang watcher thread's stack dump (tests/test_contract.py), every multi-process launch
(torchrun, the spawners, srun, Ray clusters), preemption by signals, and copy-alone.
"""

import json
import subprocess

from helpers import ROOT, env_python, run

# argv[1]: {"imports": [script, ...], "cases": [case, ...]}; a case: {"id", "script" or "code", "args", "env",
# "timeout", "preload", "setsid"}. Prints MARK and {id: [exit code, stdout, stderr, ended by sys.exit, seconds,
# pids its session still has]} as its last line.
MARK = "forked-results "
FORKED = """import json, os, runpy, signal, sys, tempfile, time, traceback
from pathlib import Path
spec = json.loads(sys.argv[1])
for script in spec["imports"]:
    runpy.run_path(script, run_name="imports only")  # the script's imports, not its __main__ block


def session_members(sid):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


preloaded, results = set(), {}
for case in sorted(spec["cases"], key=lambda c: bool(c["preload"])):  # stable: those without a preload first
    if case["preload"] and case["preload"] not in preloaded:
        exec(compile(case["preload"], "<preload>", "exec"), {"__name__": "preload"})
        preloaded.add(case["preload"])
    out, err, ended = tempfile.TemporaryFile(), tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        if case["setsid"]:
            os.setsid()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        os.environ.update(case["env"])
        signal.alarm(case["timeout"])
        code = 0
        try:
            if "code" in case:
                sys.argv = ["-c", *case["args"]]
                exec(compile(case["code"], "<string>", "exec"), {"__name__": "__main__"})
            else:
                sys.argv = [case["script"], *case["args"]]
                runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as e:  # as the interpreter ends it: sys.exit("text") prints the text, exits 1
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            ended.write(b"sys.exit")
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        ended.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    seconds = time.monotonic() - start
    for f in (out, err, ended):
        f.seek(0)
    results[case["id"]] = [os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                           err.read().decode(errors="replace"), ended.read() == b"sys.exit", seconds,
                           session_members(pid) if case["setsid"] else []]
print("forked-results " + json.dumps(results))  # MARK
"""


class Forked(subprocess.CompletedProcess):
    """One case's run: args ([script, *args], or ["-c", *args]), returncode, stdout, stderr as subprocess.run gives
    them; exited: it ended by sys.exit; seconds: how long it ran; left: the live processes of its session once it
    exited (setsid cases; [] otherwise)."""

    def __init__(self, args, returncode, stdout, stderr, exited, seconds, left):
        super().__init__(args, returncode, stdout, stderr)
        self.exited, self.seconds, self.left = exited, seconds, left

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def forked_each(folder: str, cases: dict, *, timeout: float, env: dict | None = None, imports=None,
                preload: str = "", setsid: bool = False) -> dict[str, Forked]:
    """{id: Forked} of every case {id: {"script": name or "code": text, "args": [...], "env": {...} (extra
    variables), "timeout": seconds, "preload": code, "setsid": bool}}, run by FORKED in <folder>'s environment from
    inside the folder (env: the parent's environment, clean_env() if None); `preload` and `setsid` are the defaults
    of the cases that do not say. `imports`: the scripts whose imports the parent runs, by default every case's
    script of the folder. The parent process must exit 0 within `timeout` (helpers.run)."""
    each = []
    for case, c in cases.items():
        c = {"env": {}, "preload": preload, "setsid": setsid, **c, "id": case}
        c["args"] = [str(a) for a in c.get("args", [])]
        c["env"] = {k: str(v) for k, v in c["env"].items()}
        each.append(c)
    if imports is None:
        imports = sorted({c["script"] for c in each if "script" in c and "/" not in c["script"]})
    proc = run([env_python(folder), "-c", FORKED, json.dumps({"imports": imports, "cases": each})], cwd=ROOT / folder,
               env=env, timeout=timeout)
    ran = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)][-1][len(MARK):])
    return {c["id"]: Forked([c.get("script", "-c"), *c["args"]], *ran[c["id"]]) for c in each}
