"""pmap, imap, imap_unordered and Executor against a real Redis and real worker processes."""
import concurrent.futures as cf
import os
import resource
import threading

import pytest

import pyworker
from pyworker import Executor, RemoteError, SerializationError, imap, imap_unordered, pmap
from pyworker.api import auto_chunksize
from pyworker.config import Settings

from support import ForkedChild, executors, redis_keys, wait_until


def test_pmap_returns_results_in_input_order(cluster):
    xs = list(range(1000))
    assert pmap(lambda x: x * x, xs) == [x * x for x in xs]


@pytest.mark.parametrize("chunksize", [1, 7, 1000])
def test_pmap_any_chunksize_keeps_order(cluster, chunksize):
    assert pmap(str, range(53), chunksize=chunksize) == [str(x) for x in range(53)]


@pytest.mark.parametrize("kind", [list, tuple, range, iter])
def test_any_sequence_or_iterator_gives_the_same_results_and_names_the_item(cluster, kind):
    # lists, tuples and ranges are sliced into chunks (ranges stay ranges), iterators are not
    items = kind(range(10, 40)) if kind is not range else range(10, 40)

    def f(x):
        if x == 23:
            raise KeyError(x)
        return x * 2

    assert pmap(f, items, chunksize=7, return_exceptions=True)[:13] == [
        x * 2 for x in range(10, 23)]
    items = kind(range(10, 40)) if kind is not range else range(10, 40)
    with pytest.raises(KeyError) as info:
        pmap(f, items, chunksize=7)
    assert info.value.pyworker_index == 13
    assert "item #13 (23)" in "\n".join(getattr(info.value, "__notes__", []))


def test_pmap_holds_each_result_once(cluster):
    # Results go into the output as chunks come back: at the end the caller's Python memory
    # has not been at any time much above what it keeps (the output), whatever the length.
    import tracemalloc
    xs = list(range(200_000))
    tracemalloc.start()
    try:
        out = pmap(abs, xs, chunksize=1000)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out == xs
    one_copy = 8 * len(xs)  # the references of one list of the results: 1.6 MB
    assert peak - kept < one_copy / 4, (peak - kept, kept)


def test_results_of_an_iterator_in_order_when_a_later_chunk_ends_first(cluster):
    import time

    def slow_start(x):
        if x < 5:
            time.sleep(0.3)
        return -x

    assert pmap(slow_start, iter(range(20)), chunksize=5) == [-x for x in range(20)]

    class Liar:  # its length is wrong: the results are those of what it yields
        def __len__(self):
            return 3

        def __iter__(self):
            return iter(range(6))

    assert pmap(abs, Liar(), chunksize=2) == list(range(6))


def _submits(monkeypatch):
    """What each submit (one round trip) after this sends: a list of its chunks' items."""
    from pyworker.client import Job
    calls, submit = [], Job.submit

    def recording(self, mode, fn_sha, chunks, *args, **kwargs):
        calls.append([items for _, items in chunks])
        return submit(self, mode, fn_sha, chunks, *args, **kwargs)

    monkeypatch.setattr(Job, "submit", recording)
    return calls


def _sizes(calls) -> list[int]:
    """The number of items in each chunk those submits sent."""
    return [len(items) for call in calls for items in call]


def test_an_iterator_is_chunked_like_a_list_of_the_same_items(cluster, monkeypatch):
    # Without its length, an iterator is read ahead to size its chunks (before, it got chunks
    # of one item: 1,000x slower for a million no-ops than the same items in a list).
    calls = _submits(monkeypatch)
    assert pmap(abs, list(range(5000))) == list(range(5000))
    as_list = _sizes(calls)
    calls.clear()
    assert pmap(abs, (x for x in range(5000))) == list(range(5000))
    sent = _sizes(calls)
    assert sent == as_list and len(sent) >= 8 and as_list[0] > 100, sent[:10]


