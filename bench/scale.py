"""`python -m bench.scale`: pyworker at scale (not part of `python -m bench`).

  (a) one pmap(noop, 1,000,000 items) on 2 workers: wall time (and that of the same items from a
      generator, after the rest), and the caller's peak RSS beyond a baseline taken after
      building the input list and starting the cluster (ru_maxrss of a fresh process); of it,
      the output as allocated, and so the peak beyond the input and the output;
  (b) 64 worker processes on one Redis, 640 x 0.1 s sleep tasks: wall vs the ideal 1.0 s.

    python -m bench.scale [--only a|b] [--items 1000000] [--workers 64]

Each part runs in its own process group with a time limit.
"""
import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time

from bench.workloads import nap, noop


def rss_mb():
    """This process' peak resident set so far, in MB (10^6 bytes, like the output's size)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux


def part_a(items):
    from pyworker import LocalCluster, pmap
    xs = list(range(items))
    with LocalCluster(2) as cluster:
        baseline = rss_mb()
        t = time.perf_counter()
        out = pmap(noop, xs, progress=False, client=cluster.client)
        wall = time.perf_counter() - t
        peak = rss_mb()
        # the same items from a generator, after the peak above was taken (wall time only)
        t = time.perf_counter()
        from_gen = pmap(noop, (x for x in xs), progress=False, client=cluster.client)
        gen_wall = time.perf_counter() - t
        assert from_gen == out
        del from_gen
    assert len(out) == items and out[-1] == items - 1
    list_mb = sys.getsizeof(out) / 1e6
    with_ints_mb = (sys.getsizeof(out) + sum(sys.getsizeof(x) for x in out)) / 1e6
    # As allocated: Python's small-object allocator hands out blocks in steps of 16 bytes
    # (an int of 28 bytes takes 32)
    allocated_mb = (sys.getsizeof(out) + sum(-(-sys.getsizeof(x) // 16) * 16 for x in out)) / 1e6
    return {"part": "a", "items": items, "wall_s": wall, "tasks_per_s": items / wall,
            "generator_wall_s": gen_wall,
            "baseline_rss_mb": baseline, "peak_rss_mb": peak, "peak_beyond_baseline_mb":
            peak - baseline, "output_list_mb": list_mb, "output_with_ints_mb": with_ints_mb,
            "output_allocated_mb": allocated_mb,
            "peak_beyond_output_mb": peak - baseline - allocated_mb}


def part_b(workers, tasks=640, seconds=0.1):
    from pyworker import LocalCluster, pmap
    t0 = time.perf_counter()
    # Start with none and add them here: 64 interpreters on 2 cores take longer than the
    # 30 s LocalCluster.start waits.
    with LocalCluster(0) as cluster:
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_workers(workers, timeout_s=240)
        started = time.perf_counter() - t0
        pmap(noop, range(workers * 2), progress=False, client=cluster.client)  # warm every worker
        t = time.perf_counter()
        out = pmap(nap, [seconds] * tasks, progress=False, client=cluster.client)
        wall = time.perf_counter() - t
    assert len(out) == tasks
    ideal = tasks * seconds / workers
    return {"part": "b", "workers": workers, "tasks": tasks, "task_s": seconds,
            "start_s": started, "wall_s": wall, "ideal_s": ideal, "wall_over_ideal": wall / ideal}


def run_part(args, timeout_s):
    cmd = [sys.executable, "-m", "bench.scale", "--child", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the child stops its cluster on SIGTERM
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        return {"error": f"timed out after {timeout_s} s"}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows[-1] if rows else {"error": f"exited with {proc.returncode}"}


def report(a, b):
    load = os.getloadavg()
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          " at the end.\n")
    print("| scale | figure |\n|---|---|")
    def rows(part, label, lines):
        """The part's table rows, or one row with its error; nothing if it did not run."""
        if part is not None:
            print("\n".join([f"| {label} | {part['error']} |"] if "error" in part else lines(part)))

    rows(a, "(a) 1M items", lambda a: [
        f"| (a) pmap(noop, {a['items']:,} items), 2 workers: wall | {a['wall_s']:.1f} s "
        f"({a['tasks_per_s']:,.0f} tasks/s) |",
        f"| (a) the same items from a generator: wall | {a['generator_wall_s']:.1f} s "
        f"({a['items'] / a['generator_wall_s']:,.0f} tasks/s) |",
        f"| (a) caller peak RSS beyond baseline | {a['peak_beyond_baseline_mb']:.0f} MB "
        f"(baseline {a['baseline_rss_mb']:.0f} MB with the input list, peak "
        f"{a['peak_rss_mb']:.0f} MB) |",
        f"| (a) of which the output, as allocated | {a['output_allocated_mb']:.0f} MB "
        f"({a['output_list_mb']:.0f} MB the list, {a['output_with_ints_mb']:.0f} MB with its "
        f"ints by sys.getsizeof, each int in a 32-byte block) |",
        f"| (a) peak beyond the input and the output | "
        f"{a['peak_beyond_output_mb']:.1f} MB |"])
    rows(b, "(b) 64 workers", lambda b: [
        f"| (b) {b['workers']} workers on one Redis: start (to all registered) | "
        f"{b['start_s']:.1f} s |",
        f"| (b) {b['tasks']} x {b['task_s']} s sleep: wall vs ideal {b['ideal_s']:.1f} s"
        f" | {b['wall_s']:.2f} s ({b['wall_over_ideal']:.2f}× ideal) |"])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["a", "b"])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--timeout-s", type=int, default=600, help="per part")
    ap.add_argument("--child", choices=["a", "b"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # SIGTERM unwinds the with-blocks, which stop Redis and the workers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child == "a":
        print(json.dumps(part_a(args.items)), flush=True)
        return
    if args.child == "b":
        print(json.dumps(part_b(args.workers)), flush=True)
        return
    a = b = None
    if args.only in (None, "a"):
        print(f"[scale] (a) {args.items:,} items ...", file=sys.stderr, flush=True)
        a = run_part(["a", "--items", str(args.items)], args.timeout_s)
    if args.only in (None, "b"):
        print(f"[scale] (b) {args.workers} workers ...", file=sys.stderr, flush=True)
        b = run_part(["b", "--workers", str(args.workers)], args.timeout_s)
    report(a, b)


if __name__ == "__main__":
    main()
