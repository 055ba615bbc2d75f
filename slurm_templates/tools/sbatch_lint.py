"""Lint sbatch job scripts for the mistakes that make Slurm jobs fail, hang, launch twice or waste the allocation.

usage: python sbatch_lint.py [--strict] [--root DIR] [--no-path-checks] [--format text|json]
                             [--slurm-version X.Y] [--no-shellcheck | --shellcheck-all] [--exclude GLOB] PATH...
PATH: job scripts, or folders searched for every file that starts with `#!` and has `#SBATCH` lines (any
extension: .sbatch, .slurm, .sh, .sub, ...).

Errors -- the job cannot work as written (exit 1):
  SB001  a directive typo: `# SBATCH`, `#sbatch`, ` #SBATCH` -- Slurm treats these as plain comments
  SB002  an #SBATCH line after the first command -- sbatch stops reading directives there (a line that is only
         a template placeholder, `${PARTITION_OPTION}` or `{{ account }}`, is not a command)
  SB003  double launch: torchrun/accelerate/deepspeed starting several processes in each of several srun tasks
         per node (N x N processes), or more processes per node than GPUs; also when the launcher is kept in a
         variable (`CMD="torchrun ..."`), and per hetjob group
  SB004  a script the job runs (python x.py, bash x.sh, torchrun x.py, ./x.sh) that does not exist, following
         `#SBATCH --chdir` and `cd DIR`; relative paths are taken from the submit directory (the script's
         folder, or --root); an absolute path is checked when its folder exists here
  SB005  a per-task variable ($SLURM_PROCID, $SLURM_LOCALID, $SLURM_NODEID, ...) expanded by the batch shell,
         where it is the same (0) for everyone -- quote it ('...') or escape it (\\$) so each task expands it
  SB006  `bash -n` syntax error
  SB007  a multi-node job whose nodes are never used: no srun at all, or torchrun/accelerate started without
         srun (only the first node runs it; the job hangs at "Initializing distributed"). Launchers that start
         remote ranks themselves (mpirun, deepspeed's pdsh, accelerate's mpirun mode), the single-node
         branch of `if [ "${SLURM_NNODES:-1}" -gt 1 ]` and a launcher only named in echo/printf are fine
  SB008  `#SBATCH --output/--error` into a folder that does not exist at submit time: Slurm opens the log
         before the script's `mkdir` runs, and the job fails with no log at all
  SB009  DOS line breaks (\\r\\n): sbatch refuses the script (dos2unix fixes it)
Warnings (exit 1 only with --strict):
  SB101  a fixed rendezvous port (MASTER_PORT=29500, ${MASTER_PORT:-29500}, --master_port, --main_process_port,
         host:29500), or a launcher's default one: accelerate launch (several processes) without
         --main_process_port (29500), torchrun --nnodes N>1 without --master-port/--rdzv-endpoint/--standalone
         (29500), a c10d --rdzv-endpoint without a port (29400): jobs sharing a node collide (EADDRINUSE); derive
         it from $SLURM_JOB_ID. Not reported for port 0 (any free port), single-node torchrun (it takes a free
         port itself), or `#SBATCH --exclusive` jobs
  SB102  torch.distributed.launch is deprecated: use torchrun (torch.distributed.run)
  SB103  `srun ... | tee` without `set -o pipefail`: a failed step ends the job as COMPLETED (not a helper whose
         output is captured, x=$(srun ... hostname -I | cut ...))
  SB104  a multi-task srun step of training work (python, torchrun, accelerate, deepspeed, lightning, nemo)
         without --kill-on-bad-exit=1: one crashed rank leaves the others waiting in a collective until the time
         limit (not `ray start`: Ray notices a lost node itself)
  SB105  a derived port range that reaches Linux's ephemeral range (32768+), where it collides now and then
         with outgoing connections
  SB106  `#SBATCH --cpus-per-task` > 1 not passed on to an srun of training work or `ray start`: srun of Slurm
         22.05-23.02 reads SRUN_CPUS_PER_TASK, not SLURM_CPUS_PER_TASK, so every task runs on one core (export
         SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK); before 22.05 and from 23.11 on srun reads SLURM_CPUS_PER_TASK
         (read in Slurm's sources, src/srun/opt.c). Slurm-version dependent: --slurm-version X.Y, or else
         `srun --version` when srun is here and configured, drops it on releases outside 22.05-23.02; with neither
         the finding names those releases
  SB107  a sourced file (an activation or environment script) that does not exist yet: create it before submitting
  SB108  `kill $VAR` / `wait $VAR` of a variable the script never assigns (a signal that is never forwarded);
         one assigned only inside `srun bash -c "..."` lives in that shell, not in the batch shell
  SCnnnn shellcheck's findings that break a job, when shellcheck is installed: SC2154 unassigned variable,
         SC2064 trap expanded too early, SC2069 redirections in the wrong order, SC2071/SC2070/SC2050/SC2157
         tests that are always or never true, SC1101/SC2215 a broken line continuation, SC2115 rm -rf on an empty
         variable. The rest of shellcheck is style in a job script (67 of 72 passed through on a public corpus
         were false alarms): --shellcheck-all shows it all, --no-shellcheck none

`# sbatch-lint: disable=SB003,SB101` anywhere in a script turns those rules off for that script. Findings on a
command that spans several lines are reported at its first line. Exit status: 0 clean, 1 findings (errors, or
any finding with --strict), 2 bad input (one `error:` line on stderr).
"""

import argparse
import fnmatch
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

PER_TASK_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_STEP_ID",
                 "SLURM_GTIDS")
SKIP_DIRS = {".git", ".venvs", "venv", ".venv", "runs", "node_modules", "__pycache__", ".pytest_cache"}
MAX_SCRIPT_BYTES = 1_000_000
SRUN_VALUE_OPTIONS = set("-n -N -c -w -x -p -t -o -e -i -J -A -q -D -m -W -G -d".split()) | {
    f"--{o}" for o in """ntasks nodes ntasks-per-node tasks-per-node cpus-per-task gpus gres nodelist exclude
    partition time output error input export job-name het-group pack-group mem mem-per-cpu mem-per-gpu cpu-bind
    gpu-bind gpus-per-task gpus-per-node ntasks-per-gpu cpus-per-gpu container-image container-mounts
    container-workdir container-name container-env distribution mpi chdir wait account qos reservation dependency
    signal network constraint hint threads-per-core label-format""".split()}
