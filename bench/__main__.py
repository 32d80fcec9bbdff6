"""`python -m bench`: every backend on every workload, side by side, medians of repeats, as a
markdown table with ratios to multiprocessing.Pool.

    python -m bench [--repeats 3] [--backends pyworker,multiprocessing.Pool] [--workloads W1,W5]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from bench.backends import BACKENDS
from bench.workloads import WORKLOADS

# workload -> (figure, higher is better, target as a ratio to Pool, how the target reads)
FIGURES = {
    "W1": ("tasks_per_s", True, 0.25, "≥ 0.25× Pool"),
    "W2": ("wall_s", False, None, "≤ 3.05 s (ideal 3.0)"),
    "W3": ("efficiency", True, None, "≥ 0.95"),
    "W4": ("mb_per_s", True, 1.5, "≥ 1.5× Pool"),
    "W5": ("p50_ms", False, 2.0, "p50 ≤ 2× Pool"),
}
BASELINE = "multiprocessing.Pool"


def run_backend(backend, workloads, repeats, timeout_s):
    cmd = [sys.executable, "-m", "bench.run_one", backend, ",".join(workloads), str(repeats)]
    print(f"[bench] {backend}: {', '.join(workloads)} x{repeats} ...", file=sys.stderr, flush=True)
    t = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        print(f"[bench] {backend}: timed out after {timeout_s} s", file=sys.stderr)
        return []
    if proc.returncode != 0:
        print(f"[bench] {backend} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    print(f"[bench] {backend}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def medians(rows):
    out = {}
    for row in rows:
        key = (row["backend"], row["workload"])
        for k, v in row.items():
            if isinstance(v, float):
                out.setdefault(key, {}).setdefault(k, []).append(v)
    return {key: {k: statistics.median(v) for k, v in figs.items()} for key, figs in out.items()}


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def table(med, backends, workloads):
    lines = ["| workload | " + " | ".join(backends) + " | pyworker ÷ Pool | target |",
             "|---|" + "---|" * (len(backends) + 2)]
    for w in workloads:
        figure, higher, _, target = FIGURES[w]
        cells = []
        for b in backends:
            m = med.get((b, w))
            text = fmt(m[figure]) if m else "—"
            if m and w == "W5":
                text += f" (p99 {fmt(m['p99_ms'])})"
            cells.append(text)
        p, base = med.get(("pyworker", w)), med.get((BASELINE, w))
        ratio = f"{p[figure] / base[figure]:.2f}×" if p and base else "—"
        lines.append(f"| {w} {figure} | " + " | ".join(cells) + f" | {ratio} | {target} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--timeout-s", type=int, default=600, help="per backend")
    args = ap.parse_args()
    backends = args.backends.split(",")
    workloads = args.workloads.split(",")
    rows = []
    for b in backends:
        rows += run_backend(b, workloads, args.repeats, args.timeout_s)
    med = medians(rows)
    print(f"\nMachine: {platform.platform()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; medians of {args.repeats} runs.\n")
    print(table(med, backends, workloads))


if __name__ == "__main__":
    main()
