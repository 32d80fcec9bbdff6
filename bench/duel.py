"""`python -m bench.duel`: is pyworker ahead of a peer? Head to head, turn by turn, with a sign
test.

`python -m bench` starts every backend in a fresh process of its own, a few rounds. That is the
fair table, but on a small VM one backend's W5 moves by ±30 % from one fresh start to the next
(which CPUs its processes land on), so three rounds cannot tell a lead of a few per cent from
luck. Here pyworker and its peers run in one process, taking turns workload by workload (the
machine's slow drift then hits them alike), for --pairs turns; and that --sessions times, each a
fresh process with fresh workers (so that where they land on the CPUs changes too). For each
peer and workload: both medians, the median over the turns of pyworker's figure ÷ the peer's,
in how many turns pyworker was ahead, and a two-sided sign test. The verdict is "ahead" or
"behind" only when that test gives p < 0.05, else "level".

    python -m bench.duel [--peers ProcessPoolExecutor,ProcessPoolExecutor-chunksize1,...]
                         [--workloads W1,W3,W4,W5] [--pairs 10] [--sessions 3]
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time

from bench.__main__ import BASELINE, FIGURES
from bench.backends import BACKENDS
from bench.run_one import Unavailable, enter, reason, unwind_on_sigterm
from bench.workloads import WORKLOADS, noop

PEERS = "ProcessPoolExecutor,ProcessPoolExecutor-chunksize1,multiprocessing.Pool"
DUEL_WORKLOADS = ("W1", "W3", "W4", "W5")  # W2 sleeps: every backend takes its 3.0 s
WORKERS = 2
SIGNIFICANT = 0.05


def sign_test(ahead: int, behind: int) -> float:
    """Two-sided p of `ahead` against `behind` (ties left out) if either side were as likely."""
    n = ahead + behind
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(ahead, behind) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(turns, higher: bool) -> dict:
    """turns: [(pyworker's figure, the peer's), ...] from the same turns."""
    ratios = [p / q for p, q in turns]
    ahead = sum(r > 1 if higher else r < 1 for r in ratios)
    behind = sum(r < 1 if higher else r > 1 for r in ratios)
    p = sign_test(ahead, behind)
    verdict = "level" if p >= SIGNIFICANT else "ahead" if ahead > behind else "behind"
    return {"pyworker": statistics.median(t[0] for t in turns),
            "peer": statistics.median(t[1] for t in turns),
            "ratio": statistics.median(ratios), "ahead": ahead, "turns": len(turns),
            "p": p, "verdict": verdict}


def turns_of(rows, peer, workload):
    """The (pyworker, peer) figures of each turn in which both have one."""
    by = {}
    for r in rows:
        if r.get("workload") == workload and "value" in r:
            by.setdefault((r["session"], r["pair"]), {})[r["backend"]] = r["value"]
    return [(t["pyworker"], t[peer]) for _, t in sorted(by.items())
            if "pyworker" in t and peer in t]


def report(rows, peers, workloads):
    """Markdown: a row per peer and workload, then pyworker against Pool's targets."""
    lines = ["| workload | peer | pyworker | peer | pyworker ÷ peer (median of turns) | "
             "pyworker ahead | sign test p | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    pool = []
    for w in workloads:
        figure, higher, target, reads = FIGURES[w]
        for peer in peers:
            turns = turns_of(rows, peer, w)
            if not turns:
                why = next((f"{b}: {r[k]}" for r in rows for b in ("pyworker", peer)
                            for k in ("unavailable", "error") if r.get("backend") == b
                            and k in r and r.get("workload", w) == w), "no turns")
                lines.append(f"| {w} {figure} | {peer} | — | — | — | — | — | {why} |")
                continue
            c = compare(turns, higher)
            lines.append(
                f"| {w} {figure} | {peer} | {fmt(c['pyworker'])} | {fmt(c['peer'])} | "
                f"{c['ratio']:.3f}× | {c['ahead']} of {c['turns']} | {c['p']:.2g} | "
                f"**{c['verdict']}** |")
            if peer == BASELINE and target is not None:
                met = c["ratio"] >= target if higher else c["ratio"] <= target
                pool.append(f"{w} {c['ratio']:.2f}× ({reads}: {'met' if met else 'NOT met'})")
    out = "\n".join(lines)
    if pool:
        out += "\n\nAgainst the core issue's ratios to Pool: " + "; ".join(pool) + "."
    return out


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.3f}" if v >= 0.1 else f"{v:.4f}"


