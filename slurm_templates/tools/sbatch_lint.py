"""Lint sbatch job scripts for the mistakes that make Slurm jobs silently wrong, hang, or launch twice.

usage: python sbatch_lint.py [--strict] PATH...      (files, or folders searched for *.sbatch)

Errors (exit 1):
  SB001  a directive typo: `# SBATCH`, `#sbatch`, ` #SBATCH` -- Slurm treats these as plain comments
  SB002  an #SBATCH line after the first command -- sbatch stops reading directives there
  SB003  double launch: torchrun --nproc-per-node x tasks per node > GPUs per node (N x N processes)
  SB004  a script path that does not exist (relative paths are taken from the template's folder, which is
         where the job is meant to be submitted from)
  SB005  a per-task variable ($SLURM_PROCID, $SLURM_LOCALID, $SLURM_NODEID, ...) expanded by the batch shell,
         where it is the same (0) for everyone -- quote it ('...') or escape it (\\$) so each task expands it
  SB006  `bash -n` syntax error
  SB007  several tasks or nodes requested but no srun: only the first node runs the script and the job hangs
         at "Initializing distributed"
Warnings (exit 1 only with --strict):
  SB101  a fixed rendezvous port (MASTER_PORT=29500, --master_port 29500, host:29500): jobs sharing a node
         collide (EADDRINUSE); derive it from $SLURM_JOB_ID
  SB102  torch.distributed.launch is deprecated: use torchrun (torch.distributed.run)

A line `# sbatch-lint: disable=SB003,SB101` anywhere in a script turns those rules off for that script.
"""

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PER_TASK_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_TASK_PID", "SLURM_STEP_ID",
                 "SLURM_GTIDS")
SKIP_DIRS = {".git", ".venvs", "runs", "node_modules", "__pycache__", ".pytest_cache"}
SCRIPT_SUFFIXES = (".py", ".sh", ".sbatch")


@dataclass
class Finding:
    path: Path
    line: int
    code: str
    message: str

    @property
    def is_error(self) -> bool:
        return self.code < "SB100"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code} {'error' if self.is_error else 'warning'}: {self.message}"


def shell_scan(text: str):
    """Split a shell script into (line number, code, expanding) spans, comments dropped.

    expanding tells whether `$VAR` in that span is expanded by the batch shell itself: outside single quotes,
    not backslash-escaped, not in a heredoc with a quoted delimiter. A deliberately small lexer (quotes,
    escapes, comments, heredocs), enough for job scripts; not a full shell parser.
    """
    spans = []
    lines = text.split("\n")
    state = "normal"  # normal | single | double; quotes may span lines (srun bash -c '...')
    i = 0
    while i < len(lines):
        line, lineno = lines[i], i + 1
        heredocs, buf, j = [], "", 0

        def flush(expanding, lineno=lineno):
            nonlocal buf
            if buf:
                spans.append((lineno, buf, expanding))
            buf = ""

        while j < len(line):
            c = line[j]
            if state == "single":
                if c == "'":
                    flush(False)
                    state = "normal"
                else:
                    buf += c
            elif c == "\\" and j + 1 < len(line):
                buf += "__"  # an escaped character is never an expansion
                j += 1
            elif state == "double":
                if c == '"':
                    state = "normal"
                buf += c
            elif c == "'":
                flush(True)
                state = "single"
            elif c == '"':
                state = "double"
                buf += c
            elif c == "#" and (j == 0 or line[j - 1] in " \t;|&("):
                break  # comment to the end of the line
            else:
                m = re.match(r"<<-?[ \t]*(['\"]?)([A-Za-z_]\w*)\1", line[j:])
                if m and not line[j:].startswith("<<<") and (j == 0 or line[j - 1] != "<"):
                    heredocs.append((m.group(2), bool(m.group(1))))
                    buf += m.group(0)
                    j += len(m.group(0))
                    continue
                buf += c
            j += 1
        flush(state != "single")
        i += 1
        for delim, quoted in heredocs:  # heredoc bodies follow the line that opened them
            while i < len(lines) and lines[i].strip() != delim:
                spans.append((i + 1, lines[i], not quoted))
                i += 1
            i += 1
    return spans


def directive_value(directives, *names):
    """The last value given for any of the option names (`--nodes=2`, `--nodes 2`, `-N 2`, `-N2`)."""
    value = None
    for _, text in directives:
        for name in names:
            m = re.search(rf"(?:^|\s){re.escape(name)}(?:=|\s+|(?<=^-\w)|(?<=\s-\w))([^\s#]+)", text)
            if m:
                value = m.group(1)
    return value


