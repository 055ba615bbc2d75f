"""Which rank is behind, in which collective: a short report from torch's Flight Recorder dumps of a hung job.

usage: python fr_report.py DIR [--prefix nccl_trace_rank_] [--torchfrtrace PATH|off]

Every rank keeps its last collectives in a ring buffer (TORCH_FR_BUFFER_SIZE, 2000 by default in torch 2.13),
each with its process group, its sequence id in that group (`collective_seq_id`), its name (`nccl:all_reduce`)
and its state (scheduled, started, completed). When NCCL's watchdog times out, TORCH_NCCL_DUMP_ON_TIMEOUT=1
makes every rank write its buffer to TORCH_FR_DUMP_TEMP_FILE<rank> -- a pickled dict; the multi-node templates
put these files in checkpoints/$RUN/debug/$SLURM_JOB_ID/. The ranks all count the same collectives in a group, so
a rank whose last sequence id is lower than the others' is behind: the others wait for it in the collective it
never entered. Same ids but different collectives is a desync (the ranks took different code paths); every rank
inside the same collective, not completed, is the collective itself hanging (network, NCCL).

gloo records into the same buffer (torch 2.13) but nothing dumps it on a timeout: NCCL's watchdog writes the files.
A gloo dump taken by hand (torch._C._distributed_c10d._dump_fr_trace()) reads here; torch 2.13's torchfrtrace stops
on one with KeyError ('0', 0) (its pg_config is keyed '', its entries '0').

Then, where torch's own analyser `torchfrtrace` is installed (beside this python or on PATH), its output follows
(--torchfrtrace off skips it). Standard library only; the dumps are pickles: read only your own job's files.
Exit 0: a report; 2: no dumps to read (one line).
"""

import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path


TORCHFRTRACE_TIMEOUT = 300  # seconds for torch's own analyser, run after the report


