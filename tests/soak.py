"""The fault soak (issue #9, item 5): N random injections across launch modes, each run relaunched as the cluster
would, every outcome classified (tests/faults.py). `make soak` runs it; tests/test_soak.py runs a fixed handful.

    .venvs/tests/bin/python tests/soak.py --n 50 --seed 1 --out runs/soak
    .venvs/tests/bin/python tests/soak.py --n 8 --seed 3 --modes pytorch/torchrun,lightning/single --injections usr1

Writes DIR/soak.json (every run: folder, mode, injection, at-time, launches, outcome, reason, time to recover, and
each launch's exit codes, tracebacks, error lines, snapshots and leftovers) and DIR/soak.md (the table), after
every run, so an interrupted soak keeps what it did. Exit 1 if any run is a FAIL.
"""

import argparse
import datetime
import json
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import faults
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50, help="runs (each: one injection, then relaunches)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/soak"))
    p.add_argument("--folders", default="pytorch,lightning,monai,modulus,jax,deepspeed,nemo,ray")
    p.add_argument("--modes", default="", help="folder/mode keys or mode names (default: every mode of --folders)")
    p.add_argument("--injections", default=",".join(faults.INJECTIONS))
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no new run after this long (the report then says how many ran)")
    return p.parse_args(argv)


def chosen_modes(args) -> list:
    folders, wanted = args.folders.split(","), [m for m in args.modes.split(",") if m]
    modes = [m for m in faults.MODES.values()
             if m.folder in folders and (not wanted or m.key in wanted or m.name in wanted)]
    if not modes:
        sys.exit(f"error: no mode matches --folders {args.folders} --modes {args.modes}")
    return modes


def plan(modes, injections, n, seed):
    """n (mode, injection, extra) draws that cover every pair before any repeats: the pairs in a shuffled order,
    reshuffled every round. Half the runs use 2 DataLoader workers (signals reach them too)."""
    rng = random.Random(seed)
    pairs = [(m, i) for m in modes for i in m.injections if i in injections]
    runs = []
    while len(runs) < n:
        rng.shuffle(pairs)
        for mode, kind in pairs[: n - len(runs)]:
            runs.append((mode, kind, ("--num-workers", "2") if rng.random() < 0.5 else ()))
    return runs


def table(records) -> list[str]:
    """injection x mode -> outcome counts and the median time to recover."""
    lines = ["| injection | mode | runs | RECOVERED | CLEAR-ERROR | FAIL | MISSED | median time to recover (s) |",
             "|---|---|---|---|---|---|---|---|"]
    cells = {}
    for r in records:
        cells.setdefault((r["injection"], f"{r['folder']}/{r['mode']}"), []).append(r)
    for (kind, mode), rs in sorted(cells.items(), key=lambda kv: (faults.INJECTIONS.index(kv[0][0]), kv[0][1])):
        counts = [sum(r["outcome"] == o for r in rs) for o in faults.OUTCOMES]
        ttr = [r["time_to_recover_s"] for r in rs if r["time_to_recover_s"] is not None]
        lines.append(f"| {kind} | {mode} | {len(rs)} | " + " | ".join(map(str, counts)) +
                     (f" | {statistics.median(ttr):.1f} |" if ttr else " | - |"))
    totals = [sum(r["outcome"] == o for r in records) for o in faults.OUTCOMES]
    ttr = [r["time_to_recover_s"] for r in records if r["time_to_recover_s"] is not None]
    lines.append(f"| **all** | | {len(records)} | " + " | ".join(map(str, totals)) +
                 (f" | {statistics.median(ttr):.1f} |" if ttr else " | - |"))
    return lines


