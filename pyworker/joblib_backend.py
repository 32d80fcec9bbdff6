"""joblib's backend "pyworker": joblib.Parallel, and so scikit-learn's ``n_jobs``, on the workers.

    with joblib.parallel_config(backend="pyworker"):
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

Importing pyworker registers it once joblib is imported (pyworker/__init__.py); this module,
which imports joblib, loads only when a Parallel call uses the backend. Each batch that joblib
dispatches is one call of a pyworker.Executor, so errors, cancellation and output behave as
with the Executor. Options: ``parallel_config(backend="pyworker", client=..., task_timeout=...)``.
"""
from __future__ import annotations

import copy
import sys
import weakref
from itertools import chain

import cloudpickle
from joblib._parallel_backends import (AutoBatchingMixin, ParallelBackendBase,
                                       SequentialBackend)
from joblib.parallel import BatchedCalls

from . import api, config

# joblib's default for memmapping (Parallel's max_nbytes="1M"): arrays at least this big that
# a call passes to more than one batch travel once per call (see _SharedArgs).
DEFAULT_MAX_NBYTES = 2**20

_said: set = set()


def _say_once(key, text):
    if key not in _said:
        _said.add(key)
        print(text, file=sys.stderr)


class _Batch:
    """A joblib batch as it travels: pickled with cloudpickle (joblib's own choice), so that
    functions and classes defined in a notebook reach the workers; big buffers (numpy arrays)
    still go out of band, through shared memory where the workers share it."""
    __slots__ = ("calls",)

    def __init__(self, calls):
        self.calls = calls

    def __repr__(self):  # how a failing call is named
        return f"<joblib batch of {len(self.calls.items)} call(s)>"

    def __reduce__(self):
        buffers: list = []
        stream = cloudpickle.dumps(self.calls, protocol=5, buffer_callback=buffers.append)
        return _load_batch, (stream, *buffers)


def _load_batch(stream, *buffers):
    return _Batch(cloudpickle.loads(stream, buffers=buffers))


def _run(batch: _Batch):
    return batch.calls()


class _Ref:
    """Where a big argument was: index into the _SharedArgs the batch runs with."""
    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


class _SharedArgs:
    """The function a batch runs with when it passes big arrays that another batch of the same
    call passed too: it holds them, and the batch holds _Refs. A function travels once per job
    (uploaded by sha, cached by each worker), so the arrays do too, however many batches use
    them (GridSearchCV passes the same X and y to every fit). Immutable once made: the client
    pickles it once (pyworker_immutable)."""
    pyworker_immutable = True

    def __init__(self, arrays: tuple):
        self.arrays = arrays

    def __call__(self, batch: _Batch):
        arrays = self.arrays

        def real(value):
            return arrays[value.index] if type(value) is _Ref else value

        calls = batch.calls
        calls.items = [(fn, tuple(real(a) for a in args), {k: real(v) for k, v in kw.items()})
                       for fn, args, kw in calls.items]
        return calls()


class PyworkerBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib.Parallel on pyworker's workers. ``n_jobs=-1`` (the default under
    ``parallel_config(backend="pyworker")``) is the number of live workers; other negative
    values count from it as joblib does (-2: all but one); positive ones are how many batches
    are in flight at once."""

    default_n_jobs = -1
    supports_retrieve_callback = True  # results come through futures' callbacks
    supports_sharedmem = False
    uses_threads = False

    def __init__(self, nesting_level=None, inner_max_num_threads=None, client=None,
                 task_timeout=None, group=None, **backend_kwargs):
        super().__init__(nesting_level=nesting_level,
                         inner_max_num_threads=inner_max_num_threads, **backend_kwargs)
        api._check_task_timeout(task_timeout)
        self.client = client
        self.group = group
        if group is not None and not config.IN_EXECUTOR:
            self.client = api._for_group(client, group)
        self.task_timeout = task_timeout
        self.parallel = None
        self._executor: api.Executor | None = None
        self._max_nbytes = DEFAULT_MAX_NBYTES
        self._seen: dict[int, weakref.ref] = {}  # id -> big arrays passed once so far
        self._shared: dict[tuple, _SharedArgs] = {}  # ids of a batch's big arrays -> function

    def __repr__(self):
        return f"<pyworker joblib backend, nesting level {self.nesting_level}>"

    def effective_n_jobs(self, n_jobs):
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning; use -1 for every live "
                             "pyworker worker, or a positive number")
        if config.IN_EXECUTOR:
            return 1  # inside a task: joblib runs it here, sequentially (no pyworker in pyworker)
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        client = self.client or api.get_client()
        live = client.live_workers()
        if live == 0:
            _say_once("no workers", f"pyworker: no workers are connected to Redis at "
                      f"{client.broker.where}; joblib's tasks wait until one starts")
        # Never 1: joblib runs n_jobs=1 in the caller, and this caller asked for the cluster.
        return max(live + 1 + n_jobs, 2)

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, **backend_kwargs):
        self.parallel = parallel
        n = self.effective_n_jobs(n_jobs)
        max_nbytes = backend_kwargs.get("max_nbytes", DEFAULT_MAX_NBYTES)
        self._max_nbytes = None if max_nbytes is None else int(max_nbytes)
        return n

    def get_nested_backend(self):
        # What a task's own joblib calls use on the worker: one after another, in that task.
        return SequentialBackend(nesting_level=(self.nesting_level or 0) + 1), None

    def submit(self, func, callback=None):
        if self._executor is None:
            self._executor = api.Executor(client=self.client, task_timeout=self.task_timeout)
        fn, batch = self._prepare(func)
        future = self._executor.submit(fn, batch)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, out):
        return out.result()

    def abort_everything(self, ensure_ready=True):
        """An error, Ctrl-C or an abandoned generator: queued batches leave Redis and running
        ones stop (Executor.shutdown(cancel_futures=True))."""
        self._close(cancel=True)

    def stop_call(self):
        self._close(cancel=True)  # nothing is left to cancel after a call that finished

    def terminate(self):
        self._close(cancel=True)

    def _close(self, cancel):
        executor, self._executor = self._executor, None
        self._seen.clear()
        self._shared.clear()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=cancel)

    # --- big arguments, once per call ---------------------------------------------------------

    def _big(self, value) -> bool:
        numpy = sys.modules.get("numpy")
        return (numpy is not None and isinstance(value, numpy.ndarray)
                and value.nbytes >= self._max_nbytes)

    def _prepare(self, calls):
        """(function, argument) of one batch: its big arrays that an earlier batch of this call
        passed too go with the function, once; the rest with the batch."""
        if self._max_nbytes is None or not isinstance(calls, BatchedCalls):
            return _run, _Batch(calls)
        shared: list = []
        for _, args, kwargs in calls.items:
            for value in chain(args, kwargs.values()):
                if self._big(value) and self._again(value) and not any(
                        value is s for s in shared):
                    shared.append(value)
        if not shared:
            return _run, _Batch(calls)
        key = tuple(id(a) for a in shared)
        fn = self._shared.get(key)
        if fn is None:
            fn = self._shared[key] = _SharedArgs(tuple(shared))
        where = {id(a): _Ref(i) for i, a in enumerate(shared)}

        def ref(value):
            return where.get(id(value), value) if self._big(value) else value

        stripped = copy.copy(calls)  # joblib's own batch stays as it was
        stripped.items = [(f, tuple(ref(a) for a in args), {k: ref(v) for k, v in kw.items()})
                          for f, args, kw in calls.items]
        return fn, _Batch(stripped)

    def _again(self, array) -> bool:
        """Whether this very array was passed by an earlier batch of the call (the first time,
        it travels with its batch: an array that one batch alone uses stays out of the
        function cache)."""
        known = self._seen.get(id(array))
        if known is not None and known() is array:
            return True
        try:
            self._seen[id(array)] = weakref.ref(array)
        except TypeError:  # not weakly referable: never shared
            pass
        return False
