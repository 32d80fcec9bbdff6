"""The limit: what the Redis server itself does on this machine, measured with `redis-benchmark`
(Debian: redis-tools) on a private redis-server (loopback, generated password, no persistence),
the same kind of server pyworker.LocalCluster starts.

    python -m bench.limit [--repeats 3]
"""
import argparse
import csv
import io
import shutil
import statistics
import subprocess

from pyworker.local import RedisServer

# name -> redis-benchmark arguments; UNIX runs go through the server's Unix socket, which is
# what pyworker.LocalCluster's own processes use
RUNS = {
    "50 clients": ["-c", "50", "-n", "100000"],
    "50 clients, -P 16": ["-c", "50", "-n", "400000", "-P", "16"],
    "1 client": ["-c", "1", "-n", "20000"],
    "1 client, Unix socket": ["-c", "1", "-n", "20000"],
}
UNIX = {"1 client, Unix socket"}


def redis_benchmark(server, args, timeout_s=120, unix=False):
    # -a puts the password in argv; it is a throwaway one of a server that lives for seconds
    where = ["-s", server.socket_path] if unix else ["-h", "127.0.0.1", "-p", str(server.port)]
    cmd = ["redis-benchmark", *where, "-a", server.password,
           "-t", "set,get", "--csv", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"]] = {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"])}
    if not rows:
        raise RuntimeError(f"redis-benchmark printed no results: {out[-300:]!r}")
    return rows


def measure(repeats=3):
    """{run name: {"SET"/"GET": {"rps", "p50_ms"}}}, medians of `repeats`; None without
    redis-benchmark."""
    if shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None:
        return None
    server = RedisServer().start()
    try:
        samples = {}
        for _ in range(repeats):
            for name, args in RUNS.items():
                if name in UNIX and not server.has_socket:
                    continue
                for test, figs in redis_benchmark(server, args, unix=name in UNIX).items():
                    for k, v in figs.items():
                        samples.setdefault(name, {}).setdefault(test, {}) \
                            .setdefault(k, []).append(v)
    finally:
        server.stop()
    return {name: {test: {k: statistics.median(v) for k, v in figs.items()}
                   for test, figs in tests.items()} for name, tests in samples.items()}


def fmt(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def table(limit, pyworker=None):
    """Markdown: Redis' own figures, then pyworker's W1 and W5 against them. `pyworker` is the
    {workload: figures} of pyworker's medians from the same run (or None)."""
    if limit is None:
        return "redis-benchmark or redis-server not found (Debian: apt-get install redis-tools)."
    lines = ["| redis-benchmark (password; TCP 127.0.0.1 unless said) | SET | GET |",
             "|---|---|---|"]
    runs = [name for name in RUNS if name in limit]
    for name in runs:
        lines.append(f"| requests/s, {name} | {fmt(limit[name]['SET']['rps'])} | "
                     f"{fmt(limit[name]['GET']['rps'])} |")
    for name in runs:
        lines.append(f"| p50 latency ms, {name} | {fmt(limit[name]['SET']['p50_ms'])} | "
                     f"{fmt(limit[name]['GET']['p50_ms'])} |")
    lines += ["", "| pyworker figure | pyworker | Redis limit | pyworker ÷ limit |",
              "|---|---|---|---|"]
    w1 = (pyworker or {}).get("W1", {}).get("tasks_per_s")
    w5 = (pyworker or {}).get("W5", {}).get("p50_ms")
    for label, value, limit_label, lim in [
        ("W1 tasks/s", w1, "SET requests/s, 50 clients", limit["50 clients"]["SET"]["rps"]),
        ("W1 tasks/s", w1, "SET requests/s, 50 clients, -P 16",
         limit["50 clients, -P 16"]["SET"]["rps"]),
        ("W5 p50 ms", w5, "GET p50 ms, 1 client", limit["1 client"]["GET"]["p50_ms"]),
    ] + ([("W5 p50 ms", w5, "GET p50 ms, 1 client, Unix socket (what LocalCluster uses)",
           limit["1 client, Unix socket"]["GET"]["p50_ms"])]
         if "1 client, Unix socket" in limit else []):
        ratio = f"{value / lim:.3f}×" if value else "—"
        lines.append(f"| {label} | {fmt(value) if value else '—'} | {limit_label}: {fmt(lim)} | "
                     f"{ratio} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(table(measure(args.repeats)))


if __name__ == "__main__":
    main()
