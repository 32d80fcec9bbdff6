"""joblib with backend="pyworker" against joblib's default (loky), 2 workers each:
1,000 x 5 ms of pure-Python CPU and 20,000 no-ops in one Parallel call.

    python -m bench.joblib_compare [--rounds 3] [--workers 2]

Columns: loky (joblib's default: Parallel(n_jobs=2), batch_size="auto", one Parallel entered
for every call); pyworker (the same with backend="pyworker" on a LocalCluster); pyworker batched as
pmap (batch_size = items / (4 workers), pmap's own chunk size, to see whether pyworker's
chunking would beat joblib's auto-batching); and pmap itself for reference. Each round starts
every backend afresh (one after the other); the figures are medians over the rounds.
"""
import argparse
import contextlib
import statistics
import time

from .workloads import burn, noop

BURN_ITEMS, BURN_MS = 1000, 5
NOOP_ITEMS = 20_000


@contextlib.contextmanager
def loky(workers):
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor
    try:
        with Parallel(n_jobs=workers, backend="loky") as parallel:
            yield lambda fn, items: parallel(delayed(fn)(x) for x in items)
    finally:
        get_reusable_executor(max_workers=workers).shutdown(wait=True, kill_workers=True)


@contextlib.contextmanager
def pyworker_joblib(workers, pmap_batches=False):
    from joblib import Parallel, delayed

    from pyworker import LocalCluster
    from pyworker.api import auto_chunksize
    with LocalCluster(workers) as cluster:
        assert cluster.client.live_workers(max_age_s=0) == workers
        if pmap_batches:  # a fixed batch size per call: a Parallel per call
            def run(fn, items):
                with Parallel(n_jobs=-1, backend="pyworker",
                              batch_size=auto_chunksize(len(items), workers)) as parallel:
                    return parallel(delayed(fn)(x) for x in items)
            yield run
            return
        # As loky's column: one Parallel entered for every call (its auto-batching carries on
        # from one call to the next).
        with Parallel(n_jobs=-1, backend="pyworker") as parallel:
            yield lambda fn, items: parallel(delayed(fn)(x) for x in items)


@contextlib.contextmanager
def pyworker_pmap(workers):
    from pyworker import LocalCluster, pmap
    with LocalCluster(workers) as cluster:
        yield lambda fn, items: pmap(fn, items, progress=False, client=cluster.client)


BACKENDS = {
    "loky": loky,
    "pyworker": pyworker_joblib,
    "pyworker, pmap's batches": lambda w: pyworker_joblib(w, pmap_batches=True),
    "pmap (reference)": pyworker_pmap,
}


def measure(run, workers) -> dict:
    run(noop, list(range(4 * workers)))  # warm: workers import the workloads' module
    t0 = time.perf_counter()
    cpu = run(burn, [BURN_MS] * BURN_ITEMS)
    burn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run(noop, list(range(NOOP_ITEMS)))
    noop_s = time.perf_counter() - t0
    assert out == list(range(NOOP_ITEMS)) and len(cpu) == BURN_ITEMS
    return {"burn_s": burn_s, "efficiency": sum(cpu) / (workers * burn_s),
            "noop_per_s": NOOP_ITEMS / noop_s}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict]] = {name: [] for name in BACKENDS}
    for r in range(args.rounds):
        for name, backend in BACKENDS.items():
            with backend(args.workers) as run:
                runs[name].append(measure(run, args.workers))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    print(f"\njoblib on {args.workers} workers, median of {args.rounds} rounds\n")
    print("| | " + " | ".join(BACKENDS) + " |")
    print("|---|" + "---:|" * len(BACKENDS))
    ideal = BURN_ITEMS * BURN_MS / 1000 / args.workers
    print(f"| {BURN_ITEMS:,} × {BURN_MS} ms: wall s (ideal {ideal:g}) | "
          + " | ".join(f"{med(n, 'burn_s'):.2f}" for n in BACKENDS) + " |")
    print(f"| {BURN_ITEMS:,} × {BURN_MS} ms: efficiency | "
          + " | ".join(f"{med(n, 'efficiency'):.2f}" for n in BACKENDS) + " |")
    print(f"| {NOOP_ITEMS:,} no-ops: tasks/s | "
          + " | ".join(f"{med(n, 'noop_per_s'):,.0f}" for n in BACKENDS) + " |")


if __name__ == "__main__":
    main()
