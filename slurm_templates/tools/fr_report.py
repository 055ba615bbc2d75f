"""Which rank is behind, in which collective: a short report from torch's Flight Recorder dumps of a hung job.

usage: python fr_report.py DIR [--prefix nccl_trace_rank_] [--world-size N] [--torchfrtrace PATH|off]

Every rank keeps its last collectives in a ring buffer (TORCH_FR_BUFFER_SIZE, 2000 by default in torch 2.13),
each with its process group, its sequence id in that group (`collective_seq_id`), its name (`nccl:all_reduce`)
and its state (scheduled, started, completed). When NCCL's watchdog times out, TORCH_NCCL_DUMP_ON_TIMEOUT=1
makes every rank write its buffer to TORCH_FR_DUMP_TEMP_FILE<rank> -- a pickled dict; the multi-node templates
put these files in checkpoints/$RUN/debug/$SLURM_JOB_ID/. The ranks all count the same collectives in a group, so
a rank whose last sequence id is lower than the others' is behind: the others wait for it in the collective it
never entered. Same ids but different collectives is a desync (the ranks took different code paths); every rank
inside the same collective, not completed, is the collective itself hanging (network, NCCL).

A rank of the job without a dump is the first suspect: it hung before it could dump (stopped, or stuck where
nothing times out) or died. The job's ranks come from the dumps' process groups (pg_config, torch 2.13: NCCL has
a row per group with its ranks; gloo one row keyed '' with the default group's ranks, '[]' once the rank is in a
second group), else from --world-size.

gloo records into the same buffer (torch 2.13), every entry left 'scheduled', but nothing dumps it on a timeout:
the recipes' toolkit.HANG does (CONTRACT C13), for each rank that timed out. torch 2.13's torchfrtrace stops on a
gloo dump with KeyError ('0', 0) (its pg_config is keyed '', its entries '0').

toolkit.HANG's stacks beside the dumps get a line each: rank<N>.stack.txt (a rank that timed out in a collective:
where it waited) and rank<N>.stalled.txt (no step for --timeout: where its main thread was), at the innermost
frame and, under a library's, the job's own.

Then, where torch's own analyser `torchfrtrace` is installed (beside this python or on PATH), its output follows
(--torchfrtrace off skips it). Standard library only; the dumps are pickles: read only your own job's files.
Exit 0: a report; 2: neither dumps nor stacks to read (one line).
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
STACK_FILE = re.compile(r"rank(\d+)\.(stack|stalled)\.txt")  # toolkit.HANG's names (C13)
# a frame of a traceback (`File "f.py", line 3, in name`) or of faulthandler's dump (`File "f.py", line 3 in name`)
FRAME = re.compile(r'^\s*File "(.+)", line (\d+),? in (.+)$', re.M)
# torch, installed packages, the standard library: the job's own code is elsewhere
LIBRARY = re.compile(r"[/\\](torch|site-packages|dist-packages)[/\\]|[/\\]lib[/\\]python3[.\d]*[/\\]|^<frozen ")


class BadInput(Exception):
    """Nothing to report on: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def load(folder: Path, prefix: str) -> dict[int, dict]:
    """rank -> its dump, from the files <prefix><rank> in `folder` (none: {})."""
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
    return dumps


def no_dumps(folder: Path, prefix: str) -> str:
    return (f"no Flight Recorder dumps ({prefix}<rank>) in {folder}: NCCL's watchdog writes them on a collective "
            f"timeout with TORCH_NCCL_DUMP_ON_TIMEOUT=1 and TORCH_FR_DUMP_TEMP_FILE={prefix} under this folder "
            f"(gloo dumps nothing on its own; the recipes dump a rank that timed out)")


