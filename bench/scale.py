"""`python -m bench.scale`: pyworker at scale (not part of `python -m bench`).

  (a) one pmap(noop, 1,000,000 items) on 2 workers: wall time (and that of the same items from a
      generator, after the rest), and the caller's peak RSS beyond a baseline taken after
      building the input list and starting the cluster (ru_maxrss of a fresh process); of it,
      the output as allocated, and so the peak beyond the input and the output;
  (b) 64 worker processes on one Redis, 640 x 0.1 s sleep tasks: wall vs the ideal 1.0 s;
  (c) 500 idle workers registered (simulated by bench.idle: real pyworker code, many workers in
      one process) beside 2 real ones: Redis commands per second at idle over 10 s, 40 s after
      they registered (INFO's total_commands_processed, which counts the commands scripts run
      too), per worker; and W5 (200 one-item pmaps, p50) on the 2 real workers with the 500
      registered against W5 on the 2 alone, in turn, 3 times each (medians).

    python -m bench.scale [--only a|b|c] [--items 1000000] [--workers 64] [--idle 500]

Each part runs in its own process group with a time limit.
"""
import argparse
import json
import os
import platform
import resource
import signal
import statistics
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


def _commands(client) -> tuple[int, dict]:
    """Redis' total_commands_processed, and calls per command (INFO commandstats)."""
    info = client.broker.redis.call("INFO", "all").decode()
    total, calls = 0, {}
    for line in info.splitlines():
        if line.startswith("total_commands_processed:"):
            total = int(line.split(":")[1])
        elif line.startswith("cmdstat_"):
            name, rest = line[len("cmdstat_"):].split(":", 1)
            calls[name] = int(rest.split("calls=")[1].split(",")[0])
    return total, calls


def _idle_rate(client, seconds):
    """Commands per second over ``seconds`` with no job (the two INFO calls left out), and the
    busiest commands' rates."""
    t0, (n0, c0) = time.perf_counter(), _commands(client)
    time.sleep(seconds)
    t1, (n1, c1) = time.perf_counter(), _commands(client)
    span = t1 - t0
    per = {k: (v - c0.get(k, 0)) / span for k, v in c1.items() if k != "info"}
    top = dict(sorted(((k, v) for k, v in per.items() if v > 0), key=lambda kv: -kv[1])[:6])
    return (n1 - n0 - 1) / span, top


