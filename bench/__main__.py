"""`python -m bench`: every backend on every workload, side by side, medians of repeats, as a
markdown table with ratios to multiprocessing.Pool; a start-up row; then "the limit" (the Redis
server itself, with redis-benchmark) against pyworker's W1 and W5.

    python -m bench [--repeats 3] [--rounds 1] [--backends pyworker,multiprocessing.Pool]
                    [--workloads W1,W5] [--no-start] [--no-limit] [--timeout-s 900]

Each backend runs in its own process group (`python -m bench.run_one`), killed at the end or
when it overruns --timeout-s; each start-up repeat is a fresh process. With --rounds N, the whole
run over the backends is done N times in turn (backend A, B, C, then A, B, C again ...) and the
medians are over every repeat of every round: a machine whose speed drifts (a VM with busy
neighbours) then disturbs every backend alike instead of the ones that happened to run last.
"""
import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

from bench import limit as limit_mod
from bench.backends import BACKENDS
from bench.workloads import START_WORKERS, WORKLOADS

# workload -> (figure, higher is better, target as a ratio to Pool, how the target reads)
FIGURES = {
    "W1": ("tasks_per_s", True, 0.25, "≥ 0.25× Pool"),
    "W2": ("wall_s", False, None, "≤ 3.05 s (ideal 3.0)"),
    "W3": ("efficiency", True, None, "≥ 0.95"),
    "W4": ("mb_per_s", True, 1.5, "≥ 1.5× Pool"),
    "W5": ("p50_ms", False, 2.0, "p50 ≤ 2× Pool"),
    "START": ("start_s", False, None, "—"),
}
BASELINE = "multiprocessing.Pool"


def run_process(backend, workloads, repeats, timeout_s):
    """Rows printed by one `bench.run_one` process; on overrun the rows so far plus a note."""
    cmd = [sys.executable, "-m", "bench.run_one", backend, ",".join(workloads), str(repeats)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGTERM)  # run_one stops its backend on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
    finally:
        try:  # whatever the backend left in its process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if timed_out:
        print(f"[bench] {backend}: timed out after {timeout_s} s", file=sys.stderr)
        rows.append({"backend": backend, "timed_out": timeout_s})
    elif proc.returncode != 0:
        print(f"[bench] {backend} exited with {proc.returncode}:\n{err[-2000:]}", file=sys.stderr)
    return rows


def run_backend(backend, workloads, repeats, timeout_s, start):
    print(f"[bench] {backend}: {', '.join(workloads)} x{repeats} ...", file=sys.stderr, flush=True)
    t = time.monotonic()
    rows = run_process(backend, workloads, repeats, timeout_s) if workloads else []
    if start and not (rows and all("unavailable" in r for r in rows)):
        for _ in range(repeats):
            rows += run_process(backend, ["START"], 1, min(timeout_s, 300))
    print(f"[bench] {backend}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    return rows


def medians(rows):
    """{(backend, workload): {figure: median}} and {(backend, workload) or backend: note}."""
    out, notes = {}, {}
    for row in rows:
        if "unavailable" in row:
            notes.setdefault(row["backend"], row["unavailable"])
        elif "timed_out" in row:
            notes.setdefault(row["backend"], f"timed out (> {row['timed_out']} s)")
        elif "error" in row:
            notes[(row["backend"], row["workload"])] = f"failed: {row['error']}"
        else:
            key = (row["backend"], row["workload"])
            for k, v in row.items():
                if isinstance(v, float):
                    out.setdefault(key, {}).setdefault(k, []).append(v)
    med = {key: {k: statistics.median(v) for k, v in figs.items()} for key, figs in out.items()}
    return med, notes


fmt = limit_mod.fmt


def table(med, notes, backends, workloads):
    lines = ["| workload | " + " | ".join(backends) + " | pyworker ÷ Pool | best | target |",
             "|---|" + "---|" * (len(backends) + 3)]
    for w in workloads:
        figure, higher, _, target = FIGURES[w]
        cells = []
        for b in backends:
            m = med.get((b, w))
            if m:
                text = fmt(m[figure])
                if w == "W5":
                    text += f" (p99 {fmt(m['p99_ms'])})"
            else:
                text = notes.get((b, w)) or notes.get(b) or "—"
                text = text if len(text) <= 90 else text[:89] + "…"
            cells.append(text)
        p, base = med.get(("pyworker", w)), med.get((BASELINE, w))
        ratio = f"{p[figure] / base[figure]:.2f}×" if p and base else "—"
        have = [b for b in backends if (b, w) in med]
        pick = max if higher else min
        best = pick(have, key=lambda b: med[(b, w)][figure]) if have else "—"
        label = f"start-up s ({START_WORKERS} workers)" if w == "START" else f"{w} {figure}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {best} | {target} |")
    return "\n".join(lines)


