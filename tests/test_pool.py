"""pyworker.Pool against the real multiprocessing.Pool, method by method, on the same inputs:
results, exception types, callbacks, AsyncResult and the pool's life. The functions are
builtins or standard-library ones (both pools can ship them), or defined in the test (pyworker
ships closures; multiprocessing runs them in forked children)."""
import math
import multiprocessing
import operator
import os
import threading
import time

import pytest

import pyworker
from pyworker import Pool

from support import executors, redis_keys, wait_until


@pytest.fixture(scope="module")
def mp_pool():
    with multiprocessing.get_context("fork").Pool(2) as pool:
        yield pool


@pytest.fixture
def pw_pool(cluster):
    with Pool() as pool:
        yield pool


def both(mp_pool, pw_pool, call):
    """call(pool) on each; the two outcomes: ("ok", value) or ("raised", exception type)."""
    out = []
    for pool in (mp_pool, pw_pool):
        try:
            out.append(("ok", call(pool)))
        except Exception as exc:
            out.append(("raised", type(exc)))
    return out


CASES = {
    "map": lambda p: p.map(abs, range(-50, 50)),
    "map chunksize": lambda p: p.map(str, range(23), chunksize=4),
    "map empty": lambda p: p.map(abs, []),
    "map generator": lambda p: p.map(abs, (x for x in range(-5, 5))),
    "map error": lambda p: p.map(math.sqrt, [4, 1, -1, 9]),
    "starmap": lambda p: p.starmap(pow, [(2, 3), (3, 2), (10, 0)]),
    "starmap divmod": lambda p: p.starmap(divmod, [(7, 2), (9, 4)], chunksize=1),
    "starmap error": lambda p: p.starmap(divmod, [(7, 2), (1, 0)]),
    "imap": lambda p: list(p.imap(abs, range(-30, 30))),
    "imap chunksize": lambda p: list(p.imap(str, range(30), chunksize=7)),
    "imap error": lambda p: list(p.imap(math.sqrt, [1, -1])),
    "imap_unordered": lambda p: sorted(p.imap_unordered(abs, range(-30, 30))),
    "imap_unordered chunksize": lambda p: sorted(p.imap_unordered(abs, range(-9, 9), 2)),
    "apply": lambda p: p.apply(divmod, (17, 5)),
    "apply kwds": lambda p: p.apply(int, ("ff",), {"base": 16}),
    "apply error": lambda p: p.apply(int, ("not a number",)),
    "apply_async": lambda p: p.apply_async(operator.mul, (6, 7)).get(30),
    "apply_async error": lambda p: p.apply_async(operator.truediv, (1, 0)).get(30),
    "map_async": lambda p: p.map_async(abs, range(-20, 0)).get(30),
    "map_async error": lambda p: p.map_async(int, ["1", "x", "3"]).get(30),
    "starmap_async": lambda p: p.starmap_async(operator.add, [(1, 2), (3, 4)]).get(30),
    "starmap_async error": lambda p: p.starmap_async(operator.add, [(1, "a")]).get(30),
}


@pytest.mark.parametrize("name", list(CASES))
def test_same_outcome_as_multiprocessing(mp_pool, pw_pool, name):
    mine, theirs = both(mp_pool, pw_pool, CASES[name])[::-1]
    assert mine == theirs


def test_the_tasks_run_on_the_workers(cluster, pw_pool):
    pids = set(pw_pool.map(lambda _: os.getpid(), range(40), chunksize=1))
    pids |= {pw_pool.apply(os.getpid)}
    pids |= set(pw_pool.map_async(lambda _: os.getpid(), range(8), chunksize=1).get(30))
    assert pids <= set(executors(cluster)) and os.getpid() not in pids


def _async_outcomes(pool, start, **kw):
    """What the callbacks of one async call saw, and the AsyncResult's answers after it."""
    seen = {}
    done = threading.Event()

    def callback(value):
        seen["callback"] = value
        seen["thread"] = threading.current_thread() is threading.main_thread()
        done.set()

    def error_callback(exc):
        seen["error_callback"] = type(exc)
        done.set()

    result = start(pool, callback, error_callback)
    value = None
    try:
        value = ("ok", result.get(30))
    except Exception as exc:
        value = ("raised", type(exc))
    assert done.wait(10), "no callback came"
    return {"get": value, "ready": result.ready(), "successful": result.successful(),
            "callback": seen.get("callback"), "error_callback": seen.get("error_callback")}


ASYNC_CASES = {
    "apply_async": lambda p, cb, ecb: p.apply_async(pow, (2, 10), callback=cb,
                                                    error_callback=ecb),
    "apply_async error": lambda p, cb, ecb: p.apply_async(math.sqrt, (-1,), callback=cb,
                                                          error_callback=ecb),
    "map_async": lambda p, cb, ecb: p.map_async(abs, range(-9, 9), callback=cb,
                                                error_callback=ecb),
    "map_async chunks": lambda p, cb, ecb: p.map_async(str, range(25), 3, callback=cb,
                                                       error_callback=ecb),
    "map_async error": lambda p, cb, ecb: p.map_async(math.sqrt, [1, -4], callback=cb,
                                                      error_callback=ecb),
    "starmap_async": lambda p, cb, ecb: p.starmap_async(divmod, [(5, 2)], callback=cb,
                                                        error_callback=ecb),
    "starmap_async error": lambda p, cb, ecb: p.starmap_async(divmod, [(5, 0)], callback=cb,
                                                              error_callback=ecb),
}


