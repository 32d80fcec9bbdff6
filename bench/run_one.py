"""Runs one backend on the given workloads (in its own process, so backends cannot disturb each
other) and prints one JSON line per measurement.

    python -m bench.run_one BACKEND W1,W2 REPEATS
    python -m bench.run_one BACKEND START 1     # start-up time, from a fresh process

A backend that cannot start prints {"unavailable": reason}; a workload that fails prints
{"error": reason}; both end up in the table instead of a figure.
"""
import contextlib
import json
import os
import signal
import sys
import time

from bench.backends import BACKENDS
from bench.workloads import START_WORKERS, WORKLOADS, noop

MISSING = "unavailable (pip install -r bench/requirements.txt)"


def emit(**row):
    print(json.dumps(row), flush=True)


def reason(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


class Unavailable(Exception):
    pass


def enter(stack, backend, workers):
    try:
        return stack.enter_context(BACKENDS[backend](workers))
    except ImportError as exc:
        raise Unavailable(f"{MISSING}: {exc.name or exc}") from exc
    except Exception as exc:  # cannot start here: say why, in the table
        raise Unavailable(f"unavailable: {reason(exc)}") from exc


def start_up(backend):
    """Seconds from nothing (no import of the backend's package, no workers) to the first
    result of a 1-item map."""
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        pmap = enter(stack, backend, START_WORKERS)
        assert pmap(noop, [7]) == [7]
        emit(backend=backend, workload="START", repeat=0, start_s=time.perf_counter() - t)


def main(backend, workloads, repeats):
    if workloads == ["START"]:
        try:
            start_up(backend)
        except Unavailable as exc:
            emit(backend=backend, unavailable=str(exc))
        return
    by_workers = {}
    for name in workloads:
        by_workers.setdefault(WORKLOADS[name][1], []).append(name)
    for workers, names in sorted(by_workers.items()):
        stack = contextlib.ExitStack()
        pmap = None
        try:
            for name in names:
                fn = WORKLOADS[name][0]
                for r in range(repeats):
                    if pmap is None:
                        pmap = enter(stack, backend, workers)
                        # Workers that did not fork from this process import the workloads'
                        # module (and numpy) with their first task: not what is measured.
                        pmap(noop, list(range(4 * workers)))
                    try:
                        figures = fn(pmap, workers)
                    except Exception as exc:
                        emit(backend=backend, workload=name, repeat=r, error=reason(exc))
                        # start afresh for the next workload: leftovers must not disturb it
                        stack.close()
                        pmap = None
                        break
                    emit(backend=backend, workload=name, repeat=r, **figures)
        except Unavailable as exc:
            emit(backend=backend, unavailable=str(exc))
            return
        finally:
            stack.close()


def unwind_on_sigterm():
    """SIGTERM (the runner's time limit) unwinds the with-blocks, which stop the workers. A
    forked worker (Pool, ProcessPoolExecutor) inherits the handler: there it must end the process
    at once, as SIGTERM's default would (Pool.terminate relies on that), not raise SystemExit
    wherever the worker happens to be, which can leave it waiting on a lock forever."""
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM,
                  lambda *_: sys.exit(143) if os.getpid() == main_pid else os._exit(143))


if __name__ == "__main__":
    unwind_on_sigterm()
    main(sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]))