# Workloads where the issue wants pyworker ahead of every peer but Pool.
AHEAD = ("W1", "W3", "W4", "W5")


def rounds_table(rows, backends, workloads):
    """pyworker against each peer round by round: how often it was ahead, and the ratio of its
    median to the peer's in each round (a round runs the backends one after the other within
    minutes, so a slow drift of the machine hits both sides of a ratio alike). None with a
    single round."""
    by = {}
    for row in rows:
        w = row.get("workload")
        if "round" in row and w in FIGURES and FIGURES[w][0] in row:
            by.setdefault((row["backend"], w, row["round"]), []).append(row[FIGURES[w][0]])
    rounds = sorted({r for (_, _, r) in by})
    peers = [b for b in backends if b != "pyworker"]
    if len(rounds) < 2 or not peers or "pyworker" not in backends:
        return None
    lines = ["| workload | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
    for w in [w for w in workloads if w in AHEAD]:
        figure, higher, _, _ = FIGURES[w]
        cells = []
        for b in peers:
            ratios = [statistics.median(by[("pyworker", w, r)]) / statistics.median(by[(b, w, r)])
                      for r in rounds if ("pyworker", w, r) in by and (b, w, r) in by]
            if not ratios:
                cells.append("—")
                continue
            ahead = sum(x > 1 if higher else x < 1 for x in ratios)
            cells.append(f"ahead in {ahead} of {len(ratios)} ("
                         + ", ".join(f"{x:.2f}×" for x in ratios) + ")")
        lines.append(f"| {w} {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(repeats, rounds=1):
    load = os.getloadavg()
    runs = f"{repeats} runs" if rounds == 1 else f"{repeats * rounds} runs ({rounds} rounds " \
                                                  f"over the backends in turn, {repeats} each)"
    return (f"Machine: {platform.platform()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}; {datetime.date.today().isoformat()}; medians of "
            f"{runs}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end"
            + (" (the machine was shared with other work)" if load[0] > 1 else "") + ".")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run over the backends this many times in turn (see above)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--no-start", action="store_true", help="skip the start-up row")
    ap.add_argument("--no-limit", action="store_true", help="skip redis-benchmark")
    ap.add_argument("--timeout-s", type=int, default=900, help="per backend")
    args = ap.parse_args()
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    workloads = [w for w in args.workloads.split(",") if w]
    print(f"[bench] load average at the start: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    if args.repeats < 1 or args.rounds < 1:
        ap.error("--repeats and --rounds must be at least 1")
    rows = []
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"[bench] round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
        for b in backends:
            got = run_backend(b, workloads, args.repeats, args.timeout_s, not args.no_start)
            rows += [{**row, "round": r} for row in got]
    limit = None
    if not args.no_limit:
        print("[bench] redis-benchmark ...", file=sys.stderr, flush=True)
        limit = limit_mod.measure(args.repeats)
    med, notes = medians(rows)
    print("\n" + machine(args.repeats, args.rounds) + "\n")
    print(table(med, notes, backends, workloads + ([] if args.no_start else ["START"])))
    by_round = rounds_table(rows, backends, workloads)
    if by_round:
        print("\nRound by round: pyworker's median ÷ each peer's, in the same round (below 1× is "
              "ahead for times, above 1× for rates and efficiency).\n")
        print(by_round)
    if not args.no_limit:
        pyworker = {w: figs for (b, w), figs in med.items() if b == "pyworker"}
        print("\nThe limit: the Redis server itself (redis-benchmark), and pyworker against it.\n")
        print(limit_mod.table(limit, pyworker))


if __name__ == "__main__":
    main()