EPHEMERAL_LOW = 32768
# SB106 holds on these Slurm releases, first and last: srun's table of environment variables (src/srun/libsrun/opt.c
# in 22.05, src/srun/opt.c later) maps SLURM_CPUS_PER_TASK to -c up to 21.08, SRUN_CPUS_PER_TASK alone from tag
# slurm-22-05-0-1 to slurm-23-02-7-1, SLURM_CPUS_PER_TASK alone again from slurm-23-11-0-1 to slurm-25-11-0-1 (NEWS:
# 22.05.0rc1 "srun no longer inherits SLURM_CPUS_PER_TASK", 23.11.0rc1 "get back the previous behavior").
CPUS_NOT_INHERITED = ((22, 5), (23, 2))
# The shellcheck findings passed through by default: the ones that break a job. The rest are style for a job script
# (SC2155 `export X=$(...)`, SC2086/SC2046 `srun $SRUN_ARGS`, SC2016 `bash -c '$SLURM_PROCID'`): on a public corpus
# of job scripts 67 of 72 pass-through warnings were false alarms (issue 24); `--shellcheck-all` shows them all.
JOB_BREAKING = {
    "SC2154": "a variable never assigned: empty, or the job stops under set -u",
    "SC2064": "the trap expands now, when the PID it forwards to is not known yet",
    "SC2069": "2>&1 before >file: errors miss the log file",
    "SC2071": "[ $N > 1 ] is a redirect or a string comparison, not a number test: the branch is wrong",
    "SC2070": "-n with an unquoted variable is always true",
    "SC2050": "a constant test: the branch is always or never taken",
    "SC2157": "a constant test: the branch is always or never taken",
    "SC1101": "a space after \\: the line break is not continued, the next line runs as its own command",
    "SC2215": "an option as a command name: a broken line continuation",
    "SC2115": "rm -rf \"$VAR/...\" with VAR empty works on /",
}
# A launcher that starts several processes per node (torchrun, accelerate, deepspeed); group 1 names it.
LAUNCHER = re.compile(r"(?:^|[\s;&|(\"'=])(?:\S*/)?(torchrun|accelerate\s+launch|deepspeed)(?=[\s\"';)]|$)"
                      r"|(?:^|[\s;&|(\"'])(?:\S*/)?python[\d.]*\s+(?:-\w+\s+)*-m\s+(torch\.distributed\.(?:run|launch))\b")
# Starts the ranks on the other nodes itself (ssh/pdsh/MPI): no srun needed.
REMOTE_LAUNCHER = re.compile(r"(?:^|[\s;&|(\"'])(?:\S*/)?(mpirun|mpiexec|pdsh|clush|horovodrun|deepspeed|ssh)\s"
                             r"|--mpirun[_-]hostfile|--launcher[= ](?:slurm|pdsh|openmpi|mvapich)")
CONTAINER = re.compile(r"--container-(?:image|workdir|mounts|name)|\b(?:apptainer|singularity|enroot|shifter|podman"
                       r"|ch-run)\b|\bdocker\s+(?:run|exec)\b")
TRAINING = re.compile(r"(?:^|[\s;&|(\"'/])(?:python[\d.]*|torchrun|accelerate|deepspeed|lightning|nemo|ray\s+start)"
                      r"(?=[\s\"';)]|$)|\.py\b")
# A Ray node: it needs its cores (SB106), but a crashed one is noticed by Ray itself, not left waiting (no SB104).
RAY_NODE = re.compile(r"(?:^|[\s;&|(\"'/])ray\s+start\b")
# A template generator's placeholder alone on a line (`${PARTITION_OPTION}`, `{{ account }}`): not a command yet.
PLACEHOLDER = re.compile(r"\s*(?:\$\{[A-Z_]+\}|\{\{.*\}\}|\{%.*%\}|\{\w+\}|@\w+@|__\w+__|<\w+>)\s*")
NODE_COUNT = (r"\$?\{?\b(?:SLURM_NNODES|SLURM_JOB_NUM_NODES|NNODES|NUM_NODES|N_NODES|nnodes|num_nodes|NODES)"
              r"(?::?[-=][^}\s]*)?\}?")  # ${SLURM_NNODES:-1} too
SCRIPT_REF = re.compile(r"(?<![\w$}\]/.~:@%)-])((?:\.{1,2}/|/)?[\w][\w./-]*\.(?:py|sh|bash|sbatch|slurm))(?![\w/-])")


@dataclass
class Finding:
    path: str
    line: int
    code: str
    message: str

    @property
    def severity(self) -> str:
        return "error" if self.code.startswith("SB0") else "warning"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} {self.severity}: {self.message}"


@dataclass
class Line:
    """One logical command: physical lines joined over `\\` continuations and open quotes, comment dropped."""
    number: int   # first physical line
    text: str     # the code as written (quotes kept)
    top: str      # the same length, with everything inside quotes blanked: the shell's structure only
    heredoc: bool = False


def scan(text: str):
    """Split a script into logical lines, plus (line, chunk) pieces the batch shell itself expands (for SB005).

    A deliberately small lexer (quotes, escapes, comments, heredocs), enough for job scripts; not a shell.
    """
    physical = text.split("\n")
    logical: list[Line] = []
    expanding: list[tuple[int, str]] = []
    state = "c"  # c: code, s: in '...', d: in "..."; quotes may span lines (srun bash -c '...')
    code, top, start = [], [], None
    i = 0
    while i < len(physical):
        line, lineno, heredocs, j, joined = physical[i], i + 1, [], 0, False
        start = start or lineno
        while j < len(line):
            ch = line[j]
            if state == "s":
                code.append(ch)
                top.append("'" if ch == "'" else " ")
                state = "c" if ch == "'" else "s"
            elif ch == "\\" and j + 1 == len(line) and state == "d":
                joined = True  # bash deletes backslash-newline inside "...": the string goes on, no backslash
            elif ch == "\\" and j + 1 < len(line):
                code.append(line[j:j + 2])
                top.append("__" if state == "c" else "  ")
                j += 2
                continue
            elif state == "d":
                code.append(ch)
                top.append('"' if ch == '"' else " ")
                if ch == '"':
                    state = "c"
                elif ch == "$":
                    expanding.append((lineno, line[j:j + 40]))
            elif ch in "'\"":
                code.append(ch)
                top.append(ch)
                state = "s" if ch == "'" else "d"
            elif ch == "#" and (j == 0 or line[j - 1] in " \t;|&("):
                break  # a comment, to the end of the line
            else:
                m = re.match(r"<<-?[ \t]*(['\"]?)([A-Za-z_]\w*)\1", line[j:])
                if m and not line[j:].startswith("<<<") and (j == 0 or line[j - 1] != "<"):
                    heredocs.append((m.group(2), bool(m.group(1))))
                    code.append(m.group(0))
                    top.append(m.group(0))
                    j += len(m.group(0))
                    continue
                if ch == "$":
                    expanding.append((lineno, line[j:j + 40]))
                code.append(ch)
                top.append(ch)
            j += 1
        text_so_far = "".join(code)
        if state == "c" and text_so_far.rstrip().endswith("\\") and "".join(top).rstrip().endswith("\\"):
            code[:] = [text_so_far.rstrip()[:-1] + " "]
            top[:] = ["".join(top).rstrip()[:-1] + " "]
        elif state == "c":
            logical.append(Line(start, "".join(code), "".join(top)))
            code, top, start = [], [], None
        elif not joined:
            code.append(" ")
            top.append(" ")
        i += 1
        for delim, quoted in heredocs:  # heredoc bodies follow the line that opened them
            while i < len(physical) and physical[i].strip() != delim:
                body = physical[i]
                logical.append(Line(i + 1, body, body, heredoc=True))
                if not quoted:
                    expanding += [(i + 1, body[k:k + 40]) for k in range(len(body)) if body[k] == "$"
                                  and (k == 0 or body[k - 1] != "\\")]
                i += 1
            i += 1
    if code:
        logical.append(Line(start or len(physical), "".join(code), "".join(top)))
    return logical, expanding