def test_a_long_iterators_chunks_start_small_and_double(cluster, monkeypatch):
    # Longer than its read-ahead: its end is unknown, and so is what fn costs; chunks of 1, 2,
    # 4 ... items first, so that the first results come at once, then those of a long list.
    from pyworker.api import MAX_AUTO_CHUNKSIZE
    calls = _submits(monkeypatch)
    n = 10 * MAX_AUTO_CHUNKSIZE
    assert pmap(abs, (x for x in range(n))) == list(range(n))
    sent = _sizes(calls)
    ramp = [2 ** k for k in range(20) if 2 ** k < MAX_AUTO_CHUNKSIZE]  # 1, 2, 4 ... 8192
    assert sent[:len(ramp)] == ramp and sum(sent) == n, sent
    assert set(sent[len(ramp):-1]) == {MAX_AUTO_CHUNKSIZE}, sent

    calls.clear()
    results = imap(abs, (x for x in range(n)))
    assert next(results) == 0 and _sizes(calls)[0] == 1
    results.close()  # cancels the job


def test_a_numpy_array_travels_in_slices_and_comes_back_item_by_item(cluster, monkeypatch):
    import numpy as np
    calls = _submits(monkeypatch)
    flat, rows = np.arange(10, 40), np.arange(90.0).reshape(30, 3)
    out = pmap(lambda x: x * 2, flat, chunksize=7)
    assert out == [x * 2 for x in range(10, 40)] and type(out[0]) is np.int64
    assert pmap(lambda r: r.sum(), rows) == [r.sum() for r in rows]
    kinds = [type(items) for call in calls for items in call]
    assert set(kinds) == {np.ndarray} and len(kinds) > 5

    def f(x):
        if x == 23:
            raise KeyError(int(x))
        return x

    with pytest.raises(KeyError) as info:
        pmap(f, flat, chunksize=7)
    assert info.value.pyworker_index == 13
    import re  # numpy 2 shows the item as np.int64(23), numpy 1 as 23
    assert re.search(r"item #13 \((np\.int64\()?23\)?\)",
                     "\n".join(getattr(info.value, "__notes__", [])))