def session(number, backends, workloads, pairs):
    """One fresh set of backends in this process: JSON lines on stdout, progress on stderr."""
    def emit(**row):
        print(json.dumps({"session": number, **row}), flush=True)

    with contextlib.ExitStack() as stack:
        maps = {}
        for b in backends:
            print(f"[duel] session {number + 1}: starting {b} ...", file=sys.stderr, flush=True)
            try:
                maps[b] = enter(stack, b, WORKERS)
            except Unavailable as exc:
                emit(backend=b, unavailable=str(exc))
                continue
            maps[b](noop, list(range(4 * WORKERS)))  # warm-up, as in bench.run_one
        if "pyworker" not in maps:
            return 1
        names, failed = list(maps), set()
        t = time.monotonic()
        for i in range(pairs):
            for j, w in enumerate(workloads):
                order = names if (i + j) % 2 == 0 else names[::-1]
                for b in order:
                    if (b, w) in failed:
                        continue
                    try:
                        figures = WORKLOADS[w][0](maps[b], WORKERS)
                    except Exception as exc:  # that pair leaves this session, the rest go on
                        failed.add((b, w))
                        emit(backend=b, workload=w, error=reason(exc))
                        print(f"[duel] session {number + 1}: {w} failed on {b}: {reason(exc)}",
                              file=sys.stderr, flush=True)
                        continue
                    emit(pair=i, workload=w, backend=b, value=figures[FIGURES[w][0]])
            if time.monotonic() - t > 10 or i == pairs - 1:
                print(f"[duel] session {number + 1}: {i + 1} of {pairs} turns",
                      file=sys.stderr, flush=True)
                t = time.monotonic()
    return 0


def run_session(number, args, timeout_s):
    cmd = [sys.executable, "-m", "bench.duel", "--session", str(number), "--peers", args.peers,
           "--workloads", args.workloads, "--pairs", str(args.pairs)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the backends' context managers stop their workers
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        print(f"[duel] session {number + 1} timed out after {timeout_s} s; its turns so far "
              "count", file=sys.stderr)
    finally:
        try:  # whatever a backend left in the session's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
        print(f"[duel] session {number + 1} exited with {proc.returncode}", file=sys.stderr)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.duel", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", default=PEERS, help=f"default {PEERS}")
    ap.add_argument("--workloads", default=",".join(DUEL_WORKLOADS))
    ap.add_argument("--pairs", type=int, default=10, help="turns per session (default 10)")
    ap.add_argument("--sessions", type=int, default=3,
                    help="fresh processes and workers, one after the other (default 3)")
    ap.add_argument("--timeout-s", type=int, default=1200, help="per session")
    ap.add_argument("--session", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    peers = [p for p in args.peers.split(",") if p]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = [p for p in peers if p not in BACKENDS or p == "pyworker"]
    if unknown or not peers:
        ap.error(f"unknown peer(s) {unknown}; known: "
                 f"{', '.join(b for b in BACKENDS if b != 'pyworker')}")
    wrong = [w for w in workloads if w not in DUEL_WORKLOADS]
    if wrong or not workloads:
        ap.error(f"workload(s) {wrong} cannot duel; choose from {', '.join(DUEL_WORKLOADS)} "
                 "(W2 sleeps: every backend takes its 3.0 s)")
    if args.pairs < 1 or args.sessions < 1:
        ap.error("--pairs and --sessions must be at least 1")
    if args.session is not None:
        unwind_on_sigterm()
        return session(args.session, ["pyworker", *peers], workloads, args.pairs)
    rows = []
    for s in range(args.sessions):
        print(f"[duel] session {s + 1} of {args.sessions}", file=sys.stderr, flush=True)
        rows += run_session(s, args, args.timeout_s)
    for r in rows:
        if "unavailable" in r:
            print(f"[duel] {r['backend']}: {r['unavailable']}", file=sys.stderr)
        elif "error" in r:
            print(f"[duel] session {r['session'] + 1}: {r['workload']} failed on {r['backend']}: "
                  f"{r['error']}", file=sys.stderr)
    load = os.getloadavg()
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {datetime.date.today().isoformat()}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end.\n")
    print(f"pyworker head to head, {WORKERS} workers each: {args.sessions} sessions of "
          f"{args.pairs} turns (below 1× is ahead for times, above 1× for rates and "
          f"efficiency; \"ahead\"/\"behind\" only at p < {SIGNIFICANT})\n")
    print(report(rows, peers, workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