def write_report(out: Path, meta: dict, records: list) -> list[str]:
    launches = [lr for r in records for lr in r["launch_records"]]
    summary = {
        "runs": len(records), **{o: sum(r["outcome"] == o for r in records) for o in faults.OUTCOMES},
        "corrupt_snapshots": sum(len(lr["corrupt"]) for lr in launches),
        "launches_with_leftovers": sum(bool(lr["leftovers"]) for lr in launches),
        "hangs": sum(lr["hang"] for lr in launches),
        "launches_whose_rest_the_cluster_killed": sum(bool(lr["killed_at_step_end"]) for lr in launches),
        "interrupted_saves_left_as_tmp": sum(bool(lr["temporaries"]) for lr in launches),
    }
    (out / "soak.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=1))
    rows = table(records)
    md = [f"# Fault soak: {summary['runs']} runs, seed {meta['seed']}", "",
          f"`{meta['command']}` — {meta['date']} on {meta['host']} (torch {meta['torch']}), {meta['minutes']} min.",
          "", *rows, "",
          f"Corrupt snapshots: {summary['corrupt_snapshots']}. Launches that left processes: "
          f"{summary['launches_with_leftovers']}. Hangs: {summary['hangs']}. Launches whose launcher or a task "
          f"died, the rest of the step then killed as Slurm does: {summary['launches_whose_rest_the_cluster_killed']}."
          f" Launches whose kill left a "
          f"`*.tmp` (an interrupted atomic save, never resumed from): {summary['interrupted_saves_left_as_tmp']}.",
          "", "Each run: a fresh run of the mode, one injection at a step drawn between its first snapshot and "
          "90 % of the uninterrupted run's steps (fired once rank 0 has logged it), then relaunched while it "
          "exits non-zero (at most "
          f"{faults.MAX_RELAUNCHES} times). RECOVERED: final weights equal the uninterrupted run's (bit-exact, or "
          "within the mode's stated tolerance); "
          "CLEAR-ERROR: exit non-zero with one `error:` line and no traceback; MISSED: the run ended before the "
          "step drawn. Workload: `" + " ".join(faults.WORKLOAD) + "` (or the mode's own), 2 ranks where "
          "distributed.", ""]
    fails = [r for r in records if r["outcome"] == "FAIL"]
    if fails:
        md += ["## FAIL", ""] + [f"- run {r['run']}: {r['folder']}/{r['mode']} {r['injection']} at step {r['at_step']} "
                                 f"{' '.join(r['extra'])}: {r['reason']}" for r in fails]
    (out / "soak.md").write_text("\n".join(md) + "\n")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = chosen_modes(args)
    injections = [i for i in args.injections.split(",") if i]
    if unknown := set(injections) - set(faults.INJECTIONS):
        sys.exit(f"error: unknown injections {sorted(unknown)}; choose from {','.join(faults.INJECTIONS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    meta = {"command": shlex.join(["tests/soak.py", *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "seed": args.seed,
            "n_requested": args.n, "host": platform.node(), "torch": torch.__version__, "minutes": 0}
    references, records = {}, []
    for i, (mode, kind, extra) in enumerate(plan(modes, injections, args.n, args.seed), 1):
        if args.budget_minutes and time.monotonic() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes} min spent: {len(records)} of {args.n} runs done", flush=True)
            break
        if mode.reference not in references:  # once per mode (or group of identical modes) and session
            references[mode.reference] = faults.reference(mode, args.out / "reference" /
                                                          mode.reference.replace("/", "-"))
        record = faults.run_scenario(mode, kind, references[mode.reference], args.out / f"run{i:03d}",
                                     random.Random(args.seed * 100_003 + i), extra=extra)
        records.append({"run": i, **record})
        meta["minutes"] = round((time.monotonic() - started) / 60, 1)
        write_report(args.out, meta, records)
        print(f"run {i}/{args.n} {mode.key} {kind} {' '.join(extra)} at step {record['at_step']}: "
              f"{record['outcome']} "
              f"({record['launches']} launch(es), time to recover {record['time_to_recover_s']} s) "
              f"{record['reason'][:300]}", flush=True)
    rows = write_report(args.out, meta, records)
    print("\n".join(rows))
    print(f"written: {args.out / 'soak.json'}, {args.out / 'soak.md'}")
    return 1 if any(r["outcome"] == "FAIL" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