def option(text: str, *names: str) -> str | None:
    """The last value of any of these options in a directive or command (`--nodes=2`, `--nodes 2`, `-N2`)."""
    value = None
    for name in names:
        sep = r"(?:=|\s+|)" if len(name) == 2 else r"(?:=|\s+)"
        for m in re.finditer(rf"(?:^|\s){re.escape(name)}{sep}([^\s#;|&]+)", text):
            value = m.group(1).strip("\"'")
    return value


def as_int(value, default=None):
    try:
        return int(str(value).split("-")[0])
    except (TypeError, ValueError):
        return default


@dataclass
class Shape:
    """One hetjob group's resources, read from its #SBATCH lines."""
    nodes: int = 1
    tasks_per_node: int | None = None
    ntasks: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None

    @classmethod
    def from_directives(cls, text: str) -> "Shape":
        nodes = as_int(option(text, "--nodes", "-N"), 1)
        tasks_per_node = as_int(option(text, "--ntasks-per-node", "--tasks-per-node"))
        ntasks = as_int(option(text, "--ntasks", "-n"))
        if ntasks and tasks_per_node:
            nodes = max(nodes, -(-ntasks // tasks_per_node))
        gpus = option(text, "--gpus-per-node")
        if gpus is None:
            gres = option(text, "--gres") or ""
            m = re.search(r"gpu(?::[\w.-]+)*?:(\d+)\b", gres)
            gpus = m.group(1) if m else ("1" if re.search(r"\bgpu\b", gres) else None)
        m = re.search(r"(\d+)$", gpus or "")
        return cls(nodes, tasks_per_node, ntasks, int(m.group(1)) if m else None,
                   as_int(option(text, "--cpus-per-task", "-c")))

    @property
    def tasks(self) -> int:
        return self.ntasks or self.nodes * (self.tasks_per_node or 1)

    def count(self, value: str | None) -> int | None:
        """A count given to srun: a number, or the job's own node/task count (`--ntasks=$SLURM_NNODES`)."""
        if value and re.fullmatch(NODE_COUNT, value):
            return self.nodes
        if value and re.fullmatch(r"\$\{?SLURM_(?:NTASKS|NPROCS)\}?", value):
            return self.tasks
        return as_int(value)

    def per_node(self) -> int:
        return self.tasks_per_node or (-(-self.ntasks // self.nodes) if self.ntasks else 1)


class Script:
    """A job script read the way sbatch and bash read it; `lint()` applies every rule."""

    def __init__(self, path: str, text: str, root: Path | None, shellcheck: bool = False, slurm_version=None):
        self.path, self.findings, self.slurm_version = path, [], slurm_version
        if "\r\n" in text:
            self.report(text[:text.index("\r\n")].count("\n") + 1, "SB009", "DOS line breaks (\\r\\n): sbatch "
                        "refuses the script ('Batch script contains DOS line breaks'); convert it with dos2unix")
            text = text.replace("\r\n", "\n")  # read the rest as it will be once converted
        self.text, self.root, self.shellcheck = text, root, shellcheck
        self.lines = text.split("\n")
        self.disabled = {code for m in re.finditer(r"sbatch-lint:\s*disable=([\w,]+)", text)
                         for code in m.group(1).split(",")}
        shebang = self.lines[0] if self.lines and self.lines[0].startswith("#!") else "#!/bin/bash"
        self.is_shell = re.search(r"\b(ba|z|k|da)?sh\b", shebang) is not None

    def report(self, line: int, code: str, message: str):
        self.findings.append(Finding(self.path, line, code, message))

    # --- directives: read until the first command, exactly like sbatch -----------------------------------
    def read_directives(self):
        groups, first_command = [[]], None
        for n, line in enumerate(self.lines, 1):
            stripped = line.strip()
            if n == 1 and stripped.startswith("#!"):
                continue
            if re.match(r"#SBATCH(\s|$)", line):
                value = re.sub(r"\s#.*", "", line[len("#SBATCH"):]).strip()
                if first_command is not None:
                    self.report(n, "SB002", f"#SBATCH after the first command (line {first_command}) is ignored "
                                "by sbatch: move it above every command")
                elif value in ("hetjob", "packjob"):
                    groups.append([])
                else:
                    groups[-1].append((n, value))
                continue
            if re.match(r"\s*#+\s*sbatch\s+--?\w", line, re.I) and not line.startswith("##"):
                self.report(n, "SB001", f"'{stripped[:40]}' is not a directive (Slurm reads only lines starting "
                            "exactly with '#SBATCH'); it is silently ignored")
                continue
            if stripped and not stripped.startswith("#") and first_command is None and not PLACEHOLDER.fullmatch(line):
                first_command = n
        self.groups = groups
        self.shapes = [Shape.from_directives(" ".join(v for _, v in g)) for g in groups]
        self.directive_text = " ".join(v for g in groups for _, v in g)

    # --- logical lines, variables, if-branches ------------------------------------------------------------
    def read_commands(self):
        self.logical, self.expanding = scan(self.text)
        self.commands = [c for c in self.logical if not c.heredoc and c.text.strip()]
        self.assignments: dict[str, list[tuple[int, str]]] = {}
        self.shell_assigned: set[str] = set()  # by the batch shell itself, not inside a `bash -c "..."` it starts
        for c in self.commands:
            inner = inner_shells(c.top)
            for m in re.finditer(r"(?:^|[\s;&(])(?:export\s+|local\s+|readonly\s+|declare\s+(?:-\w+\s+)*)?"
                                 r"([A-Za-z_]\w*)\+?=(\((?:[^()]|\([^()]*\))*\)|\"(?:[^\"\\]|\\.)*\"|'[^']*'"
                                 r"|\$\((?:[^()]|\([^()]*\))*\)|[^\s;&|]*)", c.text):
                self.assignments.setdefault(m.group(1), []).append((c.number, m.group(2).strip("\"'()")))
                if not inside(inner, m.start(1)):
                    self.shell_assigned.add(m.group(1))
            for m in re.finditer(r"\b(?:read(?:\s+-\w+)*|for|local|declare(?:\s+-\w+)*|export)\s+"
                                 r"([A-Za-z_]\w*)\b(?!\+?=)", c.text):
                self.assignments.setdefault(m.group(1), []).append((c.number, ""))
                if not inside(inner, m.start(1)):
                    self.shell_assigned.add(m.group(1))
        self.single_node = self.single_node_lines()

    def value_of(self, name: str, before: int) -> str | None:
        values = self.assignments.get(name)
        if not values:
            return None
        earlier = [v for n, v in values if n < before]
        return earlier[-1] if earlier else values[-1][1]

    def expand(self, text: str, before: int, depth: int = 3, only: re.Pattern | None = None) -> str:
        """Replace $VAR / ${VAR} / ${VAR[@]} / ${VAR:-default} with the value the script assigns (a launcher
        kept in a variable: LAUNCHER="torchrun ..."; srun bash -c "$LAUNCHER train.py"); with `only`, just the
        variables whose value matches it (the launcher's, not a host name that expands to a command)."""
        if depth == 0:
            return text

        def sub(m):
            name, default = m.group(1) or m.group(3), m.group(2)
            value = self.value_of(name, before)
            if value is None:  # Slurm's own variables are set in the job: their fallbacks are not what runs
                return default if default is not None and not name.startswith("SLURM_") and not only else m.group(0)
            value = self.expand(value, before, depth - 1, only)
            return m.group(0) if only and not only.search(value) else value

        return re.sub(r"\$\{(\w+)(?:\[[@*]\])?(?::?[-=]([^}]*))?\}|\$([A-Za-z_]\w*)", sub, text)

    def is_assignment_only(self, c: Line) -> bool:
        rest = re.sub(r"^\s*(?:export\s+|local\s+|readonly\s+|declare\s+(?:-\w+\s+)*)?", "", c.top)
        while True:
            m = re.match(r"[A-Za-z_]\w*\+?=(?:\((?:[^()]|\([^()]*\))*\)|\$\((?:[^()]|\([^()]*\))*\)|\"[^\"]*\""
                         r"|'[^']*'|[^\s;&|\"'(])*\s*", rest)
            if not m or not m.group(0):
                return rest.strip() in ("", ";")
            rest = rest[m.end():]

    def single_node_lines(self) -> set[int]:
        """Lines inside the single-node branch of `if [ "$SLURM_NNODES" -gt 1 ]; then ... else ... fi`."""
        stack, single = [], set()  # stack entries: (mode of the current branch, mode of the `if` condition)
        for c in self.commands:
            t = c.top.strip()
            cond = None
            m = re.match(r"(el)?if\b(.*)", t)
            if m:
                raw = self.expand(c.text, c.number)
                many = re.search(NODE_COUNT + r"\"?\s*(?:-gt\s+1|>\s*1|-ge\s+2|>=\s*2|-ne\s+1|!=\s*\"?1)\b", raw)
                one = re.search(NODE_COUNT + r"\"?\s*(?:-eq\s+1|==?\s*\"?1|-lt\s+2|<\s*2|-le\s+1)\b", raw)
                cond = "multi" if many else "single" if one else None
                if m.group(1) and stack:
                    stack[-1] = (cond, cond)
                elif not m.group(1) and not re.search(r"\bfi\s*$", t):
                    stack.append((cond, cond))
            elif re.match(r"else\b", t) and stack:
                mode = stack[-1][1]
                stack[-1] = ({"multi": "single", "single": "multi"}.get(mode), mode)
            elif re.match(r"fi\b", t) and stack:
                stack.pop()
            if any(mode == "single" for mode, _ in stack):
                single.add(c.number)
        return single

    # --- the rules ------------------------------------------------------------------------------------------
    def lint(self) -> list[Finding]:
        self.read_directives()
        if self.is_shell:
            self.read_commands()
            self.check_per_task_vars()
            self.check_launch()
            self.check_ports()
            self.check_steps()
            self.check_kill()
            syntax_ok = self.check_syntax()
            if syntax_ok and self.shellcheck:
                self.run_shellcheck()
        if self.root is not None:
            self.check_log_dirs()
            if self.is_shell:
                self.check_paths()
        return sorted((f for f in self.findings if f.code not in self.disabled), key=lambda f: (f.line, f.code))

    def check_per_task_vars(self):
        names = "|".join(PER_TASK_VARS)
        for n, chunk in self.expanding:
            m = re.match(rf"\$\{{?({names})\b", chunk)
            if m and not re.match(r"\s*(echo|printf)\s", self.lines[n - 1]):  # a message: harmless
                self.report(n, "SB005", f"${m.group(1)} expands once in the batch shell (same value for every "
                            f"task); use single quotes (srun bash -c '... ${m.group(1)} ...') or \\${m.group(1)} "
                            "so each task expands it")

    def srun_options(self, text: str) -> str | None:
        """The options of the srun in this command (what comes between `srun` and the program), or None."""
        m = re.search(r"(?:^|[\s;&|(\"'])srun\s", text)
        if not m:
            return None
        tokens, options = text[m.end():].split(), []
        while tokens and tokens[0].startswith("-"):
            token = tokens.pop(0)
            options.append(token)
            if "=" not in token and token in SRUN_VALUE_OPTIONS and tokens:
                options.append(tokens.pop(0))
        return " ".join(options)

    def check_launch(self):
        """SB003 double launch, SB007 nodes never used, SB102 torch.distributed.launch."""
        shape0 = self.shapes[0]
        any_multi = any(s.nodes > 1 for s in self.shapes)
        expanded = [(c, without_messages(self.expand(c.text, c.number))) for c in self.commands]
        code_all = " ".join(e for c, e in expanded)
        has_srun = re.search(r"(?:^|[\s;&|(\"'])srun\s", code_all) is not None
        for c, text in expanded:
            if self.is_assignment_only(c):
                continue
            launcher = LAUNCHER.search(text)
            if not launcher:
                continue
            name = launcher.group(1) or launcher.group(2)
            if name == "torch.distributed.launch":
                self.report(c.number, "SB102", "torch.distributed.launch is deprecated (and passes --local_rank): "
                            "use torchrun / python -m torch.distributed.run")
            steps = self.srun_options(text)
            group = as_int(option(steps or "", "--het-group", "--pack-group"), 0)
            shape = self.shapes[min(group, len(self.shapes) - 1)]
            gpn = shape.gpus_per_node
            nproc_text = self.launcher_procs(name, text, shape)
            nproc = as_int(nproc_text)
            if nproc is None and nproc_text and "GPUS" in nproc_text.upper():
                nproc = gpn
            if steps is not None:
                per_node = shape.count(option(steps, "--ntasks-per-node", "--tasks-per-node"))
                step_n = shape.count(option(steps, "--ntasks", "-n"))
                step_nodes = shape.count(option(steps, "--nodes", "-N")) or shape.nodes
                if per_node is None:
                    per_node = -(-step_n // step_nodes) if step_n else shape.per_node()
            else:
                per_node = 1
            if nproc is not None and gpn is not None and nproc * per_node > gpn:
                self.report(c.number, "SB003", f"double launch: {per_node} srun task(s) per node x {name} with "
                            f"{nproc} processes = {nproc * per_node} processes per node for {gpn} GPU(s) "
                            f"(use --ntasks-per-node=1 with {name})")
            elif per_node > 1 and (nproc is None or nproc > 1):
                self.report(c.number, "SB003", f"double launch: {per_node} srun tasks per node each start {name}, "
                            f"which starts several processes (use --ntasks-per-node=1 with {name})")
            nodes = 1 if c.number in self.single_node else shape0.nodes
            remote = REMOTE_LAUNCHER.search(text)
            if steps is None and nodes > 1 and name != "deepspeed" and not remote:
                self.report(c.number, "SB007", f"{name} without srun in a {nodes}-node job runs on the first node "
                            f"only: the others never join the rendezvous (use srun ... {name})")
        if any_multi and not has_srun and not REMOTE_LAUNCHER.search(code_all) and not any(
                f.code == "SB007" for f in self.findings):
            work = [c for c, text in expanded if TRAINING.search(text) and not self.is_assignment_only(c)]
            first = (work or self.commands or [Line(1, "", "")])[0].number
            nodes = max(s.nodes for s in self.shapes)
            self.report(first, "SB007", f"{nodes} nodes requested but nothing runs srun: the script runs once, on "
                        "the first node, and the other nodes stay idle (a distributed run hangs at "
                        "'Initializing distributed')")

    def launcher_procs(self, name: str, text: str, shape: Shape) -> str | None:
        """How many processes per node the launcher starts, as written (a number or a variable name)."""
        if name == "deepspeed":
            value = option(text, "--num_gpus", "--num-gpus")
            return value if value is not None else (str(shape.gpus_per_node) if shape.gpus_per_node else None)
        if name.startswith("accelerate"):  # --num_processes counts every machine's processes
            total = as_int(option(text, "--num_processes", "--num-processes"))
            machines_text = option(text, "--num_machines", "--num-machines")
            machines = shape.count(machines_text) if machines_text else 1
            return str(-(-total // machines)) if total and machines else None
        value = option(text, "--nproc_per_node", "--nproc-per-node")
        return value if value is not None else "1"

    def check_ports(self):
        """SB101 fixed ports, SB105 derived ranges that reach the ephemeral range."""
        exclusive = re.search(r"(?:^|\s)--exclusive\b", self.directive_text) is not None
        for c in self.commands:
            text = c.text
            fixed = (re.search(r"\b(?:\w*_)?PORT=[\"']?(\d+)\b(?![\w.$])", text, re.I)
                     or re.search(r"\$\{(?:\w*_)?PORT:?-(\d+)\}", text, re.I)
                     or re.search(r"--(?:master|main[-_]process|rdzv)[-_]port(?:=|\s+)[\"']?(\d+)\b", text)
                     or re.search(r"--(?:rdzv[-_]endpoint|dist[-_]url|init[-_]method)(?:=|\s+)\S*?:(\d+)\b", text)
                     or re.search(r"\bray\s+start\b.*--head\b.*--port(?:=|\s+)(\d+)\b", text))
            if fixed and int(fixed.group(1)) != 0 and not exclusive:
                self.report(c.number, "SB101", f"fixed port {fixed.group(1)}: two jobs on one node collide "
                            "(EADDRINUSE); derive it from the job id, e.g. "
                            "MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))")
            elif not fixed and not exclusive and not self.is_assignment_only(c):
                default = default_port(without_messages(self.expand(text, c.number, only=LAUNCHER)), self.shapes[0],
                                       lambda name, n=c.number: self.value_of(name, n))
                if default and "PET_MASTER_PORT" not in self.text:
                    self.report(c.number, "SB101", f"default port {default[0]}: {default[1]}, the same in every job, "
                                "so two jobs on one node collide (EADDRINUSE); pass one derived from the job id, "
                                "e.g. --master-port $((15000 + SLURM_JOB_ID % 15000))")
            m = re.search(r"\b(?:\w*_)?PORT=[\"']?(.*)", text, re.I)
            if m and not fixed:
                high = port_range_top(m.group(1))
                if high is not None and high >= EPHEMERAL_LOW:
                    self.report(c.number, "SB105", f"this port range reaches {high}, inside Linux's ephemeral range "
                                f"({EPHEMERAL_LOW}-60999) where outgoing connections take ports: stay below it, e.g. "
                                "$((15000 + SLURM_JOB_ID % 15000))")

    def check_steps(self):
        """SB103 pipes without pipefail, SB104 no --kill-on-bad-exit, SB106 cpus-per-task not passed on."""
        shape = self.shapes[0]
        pipefail = None
        kill_env = re.search(r"SLURM_KILL_BAD_EXIT=1", self.text) is not None
        cpus_reported = False
        for c in self.commands:
            if pipefail is None and re.search(r"(?:^|[\s;&])set\s+(?:-\w*\s+)*-\w*o\s*\w*\s*pipefail|\bset\s.*"
                                              r"pipefail", c.top):
                pipefail = c.number
            text = self.expand(c.text, c.number)
            if self.srun_options(c.top) is None:
                continue
            steps = self.srun_options(text) or ""  # options kept in a variable ($SRUN_ARGS) count
            if steps is None:
                continue
            srun_at = re.search(r"(?:^|[\s;&|(\"'])srun\s", c.top).end() - 5
            after_srun = c.top[srun_at:]
            if (pipefail is None and re.search(r"[^|]\|(?!\|)\s*\S", after_srun.replace("||", "  "))
                    and not in_substitution(c.top, srun_at)):  # x=$(srun hostname -I | cut ..): a helper
                self.report(c.number, "SB103", "srun piped into another command without `set -o pipefail`: the "
                            "pipeline's status is the last command's, so a failed step ends the job as COMPLETED")
            if not TRAINING.search(text[text.find("srun"):]):
                continue
            tasks = shape.count(option(steps, "--ntasks", "-n"))
            if tasks is None:
                nodes = shape.count(option(steps, "--nodes", "-N")) or shape.nodes
                per_node = shape.count(option(steps, "--ntasks-per-node", "--tasks-per-node"))
                tasks = nodes * per_node if per_node else (shape.tasks if nodes == shape.nodes else nodes)
            if (tasks > 1 and not kill_env and not re.search(r"--kill-on-bad-exit|(?:^|\s)-K\d?\b", steps)
                    and not RAY_NODE.search(text)):
                self.report(c.number, "SB104", f"{tasks} tasks without --kill-on-bad-exit=1: when one rank crashes "
                            "the others wait in a collective until the time limit")
            if (shape.cpus_per_task or 1) > 1 and not cpus_reported:
                before = "\n".join(x.text for x in self.commands if x.number < c.number)
                if (option(steps, "--cpus-per-task", "-c") is None
                        and not re.search(r"SRUN_CPUS_PER_TASK=", before + c.text)):
                    cpus_reported = True
                    version = installed_slurm_version() if self.slurm_version == "auto" else self.slurm_version
                    if version is None:
                        low, high = CPUS_NOT_INHERITED
                        where = (f"on Slurm {release(low)}-{release(high)} srun does not inherit it (before "
                                 "22.05 and from 23.11 it does: check `srun --version`, or pass --slurm-version)")
                    elif CPUS_NOT_INHERITED[0] <= version <= CPUS_NOT_INHERITED[1]:
                        where = f"on Slurm {release(version)} srun does not inherit it"
                    else:
                        continue  # srun reads SLURM_CPUS_PER_TASK there (CPUS_NOT_INHERITED)
                    self.report(c.number, "SB106", f"--cpus-per-task={shape.cpus_per_task} is not passed on: "
                                f"{where}, and each task runs on one core (export "
                                "SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK before the first srun)")

    def check_kill(self):
        """SB108; a variable assigned only inside `srun bash -c "..."` lives in that shell, not in the batch shell."""
        for c in self.commands:
            inner = inner_shells(c.top)
            for m in re.finditer(r"(?:^|[\s;&|('\"])(kill|wait)\b([^;&|]*)", c.text):
                known = self.assignments if inside(inner, m.start(1)) else self.shell_assigned
                for v in re.finditer(r"\$\{?([A-Za-z_]\w*)", c.text[m.start(2):m.end(2)]):
                    name = v.group(1)
                    if name not in known and not name.startswith("SLURM_"):
                        self.report(c.number, "SB108", f"{m.group(1)} ${name}: the script never assigns {name}, so "
                                    f"this {m.group(1)} has no process to act on (a typo, or `{name}=$!` missing)")

    def check_syntax(self) -> bool:
        bash = shutil.which("bash")
        if not bash:
            return True
        proc = subprocess.run([bash, "-n"], input=self.text, text=True, capture_output=True, timeout=30)
        if proc.returncode == 0:
            return True
        message = re.sub(r"^\S*bash: ", "", proc.stderr.strip().splitlines()[0])
        m = re.search(r"line (\d+)", message)
        self.report(int(m.group(1)) if m else 1, "SB006", "bash -n: " + message)
        return False

    def run_shellcheck(self):
        """shellcheck's findings that break a job (JOB_BREAKING), or all of its warnings with shellcheck="all"."""
        which = "--exclude=SC1090,SC1091" if self.shellcheck == "all" else "--include=" + ",".join(JOB_BREAKING)
        proc = subprocess.run(["shellcheck", "--format=json", "--severity=warning", "--shell=bash", which, "-"],
                              input=self.text, text=True, capture_output=True, timeout=60)
        try:
            comments = json.loads(proc.stdout or "[]")
        except json.JSONDecodeError:
            return
        for item in comments:
            code = f"SC{item['code']}"
            why = f" ({JOB_BREAKING[code]})" if code in JOB_BREAKING else ""
            self.report(item["line"], code, f"shellcheck: {item['message']}{why}")

    # --- file-system checks (off with --no-path-checks) -----------------------------------------------------
    def submit_dir(self) -> Path | None:
        chdir = option(self.directive_text, "--chdir", "-D")
        if chdir is None:
            return self.root
        if "%" in chdir or "$" in chdir:
            return None
        path = self.root / chdir
        return path if path.is_dir() else None

    def check_log_dirs(self):
        base = self.submit_dir()
        for group in self.groups:
            for n, value in group:
                for opt in ("--output", "-o", "--error", "-e"):
                    target = option(value, opt)
                    if not target or "/" not in target or "$" in target:
                        continue
                    folder = target.rsplit("/", 1)[0]
                    if "%" in folder or not folder:
                        continue
                    path = Path(folder) if folder.startswith("/") else (base / folder if base else None)
                    if path is None or path.is_dir() or (folder.startswith("/") and not path.parent.is_dir()):
                        continue
                    self.report(n, "SB008", f"{opt} {target}: the folder {folder} does not exist; Slurm opens the "
                                "log before the script runs, so the job fails with no log (create it before "
                                "sbatch, or log into the submit directory)")

    def check_paths(self):
        """SB004 scripts the job runs, SB107 files it sources; following --chdir and cd."""
        cwd = self.submit_dir()
        created = self.created_files()
        in_container = set()
        for c in self.commands:
            if CONTAINER.search(c.text):
                in_container.update(self.referenced_names(c.text))
        for c in self.commands:
            if CONTAINER.search(c.text):
                continue
            if self.is_assignment_only(c) and any(n in in_container for n in re.findall(r"(\w+)\+?=", c.top[:80])):
                continue
            local = cwd
            text = re.sub(r"\b(python[\d.]*(?:\s+-\w+)*\s+-c)\s+(\"(?:[^\"\\]|\\.)*\"|'[^']*')", r"\1 _", c.text)
            text = without_messages(text)
            text = re.sub(r"\d*(?:&?>>?|>&)\|?\s*\S+", " ", text)  # output files are created, not read
            text = re.sub(r"\b(touch|tee|rm|mkdir|wget|curl|git)\b[^;&|]*", " ", text)
            text = re.sub(r"\b((?:cp|mv|ln|rsync|scp|install)\b[^;&|]*?)\s+\S+(?=\s*(?:$|[;&|]))", r"\1", text)
            events = [(m.start(), "cd", m.group(2)) for m in
                      re.finditer(r"(?:^|[;&|(\"'{]\s*)(cd|pushd)\s+(\"[^\"]*\"|'[^']*'|[^\s;&|)\"']+)", text)]
            events += [(m.start(), "source", m.group(1)) for m in
                       re.finditer(r"(?:^|[;&|(\"'{]\s*)(?:source|\.)\s+(\"[^\"]*\"|'[^']*'|[^\s;&|)\"']+)", text)]
            sourced = {e[2].strip("\"'") for e in events if e[1] == "source"}
            events += [(m.start(), "run", m.group(1)) for m in SCRIPT_REF.finditer(text)
                       if m.group(1) not in sourced and not after_expansion(text, m.start())]
            for _, kind, ref in sorted(events):
                ref = self.expand(ref.strip("\"'"), c.number)
                if kind == "cd":
                    local = self.resolve_dir(ref, local)
                    if c.top.lstrip().startswith(("cd ", "pushd ")):
                        cwd = local
                    continue
                path = self.resolve(ref, local)
                if path is None or path.exists() or ref in created:
                    continue
                if kind == "source":
                    if "/" not in ref and "." not in ref:
                        continue  # `source activate`: bash looks a bare name up on PATH first (conda's activate)
                    self.report(c.number, "SB107", f"'{ref}' does not exist yet: create it before submitting "
                                "(the job stops at this line otherwise)")
                else:
                    where = "" if ref.startswith("/") else f" (relative to {local})"
                    self.report(c.number, "SB004", f"'{ref}' does not exist{where}; the job would fail after "
                                "waiting in the queue")

    def created_files(self) -> set[str]:
        """Files the job writes itself (cat > run.sh <<EOF, tee, cp, touch): they exist by the time they run."""
        created = set()
        word = r"(\"[^\"]*\"|'[^']*'|[^\s;&|<>()]+)"
        for c in self.commands:
            created.update(m.group(1) for m in re.finditer(r"(?:&?>>?|>\|)\s*" + word, c.text))
            for m in re.finditer(r"\b(tee|touch|cp|mv|ln|install)\b([^;&|]*)", c.text):
                args = [a for a in m.group(2).split() if not a.startswith("-")]
                created.update(args if m.group(1) in ("tee", "touch") else args[-1:])
            created.update(re.findall(r"\b(?:wget|curl)\b.*?\s-[oO]\s*" + word, c.text))
        return {c.strip("\"'") for c in created}

    def referenced_names(self, text: str, depth: int = 3) -> set[str]:
        names = set(re.findall(r"\$\{?([A-Za-z_]\w*)", text))
        if depth:
            for name in list(names):
                for _, value in self.assignments.get(name, []):
                    names |= self.referenced_names(value, depth - 1)
        return names

    def resolve_dir(self, ref: str, cwd: Path | None) -> Path | None:
        if "$" in ref or "`" in ref or ref.startswith(("~", "-")):
            return self.root if ref in ("$SLURM_SUBMIT_DIR", "${SLURM_SUBMIT_DIR}") else None
        path = Path(ref) if ref.startswith("/") else (cwd / ref if cwd else None)
        return path if path is not None and path.is_dir() else None

    def resolve(self, ref: str, cwd: Path | None) -> Path | None:
        """The file a path names, or None where it cannot be known here (variables, ~, another machine)."""
        if "$" in ref or "`" in ref or ref.startswith("~") or "*" in ref:
            return None
        if ref.startswith("/"):
            path = Path(ref)
            return path if path.parent.is_dir() else None  # its folder is missing: written for another machine
        return cwd / ref if cwd else None


def default_port(text: str, shape: "Shape", value_of=lambda name: None) -> tuple[int, str] | None:
    """The port a launcher picks when none is given: (port, why), or None (a port is given, it picks a free one, or
    that cannot be known here). value_of: what the script assigns to a variable (None: nothing)."""
    launcher = LAUNCHER.search(text)
    if launcher is None:
        return None
    name, rest = launcher.group(1) or launcher.group(2), text[launcher.end():]
    if name == "deepspeed" or re.search(r"--standalone\b|--(?:master|main[-_]process)[-_]port\b", rest):
        return None
    if name.startswith("accelerate"):
        if re.search(r"--config[-_]file\b|--mpirun", rest):
            return None  # the port may be in the config file; mpirun mode has no rendezvous port
        machines = shape.count(option(rest, "--num_machines", "--num-machines")) or 1
        processes = as_int(option(rest, "--num_processes", "--num-processes"), 1)
        if machines > 1 or processes > 1 or re.search(r"--multi[-_]gpu\b", rest):
            return 29500, f"{name} without --main_process_port uses 29500"
        return None
    endpoint = option(rest, "--rdzv-endpoint", "--rdzv_endpoint")
    if endpoint is not None:
        backend = option(rest, "--rdzv-backend", "--rdzv_backend")
        variable = re.fullmatch(r"\$\{?(\w+)\}?", endpoint)
        host = value_of(variable.group(1)) if variable else endpoint  # "$0", $ENDPOINT: may carry the port
        if backend == "c10d" and host is not None and ":" not in host and re.fullmatch(r"\$\(.*|[^$]*", host):
            return 29400, "a c10d --rdzv-endpoint without a port uses 29400"
        return None
    nnodes = option(rest, "--nnodes") or "1"
    if nnodes.split(":")[-1] != "1":  # one node: torch picks a free port itself (localhost:0)
        return 29500, f"{name} --nnodes {nnodes} without --master-port or --rdzv-endpoint uses 29500"
    return None


def without_messages(text: str) -> str:
    """The command with echo/printf arguments blanked: a message that quotes a launcher or a script runs neither."""
    return re.sub(r"\b(echo|printf)\b[^;&|}]*", " ", text)


def in_substitution(top: str, pos: int) -> bool:
    """True when pos lies inside $(...) or `...`: a command whose output is captured (a helper), not a step."""
    opened, tick = [], False
    for k, ch in enumerate(top[:pos]):
        if ch == "`":
            tick = not tick
        elif ch == "(":
            opened.append(top[k - 1:k] == "$")
        elif ch == ")" and opened:
            opened.pop()
    return tick or any(opened)


def inner_shells(top: str) -> list[tuple[int, int]]:
    """The spans of `bash -c '...'` / `sh -c "..."` strings in a command: code another shell runs."""
    spans = []
    for m in re.finditer(r"(?:^|[\s;&|(])(?:\S*/)?(?:ba|da|k|z)?sh\s+(?:-\w+\s+)*-\w*c\s+(['\"])", top):
        end = top.find(m.group(1), m.end())
        spans.append((m.end(), end if end >= 0 else len(top)))
    return spans


def inside(spans, pos: int) -> bool:
    return any(start <= pos < end for start, end in spans)


def release(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]:02d}"


def parse_release(text: str) -> tuple[int, int] | None:
    """'22.05', '24.11.5', 'slurm-wlm 22.05.8' -> (22, 5)."""
    m = re.search(r"\b(\d{2})\.(\d{1,2})\b", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


@functools.cache
def installed_slurm_version() -> tuple[int, int] | None:
    """`srun --version` here, asked once and only when a finding depends on it; None without srun, or where srun
    cannot read a Slurm configuration (it needs one even for --version) within a few seconds."""
    srun = shutil.which("srun")
    if srun is None:
        return None
    try:
        proc = subprocess.run([srun, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_release(proc.stdout) if proc.returncode == 0 else None


def after_expansion(text: str, start: int) -> bool:
    """True for the /x.py of "$DIR"/x.py or $(dirname "$0")/x.py: a path under a folder the linter cannot know."""
    if text[start] != "/":
        return False
    before = text[:start]
    closing_quote = before[-1:] in ("\"", "'") and len(before) > 1 and before[-2] not in " \t=("
    return before[-1:] in (")", "}") or closing_quote


def port_range_top(expr: str) -> int | None:
    """The highest port a derived expression gives: 20000 + ID % 20000 -> 39999; shuf -i 20000-65000 -> 65000."""
    m = re.search(r"shuf\s+-i\s*(\d+)-(\d+)", expr)
    if m:
        return int(m.group(2))
    modulus = re.search(r"%\s*\(?\s*(\d+)", expr)
    rest = expr[:modulus.start()] + expr[modulus.end():] if modulus else expr
    base = sum(int(a or b) for a, b in re.findall(r"(?<![\w%-])(\d+)\s*\+|\+\s*(\d+)\b", rest))
    if modulus:
        return base + int(modulus.group(1)) - 1
    m = re.search(r"\$\{\w+:\s*-(\d)\}|tail\s+-c\s*(\d)", expr)
    if m:
        digits = int(m.group(1) or m.group(2))
        return base + 10 ** digits - 1
    if "RANDOM" in expr:
        return base + 32767
    return None


def lint_text(path, text: str, root: Path | None, shellcheck: bool = False, slurm_version=None) -> list[Finding]:
    """Lint one script's text; root is its submit directory (None: no file-system checks); slurm_version the
    release it runs on, (22, 5), or None (unknown: version-dependent findings name the releases), or "auto"
    (`srun --version` here)."""
    return Script(str(path), text, root, shellcheck, slurm_version).lint()


def lint_file(path: Path, root: Path | None = None, path_checks: bool = True, shellcheck: bool = False,
              slurm_version=None):
    base = (root or path.resolve().parent) if path_checks else None
    return lint_text(path, path.read_bytes().decode(errors="replace"), base, shellcheck, slurm_version)  # keeps \r\n


def is_job_script(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_SCRIPT_BYTES:
            return False
        with path.open("rb") as f:
            head = f.read(MAX_SCRIPT_BYTES)
    except OSError:
        return False
    return head.startswith(b"#!") and b"\0" not in head and re.search(rb"^#SBATCH", head, re.M) is not None


def find_scripts(paths, exclude=()) -> list[Path]:
    """Files as given; folders searched for job scripts (a `#!` line and `#SBATCH` lines, any extension)."""
    found = []
    for p in map(Path, paths):
        if not p.is_dir():
            found.append(p)
            continue
        for folder, dirs, files in os.walk(p):  # never follows links: .venvs and the like stay out
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not excluded(here / d, p, exclude))
            found += [here / f for f in sorted(files) if not excluded(here / f, p, exclude) and is_job_script(here / f)]
    return found


def excluded(path: Path, top: Path, patterns) -> bool:
    rel = str(path.relative_to(top))
    return any(fnmatch.fnmatch(rel, g.rstrip("/")) for g in patterns)


def parse_version_option(text: str) -> tuple[int, int]:
    version = parse_release(text)
    if version is None or not re.fullmatch(r"\d+\.\d+(?:\.\d+)?", text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Slurm release such as 23.11")
    return version


class Parser(argparse.ArgumentParser):
    def error(self, message):  # bad input: one line, exit 2
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="job scripts, or folders searched for them")
    parser.add_argument("--strict", action="store_true", help="warnings fail too")
    parser.add_argument("--root", type=Path, metavar="DIR", help="resolve relative paths as if the scripts lived "
                        "in DIR (the folder you submit from); default: each script's own folder")
    parser.add_argument("--no-path-checks", action="store_true", help="skip every file-system check "
                        "(SB004, SB008, SB107): for a script copied away from its project")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="json: one array of findings "
                        "(path, line, code, severity, message) on stdout, for editors and CI")
    parser.add_argument("--no-shellcheck", action="store_true", help="do not run shellcheck even when installed")
    parser.add_argument("--shellcheck-all", action="store_true", help="pass every shellcheck warning through, "
                        "not only the ones that break a job (the SCnnnn list above)")
    parser.add_argument("--slurm-version", type=parse_version_option, metavar="X.Y",
                        help="the Slurm release the jobs run on (e.g. 23.11): version-dependent findings (SB106) "
                        "are dropped where they do not hold; default: `srun --version` when srun is here and "
                        "configured, else such findings name the releases they hold on")
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                        help="skip files under a folder matching GLOB (relative to the folder given); repeatable")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        parser.error(f"{missing[0]}: no such file or folder")
    if args.root is not None and not args.root.is_dir():
        parser.error(f"--root {args.root}: not a folder")
    scripts = find_scripts(args.paths, args.exclude)
    if not scripts:
        parser.error("no job scripts found (files starting with #! that have #SBATCH lines)")
    shellcheck = not args.no_shellcheck and shutil.which("shellcheck") is not None and (
        "all" if args.shellcheck_all else "jobs")
    if not args.no_shellcheck and not shellcheck:
        print("sbatch-lint: shellcheck is not installed; install it to also catch unassigned variables and broken "
              "line continuations (or pass --no-shellcheck)", file=sys.stderr)
    findings = []
    for script in scripts:
        findings += lint_file(script, args.root, not args.no_path_checks, shellcheck, args.slurm_version or "auto")
    if args.format == "json":
        print(json.dumps([{**asdict(f), "severity": f.severity} for f in findings], indent=1))
    else:
        for finding in findings:
            print(finding)
    print(f"sbatch-lint: {len(scripts)} file(s), {len(findings)} finding(s)", file=sys.stderr)
    failed = any(f.severity == "error" or args.strict for f in findings)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