def ranks_text(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    ranks, parts = sorted(ranks), []
    for r in ranks:
        if parts and r == parts[-1][1] + 1:
            parts[-1][1] = r
        else:
            parts.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def ranks_word(ranks) -> str:
    """[1] -> 'rank 1'; [0, 2, 3] -> 'ranks 0,2-3'."""
    return f"rank{'s' if len(ranks) > 1 else ''} {ranks_text(ranks)}"


def frame_text(name, filename, line) -> str:
    return f"{name} ({os.path.basename(filename)}:{line})"


def caller(entry: dict) -> str:
    """The innermost frame of the job's own code that issued the collective: ` from train_step (recipe.py:88)`;
    torch and the installed packages between them (typing_extensions' deprecation wrapper) are skipped."""
    for frame in entry.get("frames") or []:
        filename = frame.get("filename", "")
        if not LIBRARY.search(filename):
            return f" from {frame_text(frame.get('name'), filename, frame.get('line'))}"
    return ""


def describe(entry: dict) -> str:
    return f"#{entry['collective_seq_id']} {entry['profiling_name']}"


def named_ranks(pg_config: dict) -> set[int]:
    """The ranks a dump's process groups name (pg_config 'ranks', e.g. '[0, 1]')."""
    return {int(r) for config in pg_config.values() for r in re.findall(r"\d+", str(config.get("ranks", "")))}


def stacks_world_size(stacks: dict) -> int | None:
    """The job's size as toolkit.HANG's stack files give it in their first line ('rank 0 of 2, pid ...')."""
    sizes = {int(m.group(1)) for text in stacks.values() if (m := re.match(r"rank \d+ of (\d+),", text))}
    return max(sizes) if sizes else None


def job_ranks(dumps: dict[int, dict], others, world_size: int | None,
              said_by: str = "by --world-size") -> tuple[set[int], str | None]:
    """The job's ranks, 0 to the highest one known, and where that comes from (None: nothing says how many ranks
    the job has, only which ranks left a file). Global ranks are 0..N-1: a rank named anywhere implies those below."""
    named, source = set(), None
    for dump in dumps.values():
        named |= named_ranks(dump["pg_config"])
    if named:
        source = "by the process groups' ranks in the dumps"
    if world_size:
        named |= set(range(world_size))
        source = said_by
    known = named | set(dumps) | set(others)
    return set(range(max(known) + 1)) if known else set(), source


def group_members(name: str, desc: str, dumps: dict[int, dict], world: set[int], source) -> tuple[set[int], bool]:
    """The ranks of one process group, and whether that is all of them: the default group is the job; another
    group has the ranks of its own pg_config row where the dumps have one (NCCL's, keyed by the group's name)."""
    if desc == "default_pg" or name == "0":
        return world, source is not None
    rows = set().union(*(named_ranks({name: d["pg_config"][name]}) for d in dumps.values() if name in d["pg_config"]))
    return rows, bool(rows)


def group_report(name: str, last: dict[int, dict], absent: set[int] = frozenset(), complete: bool = True) -> str:
    """Lines for one process group, from each rank's last collective in it; `absent`: its ranks without a dump;
    `complete`: whether the dumps say which ranks the group has."""
    top = max(e["collective_seq_id"] for e in last.values())
    behind = {r: e for r, e in last.items() if e["collective_seq_id"] < top}
    ahead = {r: e for r, e in last.items() if e["collective_seq_id"] == top}
    waiting = next(iter(ahead.values()))
    where = f"{describe(waiting)} ({waiting['state']}){caller(waiting)}"
    lines = []
    for r, e in sorted(behind.items()):
        gap = top - e["collective_seq_id"]
        lines.append(f"rank {r} is behind in process group {name}: its last collective is {describe(e)} "
                     f"({e['state']}){caller(e)}, {gap} behind ranks {ranks_text(ahead)}, which wait in {where}")
    kinds = {(e["profiling_name"], str(e.get("input_sizes"))) for e in last.values()}
    if behind:
        pass
    elif len(kinds) > 1:
        said = ", ".join(f"rank {r} {e['profiling_name']} {e.get('input_sizes')}" for r, e in sorted(last.items()))
        lines.append(f"ranks disagree in process group {name} at #{top} (a desync: different code paths): {said}")
    elif not complete:
        lines.append(f"the ranks that left a dump ({ranks_text(ahead)}) wait in {where} in process group {name}; "
                     f"the dumps do not say which other ranks it has (a rank without a dump is the one to look at)")
    elif not absent:
        pending = sorted(r for r, e in last.items() if e["state"] != "completed")
        if pending:
            lines.append(f"every rank entered {describe(waiting)} in process group {name}; not completed on ranks "
                         f"{ranks_text(pending)}: the collective itself hangs (network, NCCL), not one rank")
        else:
            lines.append(f"process group {name}: every rank's last collective is {describe(waiting)}: no rank is "
                         f"behind")
    if absent:
        pronoun = "them" if len(absent) > 1 else "it"
        verb = "wait" if len(ahead) > 1 else "waits"
        lines.append(f"{ranks_word(absent)} left no dump; in process group {name} {ranks_word(ahead)} {verb} for "
                     f"{pronoun} in {where}")
    return "\n".join(lines)


def stack_summary(rank: int, kind: str, text: str) -> str:
    """One line from a stack file of toolkit.HANG: where the rank waited (stack) or was stuck (stalled)."""
    head, _, body = text.partition("\n")
    if kind == "stack":  # a traceback: the outermost frame first
        frames = [(n, f, ln) for f, ln, n in FRAME.findall(body.split("every thread now:")[0])][::-1]
        step = re.search(r", step (\d+),", head)
        error = re.search(r"\d\d:\d\d:\d\d: (?:\[[^\]]*\] ?)?(.*)", head)
        said = f"rank {rank} timed out{f' at step {step.group(1)}' if step else ''}"
        tail = f": {error.group(1)}" if error and error.group(1) else ""
    else:  # faulthandler: the newest thread first, the main thread last; in each, the innermost frame first
        main = body.split("every thread:")[-1].strip().split("\n\n")[-1]
        frames = [(n, f, ln) for f, ln, n in FRAME.findall(main)]
        stalled = re.search(r"no step since step \d+ for \d+ s", head)
        said, tail = f"rank {rank} stalled{f', {stalled.group(0)}' if stalled else ''}:", ""
    if not frames:
        return f"{said} no frame in rank{rank}.{kind}.txt"
    where = f"in {frame_text(*frames[0])}"
    own = next((fr for fr in frames if not LIBRARY.search(fr[1])), None)
    if own and own != frames[0]:
        where += f", from {frame_text(*own)}"
    return f"{said} {where}{tail} (rank{rank}.{kind}.txt)"


def load_stacks(folder: Path) -> dict[tuple[int, str], str]:
    """(rank, 'stack' or 'stalled') -> the file's text."""
    stacks = {}
    for path in folder.iterdir():
        found = STACK_FILE.fullmatch(path.name)
        if found:
            with open(path, errors="replace") as f:
                stacks[int(found.group(1)), found.group(2)] = f.read()
    return stacks


def report(dumps: dict[int, dict], folder: Path, stacks=None, world_size: int | None = None,
           prefix: str = "nccl_trace_rank_") -> list[str]:
    stacks = stacks or {}
    if world_size:
        world, source = job_ranks(dumps, {rank for rank, _ in stacks}, world_size)
    else:  # gloo's dump names no ranks once a second group exists ('[]'): the stack files still say how many
        world, source = job_ranks(dumps, {rank for rank, _ in stacks}, stacks_world_size(stacks),
                                  "by the stack files' first lines")
    if dumps:
        versions = sorted({str(d["version"]) for d in dumps.values()})
        job = (f" of the job's {ranks_text(world)}, {source}" if source else
               "; the job's ranks are unknown: the dumps name none (--world-size N names the ranks without one)")
        lines = [f"{len(dumps)} rank dumps in {folder} (ranks {ranks_text(dumps)}{job}, Flight Recorder format "
                 f"{'/'.join(versions)})"]
    else:
        lines = [no_dumps(folder, prefix)]
    missing = world - set(dumps)
    if missing and dumps:
        stuck = sorted(r for r in missing if (r, "stalled") in stacks)
        lines.append(f"no dump from {ranks_word(missing)}: the likely culprit{'s' if len(missing) > 1 else ''} -- "
                     f"hung before dumping (stopped, or stuck where nothing times out) or dead; look at "
                     f"{'them' if len(missing) > 1 else 'it'} first" +
                     (f" ({ranks_word(stuck)}: alive and stuck, the stalled stack below)" if stuck else ""))
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
    if dumps and not groups:
        lines.append("no collective recorded (an empty buffer: TORCH_FR_BUFFER_SIZE=0?)")
    for name, last in sorted(groups.items()):
        pg = next(iter(last.values())).get("process_group", ("?", ""))
        members, complete = group_members(str(pg[0]), pg[1], dumps, world, source)
        lines.append(group_report(name, last, (members - set(dumps)), complete))
    for (rank, kind), text in sorted(stacks.items(), key=lambda item: (item[0][0], item[0][1] != "stack")):
        lines.append(stack_summary(rank, kind, text))
        timed_out_at = re.search(r", step (\d+),", stacks.get((rank, "stack"), "").partition("\n")[0])
        if kind == "stalled" and timed_out_at and f"no step since step {timed_out_at.group(1)} " in text:
            lines[-1] += " -- the same wait: it timed out in a collective at that step"  # its watcher fired too
    return lines


def default_torchfrtrace() -> str | None:
    beside = Path(sys.executable).parent / "torchfrtrace"
    return str(beside) if beside.exists() else shutil.which("torchfrtrace")


def main(argv=None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="the folder of the dumps (checkpoints/$RUN/debug/$SLURM_JOB_ID)")
    parser.add_argument("--prefix", default="nccl_trace_rank_", help="the dumps' names before the rank")
    parser.add_argument("--world-size", type=int, help="the job's number of ranks, where the dumps do not say it "
                                                       "(gloo's, once a rank is in a second process group)")
    parser.add_argument("--torchfrtrace", help="torch's analyser to run after the report (default: found beside "
                                               "this python or on PATH); 'off' skips it")
    try:
        args = parser.parse_args(argv)
        if args.world_size is not None and args.world_size < 1:
            raise BadInput(f"--world-size must be 1 or more, not {args.world_size}")
        dumps = load(args.dir, args.prefix)
        stacks = load_stacks(args.dir)
        if not dumps and not stacks:
            raise BadInput(no_dumps(args.dir, args.prefix) + " -- nor stacks (rank<N>.stack.txt, rank<N>.stalled.txt)")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = report(dumps, args.dir, stacks, args.world_size, args.prefix)
    print("\n".join(lines), flush=True)
    tool = default_torchfrtrace() if args.torchfrtrace is None else args.torchfrtrace
    if dumps and tool and tool != "off":
        command = [tool, str(args.dir), "--prefix", args.prefix]
        if any(line.startswith("no dump from ") for line in lines):
            command.append("--allow-incomplete-ranks")  # else it stops at "Missing dump files from ranks"
        print(f"--- {' '.join(command)} ---", flush=True)
        try:  # torch's analyser must not turn a finished report into a hang
            proc = subprocess.run(command, capture_output=True, text=True, timeout=TORCHFRTRACE_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"(torchfrtrace did not end in {TORCHFRTRACE_TIMEOUT} s; the report above stands)")
            return 0
        print(proc.stdout + proc.stderr, end="")
        if proc.returncode != 0:
            print(f"(torchfrtrace exit {proc.returncode}; the report above stands)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
