"""pyworker.Pool: multiprocessing.Pool's API on the workers. ``from pyworker import Pool`` is the
only change a Pool-based script needs.

map and starmap are pmap; imap and imap_unordered are pyworker's imap, read by a thread so that
``next(timeout)`` works as in multiprocessing; the *_async calls and apply are an Executor's
futures, one per chunk, so terminate() stops them on the workers. The cluster decides how many
processes run: ``processes=`` is ignored, with a note.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import queue
import sys
import threading
import traceback

from . import api

TimeoutError = multiprocessing.TimeoutError  # what get() and next() raise, as in multiprocessing

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"
_said: set = set()


def _say_once(key, text):
    if key not in _said:
        _said.add(key)
        print(text, file=sys.stderr)


_initialized: set = set()  # on a worker: the Pools whose initializer ran in this process


class _Task:
    """What a Pool call sends as its function: ``fn`` (each item's arguments unpacked for
    starmap), over one item or a chunk of them, after the Pool's initializer (once per worker
    process). One per call, never changed: pickled once however many chunks use it."""
    pyworker_immutable = True

    def __init__(self, fn, star, chunked, init):
        self.fn, self.star, self.chunked, self.init = fn, star, chunked, init

    def __call__(self, *args):
        if self.init is not None and self.init[0] not in _initialized:
            token, initializer, initargs = self.init
            initializer(*initargs)
            _initialized.add(token)
        fn = self.fn
        if self.chunked:
            (items,) = args
            return [fn(*item) for item in items] if self.star else [fn(item) for item in items]
        return fn(*args[0]) if self.star else fn(args[0])


class _Apply:
    """apply's function: fn(*args, **kwds) after the initializer."""
    pyworker_immutable = True

    def __init__(self, fn, init):
        self.fn, self.init = fn, init

    def __call__(self, *args, **kwds):
        if self.init is not None and self.init[0] not in _initialized:
            token, initializer, initargs = self.init
            initializer(*initargs)
            _initialized.add(token)
        return self.fn(*args, **kwds)


class PoolTerminated(RuntimeError):
    """The pool was terminated before the call finished (multiprocessing would wait for ever)."""


def _call_back(fn, value):
    """A user's callback: what it raises is printed, as an exception in a thread would be; it
    must not stop the other results from coming (multiprocessing's result thread would die)."""
    try:
        fn(value)
    except Exception:
        print("pyworker.Pool: exception in a callback:", file=sys.stderr)
        traceback.print_exc()


class AsyncResult:
    """multiprocessing.pool.AsyncResult over an Executor's futures (a map's: one per chunk)."""

    def __init__(self, futures, single, callback=None, error_callback=None):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._single = single
        self._futures = futures
        self._left = len(futures)
        self._value = None
        self._error: BaseException | None = None
        self._callback, self._error_callback = callback, error_callback
        if not futures:
            self._finish([], None)
        for future in futures:
            future.add_done_callback(self._done)

    def __repr__(self):
        state = "ready" if self.ready() else "pending"
        return f"<pyworker.Pool.AsyncResult {state}>"

    def _done(self, future: cf.Future):
        if future.cancelled():
            error = PoolTerminated("the pool was terminated before this call finished")
        else:
            error = future.exception()
        with self._lock:
            if self._event.is_set():
                return
            if error is None:
                self._left -= 1
                if self._left:
                    return
        if error is not None:
            self._finish(None, error)
        elif self._single:
            self._finish(self._futures[0].result(), None)
        else:
            self._finish([v for f in self._futures for v in f.result()], None)

    def _finish(self, value, error):
        with self._lock:
            if self._event.is_set():
                return
            self._value, self._error = value, error
            self._futures = ()
        if error is None and self._callback is not None:
            _call_back(self._callback, value)
        if error is not None and self._error_callback is not None:
            _call_back(self._error_callback, error)
        self._event.set()

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._error is None

    def wait(self, timeout=None) -> None:
        self._event.wait(timeout)

    def get(self, timeout=None):
        if not self._event.wait(timeout):
            raise TimeoutError
        if self._error is not None:
            raise self._error
        return self._value


ApplyResult = AsyncResult
MapResult = AsyncResult

_END = object()


class IMapIterator:
    """imap's and imap_unordered's results: ``for``, ``next(it)`` and ``it.next(timeout)``.
    A thread reads pyworker's imap into a queue, so the job goes on while the caller does
    something else, as with multiprocessing."""

    def __init__(self, results):
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(results,), daemon=True,
                                        name="pyworker-pool-imap")
        self._thread.start()

    def _read(self, results):
        try:
            for value in results:
                self._queue.put((True, value))
                if self._stop.is_set():
                    break
        except BaseException as exc:  # noqa: B036 - handed to the reader, whatever it is
            self._queue.put((False, exc))
        finally:
            results.close()  # stopped early: the job is cancelled
            self._queue.put((True, _END))

    def __iter__(self):
        return self

    def next(self, timeout=None):
        if self._ended:
            raise StopIteration
        try:
            ok, value = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        if value is _END:
            self._ended = True
            raise StopIteration
        if not ok:
            self._ended = True
            raise value
        return value

    __next__ = next

    def _terminate(self):
        self._stop.set()

    def _join(self, timeout=None):
        self._thread.join(timeout)