def test_reading_ahead_stops_at_the_end_at_enough_items_at_the_byte_budget_and_in_time():
    from pyworker.api import MAX_AUTO_CHUNKSIZE, _size_by_reading_ahead
    head = [0]
    assert _size_by_reading_ahead(iter(range(1, 1000)), head, 2, 10**9) == (125, 1000)
    assert head == list(range(1000))
    head, rest = [0], iter(range(1, 10**6))
    assert _size_by_reading_ahead(rest, head, 2, 10**9) == (MAX_AUTO_CHUNKSIZE, None)
    assert head == list(range(8 * MAX_AUTO_CHUNKSIZE)) and next(rest) == 8 * MAX_AUTO_CHUNKSIZE
    head, rest = [0], iter(range(1, 10**6))  # big items: only what the byte budget allows
    assert _size_by_reading_ahead(rest, head, 2, 20) == (MAX_AUTO_CHUNKSIZE, None)
    assert len(head) == 20

    import time
    made = []

    def slow():  # 100 items, 20 ms each: reading ahead gives up long before its end
        for i in range(100):
            time.sleep(0.02)
            made.append(i)
            yield i

    head, rest = [], slow()
    head.append(next(rest))
    size, n = _size_by_reading_ahead(rest, head, 2, 10**9)
    assert n is None and len(head) == len(made) < 50 and size == max(1, len(head) // 8)


def test_a_slow_iterators_first_results_come_before_it_ends(cluster):
    import time
    made = []

    def slow():
        for i in range(30):
            time.sleep(0.02)
            made.append(i)
            yield i

    results = imap(abs, slow())
    assert next(results) == 0
    assert len(made) < 30, "the first result waited for the whole iterator"
    assert list(results) == list(range(1, 30))


def test_pmap_over_several_iterables_like_map(cluster):
    assert pmap(pow, [2, 3, 4], [5, 2, 1, 99]) == [32, 9, 4]


def test_several_sequences_travel_as_slices_side_by_side(cluster, monkeypatch):
    import numpy as np
    from pyworker.serialize import Zipped
    calls = _submits(monkeypatch)

    def kinds():
        return [type(items) for call in calls for items in call]

    xs, ys = list(range(100)), np.arange(1000, 1090)  # zip stops at the shorter
    assert pmap(lambda a, b, c: a + b + c, xs, ys, range(5, 500), chunksize=8) == [
        a + b + c for a, b, c in zip(xs, ys, range(5, 500))]
    assert set(kinds()) == {Zipped} and len(kinds()) == 12  # 90 items in chunks of 8

    def f(a, b):
        if a == 23:
            raise KeyError(a)
        return a

    with pytest.raises(KeyError) as info:
        pmap(f, range(40), tuple(range(40)), chunksize=7)
    assert info.value.pyworker_index == 23
    assert "item #23 ((23, 23))" in "\n".join(getattr(info.value, "__notes__", []))
    calls.clear()
    assert pmap(pow, [2, 3], iter([3, 2])) == [8, 9] and set(kinds()) == {list}  # iterator: zip


def test_pmap_closure_and_notebook_function(cluster):
    offset = 1000

    def add(x):
        return x + offset

    assert pmap(add, range(5)) == [1000, 1001, 1002, 1003, 1004]


def test_pmap_runs_on_the_workers_not_the_caller(cluster):
    pids = set(pmap(lambda _: os.getpid(), range(40), chunksize=1))
    assert os.getpid() not in pids
    assert pids <= set(executors(cluster))


def test_pmap_of_nothing_and_of_a_generator(cluster):
    assert pmap(abs, []) == []
    assert pmap(abs, (-x for x in range(10))) == list(range(10))


def test_an_importable_function_is_pickled_once_per_process_others_per_call(cluster,
                                                                             monkeypatch):
    import os.path
    from pyworker import serialize
    calls = []
    real = serialize.dumps_function
    monkeypatch.setattr(serialize, "dumps_function",
                        lambda fn, *ship: calls.append(fn) or real(fn, *ship))
    for _ in range(3):
        assert pmap(os.path.basename, ["a/b"]) == ["b"]
    assert calls == [os.path.basename]
    offset = [1]
    add = lambda x: x + offset[0]  # noqa: E731 - by value: what it captures may change
    assert pmap(add, [1]) == [2]
    offset[0] = 10
    assert pmap(add, [1]) == [11]
    assert calls.count(add) == 2


def test_auto_chunksize_makes_at_least_four_chunks_per_worker():
    assert auto_chunksize(20_000, 2) == 2500
    assert auto_chunksize(13, 5) == 1
    assert auto_chunksize(None, 4) == 1
    assert auto_chunksize(10**9, 1) == 10_000
    assert auto_chunksize(640, 64) == 2  # 320 chunks: 5 for every worker, none with a sixth


def test_task_error_is_the_original_type_with_remote_traceback_and_item(cluster):
    def check(x):
        if x == 7:
            raise KeyError(f"missing {x}")
        return x

    with pytest.raises(KeyError) as info:
        pmap(check, range(20), chunksize=3)
    exc = info.value
    assert "check" in str(exc.__cause__) and "missing 7" in str(exc.__cause__)
    assert exc.pyworker_index == 7
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert "item #7 (7)" in notes and "on worker" in notes


def test_return_exceptions_puts_them_in_place(cluster):
    out = pmap(lambda x: 1 // x, [1, 0, 2], return_exceptions=True)
    assert out[0] == 1 and out[2] == 0
    assert isinstance(out[1], ZeroDivisionError)


def test_exception_that_cannot_be_rebuilt_becomes_remote_error(cluster):
    class Weird(Exception):
        def __init__(self, a, b):  # pickles but cannot be rebuilt from its args
            super().__init__(f"{a}/{b}")

    def boom(x):
        raise Weird(1, 2)

    with pytest.raises(RemoteError) as info:
        pmap(boom, ["item-a"])
    err = info.value
    assert "Weird" in err.type_name and err.index == 0 and err.item == "item-a"
    assert "boom" in err.traceback and "item #0" in str(err)


def test_unpicklable_function_is_refused_before_anything_is_queued(cluster):
    lock = threading.Lock()
    before = redis_keys(cluster, "pyw:job:*")
    with pytest.raises(SerializationError, match=r"cannot send function .*lock"):
        pmap(lambda x: (lock, x), range(3))
    assert redis_keys(cluster, "pyw:job:*") == before


def test_unpicklable_item_is_named(cluster):
    with pytest.raises(SerializationError, match=r"item #2 \(<unlocked _thread.lock"):
        pmap(id, [1, 2, threading.Lock()])


def test_item_over_the_size_limit_is_named(cluster):
    client = pyworker.Client(cluster.settings().__class__(
        **{**cluster.settings().__dict__, "max_message_mb": 1}))
    try:
        with pytest.raises(SerializationError, match=r"item #1 .* over the limit of 1 MiB"):
            pmap(len, [b"x", b"y" * (2 * 2**20)], chunksize=1, client=client)
    finally:
        client.close()


def test_imap_yields_in_order_and_unordered_yields_all(cluster):
    it = imap(lambda x: x + 1, range(30), chunksize=4)
    assert list(it) == list(range(1, 31))
    assert sorted(imap_unordered(lambda x: -x, range(30), chunksize=4)) == sorted(
        -x for x in range(30))


def test_abandoned_imap_cancels_its_job(cluster):
    import time
    it = imap(lambda x: (time.sleep(0.05), x)[1], range(200), chunksize=1)
    assert next(it) == 0
    assert redis_keys(cluster, "pyw:job:*:q")  # the rest is queued
    it.close()
    assert redis_keys(cluster, "pyw:job:*:q") == []


def test_timeout_cancels_the_job(cluster):
    import time
    with pytest.raises(TimeoutError, match="timed out after 0.5 s"):
        pmap(time.sleep, [0.2] * 40, chunksize=1, timeout=0.5)
    assert redis_keys(cluster, "pyw:job:*:q") == []


def test_worker_output_reaches_the_caller_with_the_worker_name(cluster, capsys):
    pmap(lambda x: print(f"hello from item {x}"), range(3))
    out = capsys.readouterr().out
    names = {n for w in pyworker.status().alive for n in (w["name"], w.get("id"))}
    for x in range(3):
        line = next(line for line in out.splitlines() if line.endswith(f"hello from item {x}"))
        assert line.split("] ")[0].lstrip("[") in names


def test_progress_bar_shows_for_long_jobs(cluster, capsys):
    import time
    pmap(time.sleep, [0.7] * 4, chunksize=1, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_progress_bar_shows_before_the_first_result(cluster, capsys):
    """A job whose first result takes long shows its bar (at 0) after about a second, not
    only when a result comes; a one-item call too."""
    import time
    pmap(time.sleep, [1.6, 1.6], chunksize=1, progress=True)
    err = capsys.readouterr().err
    assert "0/2" in err and "2/2" in err, err
    pmap(time.sleep, [1.6], progress=True)
    err = capsys.readouterr().err
    assert "0/1" in err and "1/1" in err, err


def test_no_progress_bar_when_disabled(cluster, capsys):
    import time
    pmap(time.sleep, [0.7] * 4, chunksize=1, progress=False)
    assert "4/4" not in capsys.readouterr().err


# --- Executor ----------------------------------------------------------------------------------


def test_executor_is_a_concurrent_futures_executor(cluster):
    with Executor() as ex:
        assert isinstance(ex, cf.Executor)
        futures = [ex.submit(pow, 2, n) for n in range(10)]
        done = {f.result(timeout=30) for f in cf.as_completed(futures, timeout=30)}
        assert done == {2 ** n for n in range(10)}
        assert list(ex.map(lambda a, b: a - b, [5, 6], [1, 1], timeout=30)) == [4, 5]
        kw = ex.submit(lambda *, k: k * 2, k=21)
        assert kw.result(timeout=30) == 42


def test_executor_map_sends_chunks_when_asked_like_process_pool_executor(cluster, monkeypatch):
    calls = _submits(monkeypatch)
    with Executor() as ex:
        assert list(ex.map(pow, range(25), [2] * 30, chunksize=10)) == [
            x ** 2 for x in range(25)]
        assert _sizes(calls) == [10, 10, 5]
        calls.clear()
        assert list(ex.map(abs, [-1, -2], timeout=30)) == [1, 2]
        assert _sizes(calls) == [1, 1]  # chunksize 1: a task (and a future) per item

        def f(x):
            if x == 23:
                raise KeyError(x)
            return x

        results = ex.map(f, range(40), chunksize=10)
        assert [next(results) for _ in range(20)] == list(range(20))
        with pytest.raises(KeyError) as info:
            next(results)
        assert "item #23 ((23,))" in "\n".join(getattr(info.value, "__notes__", []))
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match="chunksize must be a positive integer"):
                ex.map(abs, [1], chunksize=bad)


def test_executor_map_submits_many_tasks_per_round_trip(cluster, monkeypatch):
    from pyworker.api import CHUNK_TARGET_BYTES, MAP_CHUNKS_PER_SUBMIT
    calls = _submits(monkeypatch)
    with Executor() as ex:
        n = 2 * MAP_CHUNKS_PER_SUBMIT + 88
        assert list(ex.map(abs, range(-n, 0))) == list(range(n, 0, -1))
        assert [len(call) for call in calls] == [MAP_CHUNKS_PER_SUBMIT] * 2 + [88]
        calls.clear()
        big = [bytes([i]) * (CHUNK_TARGET_BYTES // 3) for i in range(7)]  # 3 per round trip
        assert list(ex.map(len, big)) == [CHUNK_TARGET_BYTES // 3] * 7
        assert [len(call) for call in calls] == [3, 3, 1]


def _counted(items, taken):
    """items, counting in taken[0] how many the consumer has read."""
    for item in items:
        taken[0] += 1
        yield item


def test_executor_map_keeps_a_bounded_number_of_bytes_in_redis(cluster, monkeypatch):
    """Big items are read and submitted as results are taken, not all at the call: at most
    about map_budget_bytes of them are ahead of the caller, in Redis (or shared memory)."""
    from pyworker import api
    calls = _submits(monkeypatch)
    item = 2**20  # 1 MiB each, 60 of them: 3 times the budget of 2 workers (20 MiB)
    budget = api.map_budget_bytes(cluster.client.live_workers())
    assert 60 * item > 2 * budget
    taken = [0]
    with Executor() as ex:
        results = ex.map(len, _counted((bytes([i % 256]) * item for i in range(60)), taken))
        ahead = taken[0]
        # The first round trips: up to the budget, and no more than one chunk past it.
        assert budget // item <= ahead <= budget // item + 1, ahead
        most_ahead, got = ahead, []
        for value in results:
            got.append(value)
            most_ahead = max(most_ahead, taken[0] - len(got))
        assert got == [item] * 60
    assert most_ahead <= budget // item + 1, most_ahead
    assert len(_sizes(calls)) == 60 and len(calls) > 3, "submitted in several refills"


def test_executor_map_keeps_a_bounded_number_of_tasks_in_redis(cluster, monkeypatch):
    """Small items: at most MAP_MAX_CHUNKS_AHEAD tasks ahead, refilled in full round trips
    once half of them are taken (not a round trip per result)."""
    from pyworker.api import MAP_CHUNKS_PER_SUBMIT, MAP_MAX_CHUNKS_AHEAD
    calls = _submits(monkeypatch)
    n = 3 * MAP_MAX_CHUNKS_AHEAD + 10
    taken = [0]
    with Executor() as ex:
        results = ex.map(abs, _counted(range(-n, 0), taken))
        assert taken[0] == MAP_MAX_CHUNKS_AHEAD
        assert list(results) == list(range(n, 0, -1))
        assert all(len(call) <= MAP_CHUNKS_PER_SUBMIT for call in calls)
        assert len(calls) <= 2 * n // MAP_CHUNKS_PER_SUBMIT + 4, "refills are round trips of many"


def test_executor_map_runs_everything_when_shut_down_before_reading(cluster):
    """`with Executor() as ex: results = ex.map(...)`, read after the block: shutdown(wait=True)
    runs the items not yet submitted, as concurrent.futures does."""
    from pyworker.api import MAP_MAX_CHUNKS_AHEAD
    n = 2 * MAP_MAX_CHUNKS_AHEAD + 7
    with Executor() as ex:
        results = ex.map(abs, range(-n, 0))
    assert list(results) == list(range(n, 0, -1))


def test_executor_map_runs_everything_after_shutdown_without_waiting(cluster):
    from pyworker.api import MAP_MAX_CHUNKS_AHEAD
    n = 2 * MAP_MAX_CHUNKS_AHEAD + 3
    ex = Executor()
    results = ex.map(abs, range(-n, 0))
    ex.shutdown(wait=False)
    assert list(results) == list(range(n, 0, -1))


def test_executor_map_cancelled_by_shutdown_says_so(cluster):
    from pyworker.api import MAP_MAX_CHUNKS_AHEAD
    n = 2 * MAP_MAX_CHUNKS_AHEAD
    ex = Executor()
    results = ex.map(abs, range(n))
    ex.shutdown(wait=True, cancel_futures=True)
    with pytest.raises(cf.CancelledError):
        list(results)
    assert redis_keys(cluster, "pyw:job:*:q") == []


def test_executor_map_in_chunks_keeps_its_timeout(cluster):
    import time
    with Executor() as ex:
        results = ex.map(time.sleep, [0.0, 0.0, 1.5, 0.0], chunksize=2, timeout=0.5)
        assert next(results) is None and next(results) is None
        with pytest.raises(cf.TimeoutError):
            next(results)


def test_executor_future_carries_the_remote_exception(cluster):
    with Executor() as ex:
        f = ex.submit(int, "not a number")
        with pytest.raises(ValueError, match="invalid literal") as info:
            f.result(timeout=30)
        assert "int" in str(info.value.__cause__)


def test_executor_future_is_running_while_a_worker_runs_it(cluster, tmp_path):
    import time
    gate = tmp_path / "go"

    def _wait_for_file(path, limit=30.0):  # nested: pickled by value, the workers cannot import tests
        import os
        import time
        end = time.monotonic() + limit
        while not os.path.exists(path):
            if time.monotonic() > end:
                raise TimeoutError(path)
            time.sleep(0.01)
        return "released"

    with Executor() as ex:
        f = ex.submit(_wait_for_file, str(gate))
        end = time.monotonic() + 20
        while not f.running():
            assert time.monotonic() < end, "the call never showed as running"
            assert not f.done()
            time.sleep(0.02)
        assert not f.done()
        gate.touch()
        assert f.result(timeout=30) == "released"
        assert not f.running() and f.done()


def test_connection_error_is_the_builtin_one_too():
    from pyworker.client import Client
    with pytest.raises(ConnectionError) as info:  # the builtin name
        Client(Settings(redis_url="redis://127.0.0.1:1/0", secret="test-secret-16-bytes",
                        connect_timeout_s=0.5, reconnect_s=0.1)).broker.ping()
    assert isinstance(info.value, pyworker.ConnectionError) and isinstance(info.value, OSError)
    assert "cannot reach Redis at 127.0.0.1:1" in str(info.value)


def test_executor_shutdown_cancels_pending_futures(cluster):
    import time
    ex = Executor()
    futures = [ex.submit(time.sleep, 0.3) for _ in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert any(f.cancelled() for f in futures)
    assert all(f.done() for f in futures)
    assert redis_keys(cluster, "pyw:job:*:q") == []
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(abs, 1)


def test_status_lists_live_workers(cluster):
    st = pyworker.status()
    assert len(st.alive) == 2
    assert {int(w["pid"]) for w in st.alive} == {p.pid for p in cluster.workers}
    html = st._repr_html_()
    for w in st.alive:
        assert w["name"] in html and w["name"] in str(st)



@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs RUSAGE_THREAD (Linux)")
def test_a_one_chunk_call_spins_for_its_result_and_a_longer_job_does_not(cluster, monkeypatch):
    """A one-chunk call busy-polls (Settings.spin_s) for a result that comes soon: its thread
    never blocks; a job of several chunks blocks, leaving the CPU to its workers."""
    import time
    monkeypatch.setattr(cluster.client, "spin_s", 1.0)

    def blocked(items):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        assert pmap(time.sleep, items, chunksize=1, client=cluster.client, progress=False,
                    timeout=30) == [None] * len(items)
        return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before

    blocked([0.0])  # the worker count is cached after this
    # (another thread of this process taking the GIL can make a spinning call block once)
    assert min(blocked([0.01]) for _ in range(5)) == 0
    assert min(blocked([0.01, 0.01]) for _ in range(3)) >= 1


def test_a_caller_on_one_core_never_spins(cluster):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs os.sched_setaffinity (Linux)")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        client = pyworker.Client(cluster.settings())
    finally:
        os.sched_setaffinity(0, before)
    try:
        assert client.settings.spin_s > 0 and client.spin_s == 0
    finally:
        client.close()


def test_a_one_item_call_times_out_and_is_cancelled_like_any_other(cluster):
    import time
    with pytest.raises(TimeoutError, match=r"timed out after 0.3 s with 0 of 1 items done"):
        pmap(time.sleep, [3], timeout=0.3, client=cluster.client)
    assert redis_keys(cluster, "pyw:job:*") == []


def test_a_one_item_call_whose_job_redis_lost_is_sent_again(make_cluster, capsys):
    """The one-item path (no windows, no batches) still survives Redis losing its job."""
    import threading
    import time
    cluster = make_cluster(1)
    r = cluster.client.broker.redis
    box = {}
    t = threading.Thread(target=lambda: box.update(out=pmap(
        lambda x: (time.sleep(x), x)[1], [1.0], timeout=60, client=cluster.client)))
    t.start()
    wait_until(lambda: any(r.call("HLEN", f"pyw:worker:{n.decode()}:active")
                           for n in r.call("SMEMBERS", "pyw:workers")), 20, "the item to start")
    r.call("FLUSHDB")  # job, queue and the worker's registration are gone
    t.join(60)
    assert box.get("out") == [1.0]
    assert "resubmitting the item as a new job" in capsys.readouterr().err


def test_big_items_keep_every_worker_busy(make_cluster, tmp_path):
    """Items of 16 MiB on 3 workers: the in-flight byte budget still lets a chunk per worker
    (and one more) be in flight, so 3 tasks run at once, not 2."""
    cluster = make_cluster(3)
    folder = str(tmp_path)

    def hold(blob):
        import os
        import time
        start = time.monotonic()
        time.sleep(1.0)
        with open(os.path.join(folder, f"{os.getpid()}-{start}"), "w") as f:
            f.write(f"{start} {time.monotonic()} {len(blob)}")
        return len(blob)

    items = [bytes(16 * 2**20) for _ in range(6)]
    assert pyworker.pmap(hold, items, client=cluster.client, timeout=60) == [16 * 2**20] * 6
    spans = [tuple(map(float, open(os.path.join(folder, n)).read().split()[:2]))
             for n in os.listdir(folder)]
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == 3, f"at most {most} of the 3 workers ran at once: {sorted(spans)}"


def test_chunks_shrink_once_results_turn_out_big(make_cluster, monkeypatch):
    """Small inputs (ints) with results of 256 KiB each, under a 1 MiB message limit: the
    first chunks (16 items, sized by the input alone) come back in part, and what they did
    not run goes again in chunks sized by the results (2 items: half the limit)."""
    import dataclasses
    cluster = make_cluster(1, worker_env={"PYWORKER_MAX_MESSAGE_MB": "1"})
    client = pyworker.Client(dataclasses.replace(cluster.settings(), max_message_mb=1))
    calls = _submits(monkeypatch)
    try:
        out = pmap(lambda x: bytes([x]) * 2**18, range(64), client=client, timeout=120)
    finally:
        client.close()
    assert [(len(v), v[0]) for v in out] == [(2**18, x) for x in range(64)]
    sizes = _sizes(calls)
    assert sizes[0] == 16, sizes
    assert len(sizes) > 4 and max(sizes[4:]) <= 2, sizes


def test_after_ctrl_c_in_pmap_the_next_calls_work_at_once(make_cluster):
    """A real SIGINT in this process's main thread while pmap waits for results (its blocking
    take in flight in Redis); the process lives on, and the next pmap, status() and pmap read
    their own replies."""
    import signal
    import time
    cluster = make_cluster(2)
    assert pmap(abs, [-1]) == [1]  # pooled connections, as in a notebook after some work
    watcher = pyworker.Client(cluster.settings())

    def interrupt_when_waiting():
        def waiting():
            busy = [w for w in pyworker.status(watcher).alive if w.get("current")]
            info = watcher.broker.redis.call("INFO", "clients")
            return len(busy) == 2 and b"blocked_clients:1\r" in info  # the caller's take
        try:
            wait_until(waiting, 20, "both workers busy and pmap waiting for results")
        finally:
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_when_waiting, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            pmap(time.sleep, [1.5] * 4, chunksize=1, progress=False)
    finally:
        thread.join(30)
        watcher.close()
    assert pmap(abs, range(-6, 0)) == [6, 5, 4, 3, 2, 1]
    status = pyworker.status()
    assert len(status.alive) == 2 and "2 worker(s) alive" in str(status)
    assert pmap(str, range(50), chunksize=3) == [str(x) for x in range(50)]


def test_a_forked_child_and_its_parent_both_call_pmap_at_once(cluster):
    """A child forked while the parent has pooled connections (and its keep-alive thread)
    gets connections of its own: both sides' pmaps and Redis calls get their own replies."""
    assert pmap(abs, [-1, -2]) == [1, 2]
    client = pyworker.get_client()
    child = ForkedChild(lambda: all(
        pmap(lambda x, i=i: x + i, range(20), chunksize=3) == [x + i for x in range(20)]
        for i in range(10)))
    try:
        for i in range(10):
            assert pmap(lambda x, i=i: x * i, range(20), chunksize=3) == [x * i for x in range(20)]
            assert client.live_workers(max_age_s=0) == 2
    finally:
        assert child.result(), "the child's pmap went wrong"


def test_a_result_with_more_or_fewer_values_than_its_chunk_has_items_is_refused():
    from pyworker.api import _values
    from pyworker.client import ChunkResult
    from pyworker.errors import SignatureError
    assert _values(ChunkResult(3, "ok", "w-1", "", [1, 2]), ["a", "b"], 0, False) == [1, 2]
    for values, errors in (([1, 2, 3], {}), ([1], {}), ([1, 2], {5: b"x"})):
        with pytest.raises(SignatureError, match=r"chunk 3 from worker w-1 has \d values for its "
                                                 r"2 items"):
            _values(ChunkResult(3, "ok", "w-1", "", values, errors), ["a", "b"], 0, False)


def test_status_shows_a_workers_name_and_its_id_only_when_names_collide():
    from pyworker.status import Status
    workers = [{"name": "twin", "id": "twin.0a1b2c3d", "alive": True},
               {"name": "twin", "id": "twin.4e5f6a7b", "alive": True},
               {"name": "solo", "id": "solo.8c9d0e1f", "alive": True}]
    text = str(Status({"workers": workers, "jobs": [], "items_per_s": 0.0}, "here"))
    assert "twin.0a1b2c3d" in text and "twin.4e5f6a7b" in text
    assert " solo " in text and "solo.8c9d0e1f" not in text