@pytest.mark.parametrize("name", list(ASYNC_CASES))
def test_async_results_and_callbacks_as_in_multiprocessing(mp_pool, pw_pool, name):
    theirs = _async_outcomes(mp_pool, ASYNC_CASES[name])
    mine = _async_outcomes(pw_pool, ASYNC_CASES[name])
    assert mine == theirs


def test_waiting_on_a_result_that_is_not_ready(mp_pool, pw_pool):
    for pool in (mp_pool, pw_pool):
        result = pool.apply_async(time.sleep, (1.0,))
        assert not result.ready()
        with pytest.raises(ValueError):
            result.successful()
        with pytest.raises(multiprocessing.TimeoutError):
            result.get(timeout=0.05)
        result.wait(timeout=0.05)
        assert not result.ready()
        result.wait(30)
        assert result.ready() and result.successful() and result.get() is None
        it = pool.imap(time.sleep, [1.0, 0.0])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)
        assert it.next(timeout=30) is None and next(it) is None
        with pytest.raises(StopIteration):
            next(it)


def test_close_join_and_calls_after_close_as_in_multiprocessing(cluster):
    for make in (lambda: multiprocessing.get_context("fork").Pool(2), Pool):
        pool = make()
        with pytest.raises(ValueError):
            pool.join()  # still running
        results = [pool.apply_async(time.sleep, (0.2,)) for _ in range(4)]
        mapped = pool.map_async(abs, range(-10, 0))
        pool.close()
        with pytest.raises(ValueError):
            pool.map(abs, [1])
        with pytest.raises(ValueError):
            pool.apply_async(abs, (1,))
        pool.join()
        assert all(r.ready() and r.successful() for r in results), make
        assert mapped.get(0) == list(range(10, 0, -1))
        pool.terminate()


def test_terminate_and_the_with_block_stop_the_tasks_on_the_workers(make_cluster):
    cluster = make_cluster(2)
    with Pool() as pool:
        results = [pool.apply_async(time.sleep, (5.0,)) for _ in range(6)]
        mapped = pool.map_async(time.sleep, [5.0] * 6, chunksize=1)
        wait_until(lambda: len([w for w in pyworker.status(cluster.client).alive
                                if w.get("current")]) == 2, 20, "both workers busy")
        started = time.monotonic()
    # __exit__ is terminate(), as in multiprocessing: nothing waits for the 5 s tasks
    assert time.monotonic() - started < 2.0
    wait_until(lambda: not redis_keys(cluster, "pyw:job:*"), 5, "the pool's job to go")
    wait_until(lambda: not [w for w in pyworker.status(cluster.client).alive
                            if w.get("current")], 4, "the workers to stop the tasks")
    for result in results + [mapped]:
        assert result.ready() and not result.successful()
        with pytest.raises(pyworker.pool.PoolTerminated):
            result.get(0)
    with pytest.raises(ValueError, match="Pool not running"):
        pool.map(abs, [1])


def test_processes_is_ignored_with_a_note_once(cluster, capsys):
    pyworker.pool._said.discard("processes")
    with Pool(processes=3) as p1, Pool(processes=8) as p2:
        assert p1.map(abs, [-1]) == [1] and p2.map(abs, [-2]) == [2]
    err = capsys.readouterr().err
    assert err.count("processes=3 is ignored") == 1 and "processes=8" not in err
    with pytest.raises(ValueError, match="at least 1"):
        Pool(processes=0)


def test_initializer_runs_once_per_worker_process_before_its_tasks(cluster):
    def init(tag):
        os.environ["POOL_INIT"] = f"{tag} {os.getpid()}"

    with Pool(initializer=init, initargs=("ready",)) as pool:
        seen = pool.map(lambda _: os.environ.get("POOL_INIT"), range(40), chunksize=1)
        applied = pool.apply(lambda: os.environ.get("POOL_INIT"))
        streamed = list(pool.imap(lambda _: os.environ.get("POOL_INIT"), range(10)))
    for value in seen + [applied] + streamed:
        tag, pid = value.split()
        assert tag == "ready" and int(pid) in executors(cluster)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        Pool(initializer=3)


def test_a_callback_that_raises_does_not_stop_the_others(pw_pool, capsys):
    got = []

    def bad(_):
        raise RuntimeError("callback broke")

    first = pw_pool.apply_async(abs, (-1,), callback=bad)
    second = pw_pool.apply_async(abs, (-2,), callback=got.append)
    assert first.get(30) == 1 and second.get(30) == 2
    wait_until(lambda: got == [2], 5, "the second callback")
    assert "callback broke" in capsys.readouterr().err
