"""`python -m bench.w3parts`: W3 job by job, pyworker against ProcessPoolExecutor (Pool's
chunking) and multiprocessing.Pool: where the workers' time goes besides the items.

W3's efficiency says how much of 2 workers x wall the items used; this says where the rest went.
Each item is W3's 5 ms of pure-Python CPU, and also returns when it started and ended (on the
clock every process shares) and which process ran it. Per job, in ms summed over the workers:

  start      the call -> each worker's first item
  gap1       each worker's first gap between two of its chunks
  gaps       its other gaps between chunks
  inner      gaps between items inside a chunk
  preempted  inside items, beyond the CPU they used (other processes ran)
  imbalance  the first worker done -> the last one done
  return     the last item done -> the map returned

and the start gap (the first item of the last worker to start, after the first worker's).
The backends take turns, job by job, in one process (the machine's slow drift then hits them
alike); medians over the jobs.

    python -m bench.w3parts [--jobs 20]
                            [--backends pyworker,ProcessPoolExecutor,multiprocessing.Pool]
"""
import argparse
import contextlib
import os
import statistics
import sys
import time

from bench.backends import BACKENDS, pool_chunksize
from bench.workloads import burn

ITEMS, MS, WORKERS = 400, 5, 2
PARTS = ("start", "gap1", "gaps", "inner", "preempted", "imbalance", "return")


def burn_traced(ms):
    """W3's item, also returning its start and end (perf_counter) and its pid."""
    t0 = time.perf_counter()
    cpu = burn(ms)
    return cpu, t0, time.perf_counter(), os.getpid()


def breakdown(called, returned, out, chunksize, workers=WORKERS):
    """The parts of one job (see the module's docstring), in ms, from the items' returns."""
    by_pid = {}
    for index, (cpu, t0, t1, pid) in enumerate(out):
        by_pid.setdefault(pid, []).append((t0, t1, cpu, index))
    parts = dict.fromkeys(PARTS, 0.0)
    starts, ends = [], []
    for items in by_pid.values():
        items.sort()
        starts.append(items[0][0])
        ends.append(items[-1][1])
        parts["start"] += items[0][0] - called
        parts["preempted"] += sum(t1 - t0 - cpu for t0, t1, cpu, _ in items)
        chunk_gaps = 0
        for (_, end, _, _), (begin, _, _, index) in zip(items, items[1:]):
            if index % chunksize == 0:  # this item starts a chunk
                parts["gap1" if chunk_gaps == 0 else "gaps"] += begin - end
                chunk_gaps += 1
            else:
                parts["inner"] += begin - end
    parts["imbalance"] = max(ends) - min(ends)
    parts["return"] = returned - max(ends)
    parts = {k: v * 1e3 for k, v in parts.items()}
    parts["start gap"] = (max(starts) - min(starts)) * 1e3
    parts["efficiency"] = sum(o[0] for o in out) / (workers * (returned - called))
    return parts


def report(jobs):
    """{backend: [breakdown, ...]} -> a markdown table of medians (and start-gap means)."""
    names = list(jobs)
    lines = ["| per W3 job (ms, both workers) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for part in (*PARTS, "start gap"):
        lines.append(f"| {part} | " + " | ".join(
            f"{statistics.median(j[part] for j in jobs[n]):.2f}" for n in names) + " |")
    lines.append("| start gap: mean, and jobs over 1 ms | " + " | ".join(
        f"{statistics.mean(j['start gap'] for j in jobs[n]):.2f}, "
        f"{sum(j['start gap'] > 1 for j in jobs[n])} of {len(jobs[n])}" for n in names) + " |")
    lines.append("| efficiency | " + " | ".join(
        f"{statistics.median(j['efficiency'] for j in jobs[n]):.4f}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.w3parts",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=20, help="jobs per backend (default 20)")
    ap.add_argument("--backends", default="pyworker,ProcessPoolExecutor,multiprocessing.Pool")
    args = ap.parse_args(argv)
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or args.jobs < 1:
        ap.error(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}" if unknown
                 else "--jobs must be at least 1")
    chunksize = pool_chunksize(ITEMS, WORKERS)
    jobs = {b: [] for b in backends}
    with contextlib.ExitStack() as stack:
        maps = {}
        for b in backends:
            print(f"[w3parts] starting {b} ...", file=sys.stderr, flush=True)
            maps[b] = stack.enter_context(BACKENDS[b](WORKERS))
            maps[b](burn_traced, [MS] * ITEMS)  # warm-up: imports, first connections
        t = time.monotonic()
        for i in range(args.jobs):
            order = backends if i % 2 == 0 else backends[::-1]
            for b in order:
                called = time.perf_counter()
                out = maps[b](burn_traced, [MS] * ITEMS)
                jobs[b].append(breakdown(called, time.perf_counter(), out, chunksize))
            if time.monotonic() - t > 10 or i == args.jobs - 1:
                print(f"[w3parts] {i + 1} of {args.jobs} jobs each", file=sys.stderr, flush=True)
                t = time.monotonic()
    print(f"\nW3 job by job: {ITEMS} x {MS} ms on {WORKERS} workers, chunks of {chunksize}, "
          f"{args.jobs} jobs per backend taking turns; medians\n")
    print(report(jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