class BadInput(Exception):
    """Nothing to report on: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def load(folder: Path, prefix: str) -> dict[int, dict]:
    """rank -> its dump, from the files <prefix><rank> in `folder`."""
    if not folder.is_dir():
        raise BadInput(f"{folder} is not a directory")
    dumps = {}
    for path in sorted(folder.iterdir()):
        found = re.fullmatch(re.escape(prefix) + r"(\d+)", path.name)
        if not found:
            continue
        try:
            with open(path, "rb") as f:
                dump = pickle.load(f)
            dumps[int(found.group(1))] = {"entries": list(dump["entries"]), "version": dump.get("version", "?"),
                                          "pg_config": dict(dump.get("pg_config", {}))}
        except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise BadInput(f"{path} is not a Flight Recorder dump ({type(e).__name__}: {e})") from e
    if not dumps:
        raise BadInput(f"no Flight Recorder dumps ({prefix}<rank>) in {folder}: NCCL's watchdog writes them on a "
                       f"collective timeout with TORCH_NCCL_DUMP_ON_TIMEOUT=1 and TORCH_FR_DUMP_TEMP_FILE={prefix} "
                       f"under this folder (gloo dumps nothing on its own)")
    return dumps


def ranks_text(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    ranks, parts = sorted(ranks), []
    for r in ranks:
        if parts and r == parts[-1][1] + 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def caller(entry: dict) -> str:
    """The innermost frame of the job's own code that issued the collective: ` from train_step (recipe.py:88)`;
    torch and the installed packages between them (typing_extensions' deprecation wrapper) are skipped."""
    for frame in entry.get("frames") or []:
        filename = frame.get("filename", "")
        if not re.search(r"[/\\](torch|site-packages|dist-packages)[/\\]", filename):
            return f" from {frame.get('name')} ({os.path.basename(filename)}:{frame.get('line')})"
    return ""


def describe(entry: dict) -> str:
    return f"#{entry['collective_seq_id']} {entry['profiling_name']}"


def expected_ranks(dumps: dict[int, dict]) -> set[int]:
    """The ranks the process groups name (pg_config 'ranks', e.g. '[0, 1]'), or those that wrote a dump."""
    ranks = set(dumps)
    for dump in dumps.values():
        for config in dump["pg_config"].values():
            ranks |= {int(r) for r in re.findall(r"\d+", str(config.get("ranks", "")))}
    return ranks


def group_report(name: str, last: dict[int, dict]) -> str:
    """One line for one process group, from each rank's last collective in it."""
    top = max(e["collective_seq_id"] for e in last.values())
    behind = {r: e for r, e in last.items() if e["collective_seq_id"] < top}
    ahead = {r: e for r, e in last.items() if e["collective_seq_id"] == top}
    waiting = next(iter(ahead.values()))
    if behind:
        lines = []
        for r, e in sorted(behind.items()):
            gap = top - e["collective_seq_id"]
            lines.append(f"rank {r} is behind in process group {name}: its last collective is {describe(e)} "
                         f"({e['state']}){caller(e)}, {gap} behind ranks {ranks_text(ahead)}, which wait in "
                         f"{describe(waiting)} ({waiting['state']}){caller(waiting)}")
        return "\n".join(lines)
    kinds = {(e["profiling_name"], str(e.get("input_sizes"))) for e in last.values()}
    if len(kinds) > 1:
        said = ", ".join(f"rank {r} {e['profiling_name']} {e.get('input_sizes')}" for r, e in sorted(last.items()))
        return f"ranks disagree in process group {name} at #{top} (a desync: different code paths): {said}"
    pending = sorted(r for r, e in last.items() if e["state"] != "completed")
    if pending:
        return (f"every rank entered {describe(waiting)} in process group {name}; not completed on ranks "
                f"{ranks_text(pending)}: the collective itself hangs (network, NCCL), not one rank")
    return f"process group {name}: every rank's last collective is {describe(waiting)}: no rank is behind"


def report(dumps: dict[int, dict], folder: Path) -> list[str]:
    versions = sorted({str(d["version"]) for d in dumps.values()})
    lines = [f"{len(dumps)} rank dumps in {folder} (ranks {ranks_text(dumps)}, Flight Recorder format "
             f"{'/'.join(versions)})"]
    missing = expected_ranks(dumps) - set(dumps)
    if missing:
        lines.append(f"no dump from ranks {ranks_text(missing)}: dead before the watchdog fired, or on a node "
                     f"that wrote elsewhere -- look at them first")
    groups: dict[str, dict[int, dict]] = {}  # process group -> rank -> its last collective there
    for rank, dump in dumps.items():
        for entry in dump["entries"]:
            if entry.get("is_p2p") or entry.get("collective_seq_id") is None:
                continue
            pg = entry.get("process_group", ("?", ""))
            name = f"{pg[0]} ({pg[1]})" if pg[1] else str(pg[0])
            best = groups.setdefault(name, {}).get(rank)
            if best is None or entry["collective_seq_id"] >= best["collective_seq_id"]:
                groups[name][rank] = entry
    if not groups:
        lines.append("no collective recorded (an empty buffer: TORCH_FR_BUFFER_SIZE=0?)")
    for name, last in sorted(groups.items()):
        lines.append(group_report(name, last))
    return lines


def default_torchfrtrace() -> str | None:
    beside = Path(sys.executable).parent / "torchfrtrace"
    return str(beside) if beside.exists() else shutil.which("torchfrtrace")


def main(argv=None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the folder of the dumps (checkpoints/$RUN/debug/$SLURM_JOB_ID)")
    parser.add_argument("--prefix", default="nccl_trace_rank_", help="the dumps' names before the rank")
    parser.add_argument("--torchfrtrace", help="torch's analyser to run after the report (default: found beside "
                                               "this python or on PATH); 'off' skips it")
    try:
        args = parser.parse_args(argv)
        dumps = load(args.dir, args.prefix)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(report(dumps, args.dir)), flush=True)
    tool = default_torchfrtrace() if args.torchfrtrace is None else args.torchfrtrace
    if tool and tool != "off":
        print(f"--- {tool} {args.dir} --prefix {args.prefix} ---", flush=True)
        try:  # torch's analyser must not turn a finished report into a hang
            proc = subprocess.run([tool, str(args.dir), "--prefix", args.prefix], capture_output=True, text=True,
                                  timeout=TORCHFRTRACE_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"(torchfrtrace did not end in {TORCHFRTRACE_TIMEOUT} s; the report above stands)")
            return 0
        print(proc.stdout + proc.stderr, end="")
        if proc.returncode != 0:
            print(f"(torchfrtrace exit {proc.returncode}; the report above stands)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