class Pool:
    """A drop-in for multiprocessing.Pool whose tasks run on pyworker's workers.

    ``processes``, ``maxtasksperchild`` and ``context`` are accepted and ignored (a note says so
    once): the cluster's live workers run the tasks, and their supervisors recycle them.
    ``initializer(*initargs)`` runs once in each worker process before its first task of this
    pool. Extra keyword arguments: ``client`` and ``task_timeout``, as for pmap."""

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, client=None, task_timeout=None, group=None):
        if processes is not None:
            if not isinstance(processes, int) or processes < 1:
                raise ValueError(f"Number of processes must be at least 1, not {processes!r}")
            _say_once("processes", f"pyworker.Pool: processes={processes} is ignored: the "
                      "cluster's live workers run the tasks")
        if maxtasksperchild is not None:
            _say_once("maxtasksperchild", "pyworker.Pool: maxtasksperchild is ignored: the "
                      "workers' supervisors replace their processes as they see fit")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        api._check_task_timeout(task_timeout)
        client = api._for_group(client, group)
        self._client = client
        self._task_timeout = task_timeout
        self._init = None if initializer is None else (os.urandom(8).hex(), initializer,
                                                        tuple(initargs))
        self._state = _RUN
        self._executor = api.Executor(client=client, task_timeout=task_timeout)
        self._lock = threading.Lock()
        self._pending: set = set()  # futures of async calls not finished yet
        self._iterators: list[IMapIterator] = []

    def __repr__(self):
        return f"<pyworker.Pool state={self._state} pending={len(self._pending)}>"

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()  # as multiprocessing.Pool's with-block does

    def _check_running(self):
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _task(self, fn, star=False, chunked=False):
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        if self._init is None and not star and not chunked:
            return fn
        return _Task(fn, star, chunked, self._init)

    # --- blocking ------------------------------------------------------------------------------

    def apply(self, func, args=(), kwds={}):
        return self.apply_async(func, args, kwds).get()

    def map(self, func, iterable, chunksize=None):
        """list(map(func, iterable)) on the workers; the first exception re-raises here."""
        self._check_running()
        return api.pmap(self._task(func), iterable, chunksize=chunksize, client=self._client,
                        task_timeout=self._task_timeout, progress=False)

    def starmap(self, func, iterable, chunksize=None):
        self._check_running()
        return api.pmap(self._task(func, star=True), iterable, chunksize=chunksize,
                        client=self._client, task_timeout=self._task_timeout, progress=False)

    # --- lazy ----------------------------------------------------------------------------------

    def imap(self, func, iterable, chunksize=None):
        """Results in order as they come; chunksize None: pyworker sizes chunks (multiprocessing
        would send one item per task)."""
        return self._iterator(api.imap, func, iterable, chunksize)

    def imap_unordered(self, func, iterable, chunksize=None):
        return self._iterator(api.imap_unordered, func, iterable, chunksize)

    def _iterator(self, how, func, iterable, chunksize):
        self._check_running()
        it = IMapIterator(how(self._task(func), iterable, chunksize=chunksize,
                              client=self._client, task_timeout=self._task_timeout,
                              progress=False))
        with self._lock:
            self._iterators = [i for i in self._iterators if i._thread.is_alive()] + [it]
        return it

    # --- asynchronous --------------------------------------------------------------------------

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        self._check_running()
        if not callable(func):
            raise TypeError(f"{func!r} is not callable")
        fn = func if self._init is None else _Apply(func, self._init)
        return self._track([self._executor.submit(fn, *args, **kwds)], True, callback,
                           error_callback)

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, callback, error_callback, False)

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None):
        return self._map_async(func, iterable, chunksize, callback, error_callback, True)

    def _map_async(self, func, iterable, chunksize, callback, error_callback, star):
        self._check_running()
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive integer or None, not {chunksize!r}")
        items = list(iterable)
        if chunksize is None:
            workers = (self._client or api.get_client()).live_workers()
            chunksize = api.auto_chunksize(len(items), workers)
        task = self._task(func, star=star, chunked=True)
        futures = [self._executor.submit(task, items[i:i + chunksize])
                   for i in range(0, len(items), chunksize)]
        return self._track(futures, False, callback, error_callback)

    def _track(self, futures, single, callback, error_callback):
        with self._lock:
            self._pending.update(futures)
        for future in futures:
            future.add_done_callback(self._untrack)
        return AsyncResult(futures, single, callback, error_callback)

    def _untrack(self, future):
        with self._lock:
            self._pending.discard(future)

    # --- the pool's life -----------------------------------------------------------------------

    def close(self):
        """No more calls; those made go on (join waits for them)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self):
        """Stop now: queued tasks leave Redis and running ones stop on the workers; results
        not in yet fail with PoolTerminated."""
        self._state = _TERMINATE
        with self._lock:
            iterators = list(self._iterators)
        for it in iterators:
            it._terminate()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def join(self):
        """Wait until the calls made so far are done (after close or terminate)."""
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        while True:
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            cf.wait(pending)
        with self._lock:
            iterators = list(self._iterators)
        for it in iterators:
            it._join()
        self._executor.shutdown(wait=True)