def part_c(idle, seconds=10.0, settle_s=40.0, rounds=3):
    from pyworker import LocalCluster, pmap
    from bench.workloads import w5_latency

    def w5(client):
        return w5_latency(lambda fn, xs: pmap(fn, xs, progress=False, client=client), 2)

    def start_idle(client, real):
        """The idle workers, registered and idle; the real ones then on top of the idle stack
        again (the most recently idle, which a submit wakes first: as the two workers that
        serve a user's sequential calls would be, among 500 idle ones)."""
        env = {**os.environ, **cluster.env}
        sim = subprocess.Popen([sys.executable, "-m", "bench.idle", "--workers", str(idle)],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = sim.stdout.readline()
        if not line.startswith("ready"):
            sim.kill()
            raise RuntimeError(f"bench.idle did not start: {line!r}")
        r, keys = client.broker.redis, client.broker.keys
        deadline = time.monotonic() + 60
        while r.call("LLEN", keys.idle) < idle + len(real):  # each joins it at its first look
            if time.monotonic() > deadline:
                stop_idle(sim)
                raise RuntimeError("the idle workers did not all go idle within 60 s")
            time.sleep(0.1)
        for wid in real:
            r.pipeline([("LREM", keys.idle, 0, wid), ("LPUSH", keys.idle, wid)])
        return sim

    def stop_idle(sim) -> int:
        """Stop them (they deregister); how many items they ran."""
        try:
            out, _ = sim.communicate(input="", timeout=60)  # (stdin closed: it stops)
        except subprocess.TimeoutExpired:
            sim.kill()
            out, _ = sim.communicate()
        # "stopped; the idle workers ran N items"
        return next((int(line.split(" ran ")[1].split()[0]) for line in out.splitlines()
                     if line.startswith("stopped")), -1)

    alone, with_idle, ran = [], [], 0
    with LocalCluster(2) as cluster:
        client = cluster.client
        real = [w["id"] for w in client.broker.snapshot()["workers"] if "id" in w] or \
            [w["name"] for w in client.broker.snapshot()["workers"]]  # (a tree before ids)
        time.sleep(settle_s)  # (into their longest idle wait: worker.IDLE_WAIT_MAX_S)
        alone_rate, alone_top = _idle_rate(client, seconds)
        # W5 alone and with the idle workers in turn, ``rounds`` times: this machine's W5
        # moves by ±30 % from one minute to the next
        for k in range(rounds):
            alone.append(w5(client))
            sim = start_idle(client, real)
            try:
                t = time.monotonic()
                live = client.broker.live_workers()
                if k == 0:
                    # every worker through its reaping cycles and into its longest idle wait
                    time.sleep(settle_s)
                    rate, top = _idle_rate(client, seconds)
                else:
                    time.sleep(max(0.0, cluster.settings().lease_s - (time.monotonic() - t)))
                with_idle.append(w5(client))
            finally:
                ran += stop_idle(sim)
    n = idle + 2
    med = statistics.median
    return {"part": "c", "idle": idle, "live": live,
            "alone_cmds_per_s": alone_rate, "alone_top": alone_top,
            "cmds_per_s": rate, "cmds_per_worker_s": rate / n, "top": top,
            "w5_alone_p50_ms": med(x["p50_ms"] for x in alone),
            "w5_alone_p99_ms": med(x["p99_ms"] for x in alone),
            "w5_with_idle_p50_ms": med(x["p50_ms"] for x in with_idle),
            "w5_with_idle_p99_ms": med(x["p99_ms"] for x in with_idle),
            "w5_ratios": [w["p50_ms"] / a["p50_ms"] for a, w in zip(alone, with_idle)],
            "idle_ran_tasks": ran}


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


def report(a, b, c=None):
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
    rows(c, "(c) idle workers", lambda c: [
        f"| (c) 2 workers alone, at idle: Redis commands/s | {c['alone_cmds_per_s']:.1f} "
        f"({c['alone_cmds_per_s'] / 2:.2f} per worker) |",
        f"| (c) {c['idle']} idle workers + 2 ({c['live']} live), at idle: Redis commands/s | "
        f"{c['cmds_per_s']:,.0f} (**{c['cmds_per_worker_s']:.2f} per worker**; "
        + ", ".join(f"{k} {v:,.0f}" for k, v in c["top"].items()) + ") |",
        f"| (c) W5 p50 on 2 workers with {c['idle']} idle registered | "
        f"{c['w5_with_idle_p50_ms']:.2f} ms (p99 {c['w5_with_idle_p99_ms']:.2f}), "
        f"**{c['w5_with_idle_p50_ms'] / c['w5_alone_p50_ms']:.2f}×** W5 on the 2 alone "
        f"({c['w5_alone_p50_ms']:.2f} ms, p99 {c['w5_alone_p99_ms']:.2f}); medians of "
        f"{len(c['w5_ratios'])} runs each, in turn (round by round: "
        + ", ".join(f"{x:.2f}×" for x in c["w5_ratios"])
        + f"); items the idle ones ran: {c['idle_ran_tasks']} |"])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["a", "b", "c"])
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--timeout-s", type=int, default=600, help="per part")
    ap.add_argument("--idle", type=int, default=500, help="(c): idle workers registered")
    ap.add_argument("--child", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # SIGTERM unwinds the with-blocks, which stop Redis and the workers
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.child == "a":
        print(json.dumps(part_a(args.items)), flush=True)
        return
    if args.child == "b":
        print(json.dumps(part_b(args.workers)), flush=True)
        return
    if args.child == "c":
        print(json.dumps(part_c(args.idle)), flush=True)
        return
    a = b = c = None
    if args.only in (None, "a"):
        print(f"[scale] (a) {args.items:,} items ...", file=sys.stderr, flush=True)
        a = run_part(["a", "--items", str(args.items)], args.timeout_s)
    if args.only in (None, "b"):
        print(f"[scale] (b) {args.workers} workers ...", file=sys.stderr, flush=True)
        b = run_part(["b", "--workers", str(args.workers)], args.timeout_s)
    if args.only in (None, "c"):
        print(f"[scale] (c) {args.idle} idle workers ...", file=sys.stderr, flush=True)
        c = run_part(["c", "--idle", str(args.idle)], args.timeout_s)
    report(a, b, c)


if __name__ == "__main__":
    main()
