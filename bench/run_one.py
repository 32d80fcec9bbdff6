"""Runs one backend on every workload (in its own process, so backends cannot disturb each other)
and prints one JSON line per measurement."""
import json
import sys

from bench.backends import BACKENDS
from bench.workloads import WORKLOADS


def main(backend, workloads, repeats):
    by_workers = {}
    for name in workloads:
        by_workers.setdefault(WORKLOADS[name][1], []).append(name)
    for workers, names in sorted(by_workers.items()):
        with BACKENDS[backend](workers) as pmap:
            for name in names:
                fn = WORKLOADS[name][0]
                for r in range(repeats):
                    figures = fn(pmap, workers)
                    print(json.dumps({"backend": backend, "workload": name, "repeat": r,
                                      **figures}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]))
