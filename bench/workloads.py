"""The workloads W1-W5 of the core issue. Each takes a `map(fn, items)` and returns its figures."""
import statistics
import time

import numpy as np


def noop(x):
    return x


def nap(seconds):
    time.sleep(seconds)
    return seconds


def burn(ms):
    """Pure-Python CPU work; returns the CPU seconds it really used."""
    start = time.thread_time()
    end = start + ms / 1000
    n = 0
    while time.thread_time() < end:
        n += 1
    return time.thread_time() - start


def plus_one(a):
    return a + 1


def w1_tiny_tasks(pmap, workers):
    n = 20_000
    t = time.perf_counter()
    out = pmap(noop, range(n))
    wall = time.perf_counter() - t
    assert len(out) == n and out[-1] == n - 1
    return {"tasks_per_s": n / wall}


def w2_seed_demo(pmap, workers):
    t = time.perf_counter()
    out = pmap(nap, [1.0] * 13)
    assert len(out) == 13
    return {"wall_s": time.perf_counter() - t}


def w3_cpu_efficiency(pmap, workers):
    t = time.perf_counter()
    cpu = pmap(burn, [5] * 400)
    wall = time.perf_counter() - t
    return {"efficiency": sum(cpu) / (workers * wall)}


def w4_arrays(pmap, workers):
    arrays = [np.full(2**19, i, dtype=np.float64) for i in range(40)]  # 4 MiB each
    t = time.perf_counter()
    out = pmap(plus_one, arrays)
    wall = time.perf_counter() - t
    assert all(o[0] == i + 1 for i, o in enumerate(out))
    moved_mb = 2 * sum(a.nbytes for a in arrays) / 1e6  # in and out
    return {"mb_per_s": moved_mb / wall}


def w5_latency(pmap, workers):
    lat = []
    for i in range(20):
        pmap(noop, [i])
    for i in range(200):
        t = time.perf_counter()
        out = pmap(noop, [i])
        lat.append(time.perf_counter() - t)
        assert out == [i]
    lat.sort()
    return {"p50_ms": statistics.median(lat) * 1000, "p99_ms": lat[197] * 1000}


# the start-up figure: a 1-item map on this many workers, from a fresh process
START_WORKERS = 2

# name -> (function, worker processes)
WORKLOADS = {
    "W1": (w1_tiny_tasks, 2),
    "W2": (w2_seed_demo, 5),
    "W3": (w3_cpu_efficiency, 2),
    "W4": (w4_arrays, 2),
    "W5": (w5_latency, 2),
}