def gpus_per_node(directives) -> int | None:
    value = directive_value(directives, "--gpus-per-node")
    if value is None:
        gres = directive_value(directives, "--gres")
        m = re.search(r"gpu(?::[\w.-]+)*?:(\d+)\b", gres or "")
        value = m.group(1) if m else ("1" if gres and re.search(r"\bgpu\b", gres) else None)
    if value is None:
        return None
    m = re.search(r"(\d+)$", value)
    return int(m.group(1)) if m else None


def as_int(value, default=None):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def lint_text(path: Path, text: str, folder: Path) -> list[Finding]:
    findings: list[Finding] = []
    disabled = set()
    for m in re.finditer(r"sbatch-lint:\s*disable=([\w,]+)", text):
        disabled.update(m.group(1).split(","))
    lines = text.split("\n")

    # --- directives: read until the first command, exactly like sbatch -------------------------------
    directives, first_command = [], None
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if n == 1 and stripped.startswith("#!"):
            continue
        if re.match(r"#SBATCH\s", line) or line.rstrip() == "#SBATCH":
            if first_command is None:
                directives.append((n, line[len("#SBATCH"):].strip()))
            else:
                findings.append(Finding(path, n, "SB002", f"#SBATCH after the first command (line {first_command}) "
                                        "is ignored by sbatch: move it above every command"))
            continue
        looks_like_directive = re.match(r"\s*#+\s*sbatch\s+-", line, re.I) or re.match(r"\s*#+\s*SBATCH\b", line)
        if looks_like_directive and not line.startswith("##SBATCH"):
            findings.append(Finding(path, n, "SB001", f"'{stripped[:40]}' is not a directive (Slurm reads only lines "
                                    "starting exactly with '#SBATCH'); it is silently ignored"))
            continue
        if stripped and not stripped.startswith("#") and first_command is None:
            first_command = n

    spans = shell_scan(text)
    code_by_line: dict[int, str] = {}
    for n, chunk, _ in spans:
        code_by_line[n] = code_by_line.get(n, "") + chunk + " "
    # logical lines: join backslash continuations so a command and its options are seen together
    logical, current, start = [], "", None
    for n, line in enumerate(lines, 1):
        code = code_by_line.get(n, "")
        if start is None:
            start = n
        current += " " + code
        if not line.rstrip().endswith("\\"):
            logical.append((start, current))
            current, start = "", None
    code_all = " ".join(c for _, c in logical)

    # --- SB005: per-task variables expanded in the batch shell -------------------------------------------
    names = "|".join(PER_TASK_VARS)
    for n, chunk, expanding in spans:
        if expanding:
            for m in re.finditer(rf"\$\{{?({names})\b", chunk):
                findings.append(Finding(path, n, "SB005", f"${m.group(1)} expands once in the batch shell (same value "
                                        "for every task); use single quotes (srun bash -c '... $"
                                        f"{m.group(1)} ...') or \\${m.group(1)} so each task expands it"))

    # --- SB003 double launch, SB007 srun missing -----------------------------------------------------------
    nodes = as_int((directive_value(directives, "--nodes", "-N") or "1").split("-")[0], 1)
    tasks_per_node = as_int(directive_value(directives, "--ntasks-per-node"))
    ntasks = as_int(directive_value(directives, "--ntasks", "-n"))
    gpn = gpus_per_node(directives)
    has_srun = re.search(r"(^|[\s;&|(])srun\s", code_all) is not None
    if (nodes > 1 or (tasks_per_node or 1) > 1 or (ntasks or 1) > 1) and not has_srun:
        findings.append(Finding(path, first_command or 1, "SB007", f"{nodes} node(s) x {tasks_per_node or ntasks or 1} "
                                "task(s) requested but nothing runs srun: the script runs once, on the first node, "
                                "and the job hangs at 'Initializing distributed'"))
    for n, code in logical:
        launcher = re.search(r"\btorchrun\b|torch\.distributed\.(run|launch)\b", code)
        if not launcher:
            continue
        if "torch.distributed.launch" in launcher.group(0):
            findings.append(Finding(path, n, "SB102", "torch.distributed.launch is deprecated (and passes "
                                    "--local_rank): use torchrun / python -m torch.distributed.run"))
        m = re.search(r"--nproc[-_]per[-_]node(?:=|\s+)(\S+)", code)
        nproc_text = m.group(1).strip("\"'") if m else "1"
        var = re.fullmatch(r"\$\{?(\w+)\}?", nproc_text)
        assigned = var and re.search(rf"(?:^|[\s;])(?:export\s+)?{var.group(1)}=(\S+)", code_all)
        if assigned:  # one level of `nproc=${SLURM_GPUS_ON_NODE:-1}` / `NPROC=8`
            nproc_text = assigned.group(1).strip("\"'")
        nproc = as_int(nproc_text)
        if nproc is None and "GPUS" in nproc_text.upper():
            nproc = gpn
        srun_here = re.search(r"(^|[\s;&|(])srun\s(.*)", code)
        if srun_here:
            step = srun_here.group(2)
            per_node = as_int((re.search(r"--ntasks-per-node[= ](\d+)", step) or [None, None])[1])
            step_n = as_int((re.search(r"(?:--ntasks[= ]|-n\s*)(\d+)", step) or [None, None])[1])
            step_nodes = as_int((re.search(r"(?:--nodes[= ]|-N\s*)(\d+)", step) or [None, None])[1]) or nodes
            if per_node is None:
                per_node = -(-step_n // step_nodes) if step_n else (tasks_per_node or
                                                                     (-(-ntasks // nodes) if ntasks else 1))
        else:
            per_node = 1
        if nproc is not None and gpn is not None and nproc * per_node > gpn:
            findings.append(Finding(path, n, "SB003", f"double launch: {per_node} task(s) per node x torchrun "
                                    f"--nproc-per-node {nproc} = {nproc * per_node} processes per node for {gpn} "
                                    "GPU(s) (use --ntasks-per-node=1 with torchrun)"))
        elif per_node > 1 and (nproc is None or nproc > 1):
            findings.append(Finding(path, n, "SB003", f"double launch: {per_node} srun tasks per node each start "
                                    "torchrun with several processes (use --ntasks-per-node=1 with torchrun)"))
        if not srun_here and nodes > 1:
            findings.append(Finding(path, n, "SB007", f"torchrun without srun in a {nodes}-node job runs on the "
                                    "first node only: the others never join the rendezvous (use srun ... torchrun)"))

    # --- SB004: referenced scripts that do not exist -------------------------------------------------------
    seen = set()
    for n, code in logical:
        code = re.sub(r"\b(echo|printf)\b[^;&|}]*", " ", code)  # messages mention scripts, they do not run them
        code = re.sub(r"\d*>>?\|?\s*\S+", " ", code)  # output files are created, not read
        for m in re.finditer(r"(?<![\w$/.~{-])((?:\.{1,2}/)?[\w][\w./-]*\.(?:py|sh|sbatch))(?![\w/])", code):
            ref = m.group(1)
            if (n, ref) in seen or ref.startswith("-"):
                continue
            seen.add((n, ref))
            if not (folder / ref).exists():
                findings.append(Finding(path, n, "SB004", f"'{ref}' does not exist (relative to {folder}); the job "
                                        "would fail after waiting in the queue"))

    # --- SB101: fixed ports --------------------------------------------------------------------------------
    for n, code in logical:
        m = (re.search(r"\bMASTER_PORT=(\d+)\b", code) or re.search(r"--master[-_]port(?:=|\s+)(\d+)", code)
             or re.search(r"--rdzv[-_]endpoint(?:=|\s+)\S*?:(\d+)\b", code))
        if m:
            findings.append(Finding(path, n, "SB101", f"fixed port {m.group(1)}: two jobs on one node collide "
                                    "(EADDRINUSE); derive it from the job id, e.g. "
                                    "MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))"))

    # --- SB006: bash -n ------------------------------------------------------------------------------------
    bash = shutil.which("bash")
    if bash:
        proc = subprocess.run([bash, "-n"], input=text, text=True, capture_output=True)
        if proc.returncode != 0:
            m = re.search(r"line (\d+)", proc.stderr)
            findings.append(Finding(path, int(m.group(1)) if m else 1, "SB006",
                                    "bash -n: " + proc.stderr.strip().replace("bash: ", "")))

    return sorted((f for f in findings if f.code not in disabled), key=lambda f: (f.line, f.code))


def lint_file(path: Path) -> list[Finding]:
    return lint_text(path, path.read_text(errors="replace"), path.resolve().parent)


def find_scripts(paths) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*.sbatch") if not SKIP_DIRS.intersection(f.relative_to(p).parts))
        else:
            found.append(p)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sbatch files or folders (searched for *.sbatch)")
    parser.add_argument("--strict", action="store_true", help="warnings fail too")
    args = parser.parse_args(argv)
    scripts = find_scripts(args.paths)
    if not scripts:
        print("sbatch-lint: no *.sbatch files found", file=sys.stderr)
        return 2
    failed = 0
    count = 0
    for script in scripts:
        for finding in lint_file(script):
            print(finding)
            count += 1
            failed |= finding.is_error or args.strict
    print(f"sbatch-lint: {len(scripts)} file(s), {count} finding(s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
