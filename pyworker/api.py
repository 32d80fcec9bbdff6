"""What users call: pmap, imap, imap_unordered, Executor, connect."""
from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time
import weakref
from collections import deque
from itertools import chain, islice

from . import config, protocol, serialize
from .client import ChunkResult, Client, Job, show_output
from .config import Settings
from .errors import (JobLostError, PyworkerError, SerializationError, SignatureError,
                     TaskExitError, TaskTimeoutError, VersionMismatchError, WorkerLostError)

_default: Client | None = None
_default_lock = threading.Lock()
MAX_AUTO_CHUNKSIZE = 10_000
# Executor.map submits its tasks in round trips of at most this many, and has at most this many
# chunks in Redis (and at most map_budget_bytes of items) ahead of the results its caller took.
MAP_CHUNKS_PER_SUBMIT = 256
MAP_MAX_CHUNKS_AHEAD = 4 * MAP_CHUNKS_PER_SUBMIT
# A job that Redis loses (restart without persistence, flush) is sent again this many times.
MAX_RELAUNCHES = 3
# Automatic chunks stay below about this many pickled bytes, and a batch of chunks sent in one
# round trip too, so workers start on big items while the caller is still sending the rest.
CHUNK_TARGET_BYTES = 4 * 2**20
# Items of unknown number (an iterator) are read ahead, for at most this long, to size chunks
# as for a list; an iterator that is slower than that gets small chunks, so that its first
# results do not wait for many more items.
READ_AHEAD_S = 0.1
# The last batch's submit waits this long for the first result in the same round trip (short
# calls save a round trip; longer ones carry on waiting as usual).
FIRST_RESULT_WAIT_S = 0.05
# A job that starts with no live worker waits for workers to start (an autoscaler starts them
# once tasks are queued); its chunks are sized as for this many, since how many will come is
# not known here: sized for one, 60 items would be 4 chunks, and 4 of 6 workers get work.
WORKERS_WHEN_NONE = 16
WAITING_DESC = "pmap (waiting for workers to start)"
WIDEN_LOOK_S = 2.0  # how often a job waiting for results looks whether its window should widen


def connect(url: str | None = None, password: str | None = None, secret: str | None = None,
            **settings) -> Client:
    """Make (and return) the default client; anything not given comes from PYWORKER_* variables.

    Raises a one-line pyworker.ConnectionError if Redis cannot be reached or refuses the password.
    """
    global _default
    client = Client(Settings.from_env(redis_url=url, redis_password=password, secret=secret,
                                      **settings))
    client.ping()
    with _default_lock:
        old, _default = _default, client
    if old is not None and old is not client:
        old.close()
    return client


def get_client() -> Client:
    """The default client, made from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client(Settings.from_env())
        return _default


def _set_default(client: Client | None) -> None:
    global _default
    with _default_lock:
        _default = client


# --- pmap and friends ---------------------------------------------------------------------------


def _length(iterables) -> int | None:
    try:
        return len(iterables[0]) if len(iterables) == 1 else min(len(it) for it in iterables)
    except TypeError:
        return None


def _pickled_size(item) -> int:
    """About what an item weighs pickled (0 if it cannot be pickled: that is reported, naming
    the item, when its chunk is)."""
    try:
        oob: list = []  # big buffers out of band: sizing an array copies nothing
        return serialize.payload_size(serialize.dumps_data(item, oob), oob)
    except Exception:
        return 0


def _sliceable(items) -> bool:
    """Cut into chunks by slicing, and of a length that is sure (a __len__ elsewhere could be
    wrong). numpy arrays are recognised without importing numpy."""
    kind = type(items)
    return kind in (list, tuple, range) or (
        kind.__name__ == "ndarray" and kind.__module__ == "numpy" and items.ndim >= 1)


def auto_chunksize(n: int | None, workers: int) -> int:
    """At least four chunks per worker, so the overhead is paid per chunk while the load still
    balances. Rounded down, unlike multiprocessing.Pool: 640 items on 64 workers make 320 chunks
    of 2 (5 per worker) rather than 214 chunks of 3, of which some workers would get one more."""
    if not n:
        return 1
    return max(1, min(n // (4 * max(workers, 1)), MAX_AUTO_CHUNKSIZE))


def _interactive() -> bool:
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _Progress:
    """A notebook-aware tqdm bar that shows up only for jobs longer than about a second. It is
    made only then: short calls (the common case in a loop) pay nothing for it. ``tick`` while
    waiting: the bar then shows up (and its clock runs) before the first result comes."""

    DELAY_S = 1.0

    def __init__(self, total, enabled):
        self.bar = None
        self.total = total
        self.done = 0
        self.waiting = False  # no live worker: the bar says it waits for them to start
        self.enabled = enabled  # None: decided (a system call) only for a job that lasts
        self.start = time.monotonic()

    def update(self, n):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        elapsed = time.monotonic() - self.start
        if elapsed >= self.DELAY_S and self.enabled is None:
            self.enabled = _interactive()
        if self.enabled and elapsed >= self.DELAY_S:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.done, unit="item",
                            desc=WAITING_DESC if self.waiting else "pmap", dynamic_ncols=True)
            self.bar.start_t -= elapsed  # rates count from the job's start

    def tick(self):
        self.update(0)

    def wait_for_workers(self, waiting: bool):
        if waiting != self.waiting:
            self.waiting = waiting
            if self.bar is not None:
                self.bar.set_description(WAITING_DESC if waiting else "pmap")

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _Workers:
    """How many workers are live while a job runs, looked at about once a second: a job that
    started with none waits for them (and says so), and one whose workers grow (an autoscaler,
    pyworker.scale) widens its window so that every new worker gets work."""

    CHECK_S = 1.0

    def __init__(self, client: Client):
        self.client = client
        self.n = client.live_workers()
        self.seen_any = self.n > 0
        self._checked = time.monotonic()

    def grew(self) -> bool:
        now = time.monotonic()
        if now - self._checked < self.CHECK_S:
            return False
        self._checked = now
        before, self.n = self.n, self.client.live_workers()
        self.seen_any = self.seen_any or self.n > 0
        return self.n > before


def _say_waiting(client: Client, timeout, executor: bool = False) -> None:
    """Once per client: a job with no live worker waits for workers to start, bounded only by
    its timeout."""
    if client._warned_no_workers:
        return
    client._warned_no_workers = True
    if executor:
        bound = "as long as result() or wait() is told to"
    else:
        bound = (f"up to timeout={timeout:g} s" if timeout is not None
                 else "with no limit (pass timeout= to bound it)")
    print(f"pyworker: no worker is live at {client.broker.where} yet; the job is queued and "
          f"waits for workers to start (an autoscaler starts them for queued work), {bound}",
          file=sys.stderr, flush=True)


def _show_outputs(result: ChunkResult, first_index: int):
    for offset in sorted(result.outputs):
        show_output(result.worker, result.outputs[offset])


def _raise_for_status(result: ChunkResult, items, first_index, return_exceptions):
    """Turn a result without values into an error; returns per-item exceptions for 'lost'."""
    if result.status == protocol.STATUS_LOST:
        n = result.detail or "?"
        errors = []
        for offset, item in enumerate(items):
            errors.append(WorkerLostError(
                f"item #{first_index + offset} ({serialize._describe(item)}) was lost: the worker "
                f"running it died {n} times (last: {result.worker}), more than the retry limit; "
                "see PYWORKER_MAX_RETRIES"))
        if not return_exceptions:
            raise errors[0]
        return errors
    if result.status == protocol.STATUS_MISMATCH:
        raise VersionMismatchError(result.detail)
    if result.status == protocol.STATUS_RESEND:  # its payload left Redis while it was queued
        raise RuntimeError(f"item #{first_index} ({serialize._describe(items[0])}) could not be "
                           f"run: worker {result.worker} found no payload ({result.detail})")
    if result.status == protocol.STATUS_REJECTED:
        raise SignatureError(f"worker {result.worker} rejected the job: {result.detail}")
    raise RuntimeError(f"unknown result status {result.status!r} from worker {result.worker}")


def _check_task_timeout(task_timeout):
    if task_timeout is not None and (isinstance(task_timeout, bool) or not isinstance(
            task_timeout, (int, float)) or not task_timeout > 0):
        raise ValueError(f"task_timeout must be a number of seconds > 0, or None, not "
                         f"{task_timeout!r}")


# Errors that pyworker raises for one item, on the worker: their message gets the item in front.
_ITEM_ERRORS = (WorkerLostError, TaskExitError, TaskTimeoutError, SerializationError)


def _item_exception(packed, index, item, worker):
    label = f"item #{index} ({serialize._describe(item)})"
    exc = serialize.unpack_exception(packed, label, index=index, item=item, worker=worker)
    if isinstance(exc, _ITEM_ERRORS) and len(exc.args) == 1:
        exc.args = (f"{label} {exc.args[0]}",)
    return exc


def _values(result: ChunkResult, items, first, return_exceptions) -> list:
    """A chunk's values from its result: what it printed is shown, an item that raised
    re-raises here (or takes its exception's place), a result without values raises."""
    if result.status != protocol.STATUS_OK:
        return _raise_for_status(result, items, first, return_exceptions)
    if result.outputs:
        _show_outputs(result, first)
    values = result.values
    errors = result.errors
    if -1 in errors:
        values = [None] * len(items)
        errors = {offset: errors[-1] for offset in range(len(items))}
    elif len(values) != len(items) or any(not 0 <= o < len(items) for o in errors):
        raise SignatureError(
            f"the result of chunk {result.chunk} from worker {result.worker} has "
            f"{len(values)} values for its {len(items)} items: it is not this chunk's result "
            "(a worker with another pyworker version?); nothing of it was used")
    for offset in sorted(errors):
        exc = _item_exception(errors[offset], first + offset, items[offset], result.worker)
        if not return_exceptions:
            raise exc
        values[offset] = exc
    return values


def _size_by_reading_ahead(source, head: list, workers: int, max_bytes_items: int):
    """Chunk size for items of unknown number: reads ahead into ``head`` (which holds the first
    item) until the iterator ends, or there are enough items for the largest chunks a list
    would get (or as many as the in-flight byte budget allows), or READ_AHEAD_S has passed.
    Returns (size, the number of items if the iterator ended, else None)."""
    enough = max(1, min(4 * max(workers, 1) * MAX_AUTO_CHUNKSIZE, max_bytes_items))
    deadline = time.monotonic() + READ_AHEAD_S
    while len(head) < enough:
        # Batches that double (1, 2, 4 ... 64 items) between looks at the clock: cheap for a
        # quick iterator, and a slow one overruns the deadline by at most what it has taken.
        want = min(len(head), 64, enough - len(head))
        batch = list(islice(source, want))
        head += batch
        if len(batch) < want:
            return auto_chunksize(len(head), workers), len(head)  # it ended: sized like a list
        if time.monotonic() > deadline:  # slow: sized for what came so far
            return auto_chunksize(len(head), workers), None
    return MAX_AUTO_CHUNKSIZE, None  # as for a long list (the byte limit applies after)


def _first_result_wait(deadline) -> float | None:
    """How long the last submit's round trip waits for the first result (None: not at all,
    the deadline is too near)."""
    wait = FIRST_RESULT_WAIT_S if deadline is None else min(
        FIRST_RESULT_WAIT_S, deadline - time.monotonic())
    return wait if wait > 0.001 else None


def _one(fn, item, mode, timeout, progress, return_exceptions, client, task_timeout=None) -> list:
    """pmap of a single item, without _run's windows, batches and generator (one-item calls
    in a loop are where the caller's own time shows): one chunk, whose submit waits for the
    result in the same round trip. Raises JobLostError for pmap to start over with _run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    job = client.job(task_timeout)
    finished = False
    bar = _Progress(1, progress)
    try:
        sha = job.add_function(fn)
        wait = _first_result_wait(deadline)
        items = [item]
        (chunk,) = job.submit(mode, sha, [(0, items)], wait,
                              0.0 if wait is None else min(client.spin_s, wait))
        while True:
            result = job.next_result(deadline, on_wait=bar.tick)
            if result is None:
                raise TimeoutError(f"pmap timed out after {timeout:g} s with 0 of 1 items done; "
                                   "the job was cancelled")
            if result.chunk == chunk:
                break
        values = _values(result, items, 0, return_exceptions)
        bar.update(1)
        finished = True
        return values
    finally:
        bar.close()
        # Finished normally: clean up with the next round trip; otherwise cancel now.
        job.close(now=not finished)


def _run(fn, iterables, chunksize, timeout, progress, return_exceptions, client,
         task_timeout=None):
    """Yields (first index, values) per chunk in the order chunks finish."""
    if not iterables:
        raise TypeError("pmap() needs at least one iterable of items")
    if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
        raise ValueError(f"chunksize must be a positive integer or None, not {chunksize!r}")
    _check_task_timeout(task_timeout)
    client = client or get_client()
    mode = protocol.MODE_ONE if len(iterables) == 1 else protocol.MODE_STAR
    n = _length(iterables)
    source = iter(iterables[0]) if mode == protocol.MODE_ONE else zip(*iterables)
    # A list, tuple, range or numpy array is cut into chunks by slicing, not item by item (W1:
    # 0.4 ms for 20,000 items); a range's chunks are ranges, pickled in a few bytes, an array's
    # are arrays (one buffer, not a pickled numpy scalar or row per item). Several of them
    # travel as a slice of each, side by side (zipped on the worker).
    seq = None
    if all(_sliceable(it) for it in iterables):
        seq = iterables[0] if mode == protocol.MODE_ONE else serialize.Zipped(iterables)
    watch = _Workers(client)
    if watch.n == 0:
        _say_waiting(client, timeout)
    workers = watch.n or WORKERS_WHEN_NONE  # (for sizing chunks and the window)
    size = chunksize or auto_chunksize(n, workers)
    ramp = None  # the next chunk's size while chunks start small (see below)
    item_bytes = 0
    out_bytes = 0.0  # the most a result has weighed per item, pickled
    out_target = min(CHUNK_TARGET_BYTES, client.limit_bytes // 2)  # a chunk's results
    # Big items: enough in flight to keep every worker busy (one each, and half as many again
    # waiting), not the whole window (which would park up to 4 chunks per worker in Redis).
    budget = CHUNK_TARGET_BYTES * (max(workers, 1) * 3 // 2 + 2)
    if n != 1:  # (one item: one chunk, nothing to size)
        head = list(islice(source, 1))
        if head:
            item_bytes = _pickled_size(head[0])
        if n is None and chunksize is None and head:
            size, n = _size_by_reading_ahead(source, head, workers,
                                             budget // max(item_bytes, 1))
            if n is None:
                # Items keep coming, of unknown cost: the first chunks are small and each is
                # twice the one before, up to that size, so that the first results come soon
                # however slow fn is (imap), for about log2(size) chunks more.
                ramp = 1
        if chunksize is None and item_bytes * size > CHUNK_TARGET_BYTES:
            size = max(1, CHUNK_TARGET_BYTES // item_bytes)
        source = chain(head, source)
    window = max(4 * max(workers, 1), 8) + 1
    in_flight = 0  # items queued or running
    job = client.job(task_timeout)
    sha = job.add_function(fn)
    deadline = None if timeout is None else time.monotonic() + timeout
    pending: dict[int, tuple[int, list]] = {}
    next_index, exhausted, done = 0, False, 0
    relaunches = 0
    bar = _Progress(n, progress)
    bar.waiting = watch.n == 0

    def look_at_workers():
        """More workers than the window was made for: widen it (and the byte budget)."""
        nonlocal window, budget
        if watch.grew() and watch.n > workers:
            window = max(window, max(4 * watch.n, 8) + 1)
            budget = max(budget, CHUNK_TARGET_BYTES * (watch.n * 3 // 2 + 2))
        bar.wait_for_workers(watch.n == 0)

    def on_wait():
        look_at_workers()
        bar.tick()

    def relaunch(exc, unsent=()):
        """Redis lost the job: send what has not come back again, as a new job."""
        nonlocal job, sha, pending, relaunches
        relaunches += 1
        entries = sorted(pending.values()) + list(unsent)
        items = sum(len(e[1]) for e in entries)
        if relaunches > MAX_RELAUNCHES:
            raise JobLostError(f"{exc}; {done} items had come back, {items} were lost "
                               f"{relaunches} times, so pyworker gave up") from None
        print(f"pyworker: {exc}. {done} items had come back; resubmitting the other {items} "
              f"as a new job (lost job {relaunches} of at most {MAX_RELAUNCHES})",
              file=sys.stderr, flush=True)
        job = client.job(task_timeout)
        sha = job.add_function(fn)
        pending = dict(zip(job.submit(mode, sha, entries), entries)) if entries else {}

    try:
        while True:
            # Fill the window, in round trips of at most CHUNK_TARGET_BYTES, before waiting.
            # Whatever the bytes, a chunk for every worker and one more stay in flight: items
            # of 16 MiB on 3 workers must keep all 3 busy, not the 2 the budget would allow.
            while not exhausted and len(pending) < window and (
                    item_bytes * in_flight < budget or len(pending) <= max(workers, 1)):
                batch = []
                while len(pending) + len(batch) < window:
                    items = seq[next_index:next_index + size] if seq is not None else list(
                        islice(source, size if ramp is None else min(size, ramp)))
                    if not len(items):  # (an array's truth is not its length)
                        exhausted = True
                        break
                    if ramp is not None:
                        ramp = ramp * 2 if ramp < size else None
                    batch.append((next_index, items))
                    next_index += len(items)
                    if item_bytes * (next_index - batch[0][0]) >= CHUNK_TARGET_BYTES:
                        break
                if batch:
                    # The last batch: its round trip may as well wait for the first result.
                    wait, spin = None, 0.0
                    if exhausted:
                        wait = _first_result_wait(deadline)
                        if wait is not None and len(batch) == 1 and not pending:
                            spin = min(client.spin_s, wait)  # the whole job is one chunk
                    in_flight += next_index - batch[0][0]
                    try:
                        pending.update(zip(job.submit(mode, sha, batch, wait, spin), batch))
                    except JobLostError as exc:
                        relaunch(exc, batch)
            if not pending:
                return
            # The wait ends now and then (WIDEN_LOOK_S) for the window's sake: workers that came
            # meanwhile get tasks even while no result comes (long tasks, all running).
            look = time.monotonic() + WIDEN_LOOK_S
            try:
                result = job.next_result(look if deadline is None else min(deadline, look),
                                         len(pending) - 1, on_wait=on_wait)
            except JobLostError as exc:
                relaunch(exc)
                continue
            if result is None and (deadline is None or time.monotonic() < deadline):
                continue
            if result is None:
                why = "" if watch.seen_any else (
                    f": no worker was live at {client.broker.where} meanwhile (none started: "
                    "check the worker pods, or the autoscaler)")
                raise TimeoutError(
                    f"pmap timed out after {timeout:g} s with {done} of "
                    f"{n if n is not None else next_index} items done; the job was cancelled"
                    + why)
            look_at_workers()
            entry = pending.pop(result.chunk, None)
            if entry is None:
                continue  # a task that ran twice: its first result already counted
            first, items = entry
            ran = result.rest if result.rest is not None and 0 < result.rest < len(items) \
                else len(items)
            if chunksize is None and result.nbytes and ran:
                # Chunks are sized by what their results weigh too, once that is known: small
                # inputs with big results must not fill a worker's memory.
                out_bytes = max(out_bytes, result.nbytes / ran)
                if out_bytes * size > out_target:
                    size = max(1, int(out_target // out_bytes))
            if ran < len(items):
                # The worker ran only the items before rest: their results filled its message
                # limit. The others go again, in chunks sized by what the results weigh.
                step = size if chunksize is None else len(items) - ran
                again = [(first + i, items[i:i + step]) for i in range(ran, len(items), step)]
                items = items[:ran]
                try:
                    pending.update(zip(job.submit(mode, sha, again), again))
                except JobLostError as exc:
                    relaunch(exc, again)
            in_flight -= len(items)
            values = _values(result, items, first, return_exceptions)
            done += len(items)
            bar.update(len(items))
            yield first, values
    finally:
        bar.close()
        # Finished normally: clean up with the next round trip. Interrupted, failed or
        # abandoned: cancel now, so queued tasks leave Redis at once.
        job.close(now=not (exhausted and not pending))


def _nested(client) -> bool:
    """A pmap inside a task, on the workers' own cluster: it runs here, in the task, one item
    after another. Sent to the workers it could wait for ever: every worker may be busy in a
    task that waits for the others (said once per process)."""
    if not config.IN_EXECUTOR or client is not None:
        return False
    if not _nested_said:
        _nested_said.append(1)
        print("pyworker: pmap/imap inside a task runs in that task, item by item (a task that "
              "waited for the workers' other tasks could wait for ever)", file=sys.stderr)
    return True


_nested_said: list = []


def _in_task(fn, iterables, return_exceptions):
    if not iterables:
        raise TypeError("pmap() needs at least one iterable of items")
    for args in zip(*iterables):
        try:
            yield fn(*args)
        except Exception as exc:
            if not return_exceptions:
                raise
            yield exc


def pmap(fn, *iterables, chunksize=None, timeout=None, progress=None, return_exceptions=False,
         client: Client | None = None, task_timeout=None) -> list:
    """``list(map(fn, *iterables))``, computed by the workers; results in input order.

    A task that raises re-raises here as its original type (remote traceback as ``__cause__``),
    unless ``return_exceptions=True`` puts exceptions in place of results. ``timeout``: the
    whole call's limit (it is cancelled, running tasks included); ``task_timeout``: each
    item's, an item over it is stopped and fails with TaskTimeoutError.
    """
    if _nested(client):
        return list(_in_task(fn, iterables, return_exceptions))
    if len(iterables) == 1 and type(iterables[0]) in (list, tuple) and len(iterables[0]) == 1 \
            and (chunksize is None or isinstance(chunksize, int) and chunksize >= 1):
        _check_task_timeout(task_timeout)
        c = client or get_client()
        if c.live_workers() > 0:
            try:
                return _one(fn, iterables[0][0], protocol.MODE_ONE, timeout, progress,
                            return_exceptions, c, task_timeout)
            except JobLostError as exc:  # Redis lost it: the general path sends it again
                print(f"pyworker: {exc}; resubmitting the item as a new job", file=sys.stderr,
                      flush=True)
    # Each chunk's values go into the output as they come, so that at no time are the results
    # held twice (a list per chunk, then the output): in place when the length is sure;
    # otherwise appended in order, with only chunks that came before an earlier one waiting
    # aside.
    n = _length(iterables) if all(_sliceable(it) for it in iterables) else None
    out = [None] * n if n is not None else []
    early = {}
    for first, values in _run(fn, iterables, chunksize, timeout, progress, return_exceptions,
                              client, task_timeout):
        if n is not None:
            out[first:first + len(values)] = values
            continue
        early[first] = values
        while len(out) in early:
            out.extend(early.pop(len(out)))
    return out


def imap(fn, *iterables, chunksize=None, timeout=None, progress=None, return_exceptions=False,
         client: Client | None = None, task_timeout=None):
    """Yields results in input order as they arrive; stopping the iteration cancels the job."""
    if _nested(client):
        yield from _in_task(fn, iterables, return_exceptions)
        return
    buffered = {}
    expected = 0
    for first, values in _run(fn, iterables, chunksize, timeout, progress, return_exceptions,
                              client, task_timeout):
        buffered[first] = values
        while expected in buffered:
            values = buffered.pop(expected)
            expected += len(values)
            yield from values


def imap_unordered(fn, *iterables, chunksize=None, timeout=None, progress=None,
                   return_exceptions=False, client: Client | None = None, task_timeout=None):
    """Yields results as they arrive, in any order."""
    if _nested(client):
        yield from _in_task(fn, iterables, return_exceptions)
        return
    for _, values in _run(fn, iterables, chunksize, timeout, progress, return_exceptions, client,
                          task_timeout):
        yield from values


# --- concurrent.futures ---------------------------------------------------------------------------


class _Future(cf.Future):
    """An Executor's future: cancel() also stops its call on the worker if it runs there
    (the worker's supervisor sees it within a heartbeat), not only when it is still queued."""

    def __init__(self, executor: "Executor"):
        super().__init__()
        self._executor = executor
        self._chunk: int | None = None

    def cancel(self):
        if not super().cancel():
            return False
        self._executor._cancelled(self)
        return True

    def running(self):
        """True while a worker runs the call (asks Redis; False once it is done). Unlike
        ProcessPoolExecutor's, a running call can still be cancelled: cancel() stops it."""
        if super().running():
            return True
        with self._condition:
            if self._state != cf._base.PENDING or self._chunk is None:
                return False
        job = self._executor._job
        if job is None or not job.live:
            return False
        try:
            return job.client.broker.chunk_held(job.jid, self._chunk)
        except PyworkerError:  # Redis gone: nothing can be said to run
            return False


def map_budget_bytes(workers: int) -> int:
    """Pickled items an Executor.map keeps in Redis at most (as pmap does): enough to keep
    every worker busy with a full chunk, and half as many again waiting."""
    return CHUNK_TARGET_BYTES * (max(workers, 1) * 3 // 2 + 2)


class _MapFeed:
    """The items of one Executor.map, submitted as room frees up rather than all at once: at
    most MAP_MAX_CHUNKS_AHEAD chunks and about max_bytes of pickled items are in Redis ahead of
    the results the caller has taken (shutdown(wait=True) counts those not done instead: it
    runs what is left, as concurrent.futures does). Room is refilled once half of it is free,
    in round trips of up to MAP_CHUNKS_PER_SUBMIT chunks."""

    def __init__(self, executor: "Executor", fn, iterables, chunksize: int, max_bytes: int):
        self.executor, self.fn, self.chunksize, self.max_bytes = executor, fn, chunksize, max_bytes
        self.items = zip(*iterables)
        self.ahead: deque = deque()  # (future, bytes of its items), not yet given to the caller
        self.ahead_bytes = 0
        self.first = 0  # index of the next item to submit
        self.item_bytes: int | None = None  # one item, pickled (the first of each round trip)
        self.exhausted = False
        self.dropped = False  # cancelled with items never submitted
        self.lock = threading.RLock()

    def fill(self, chunks: int | None = None, nbytes: int | None = None):
        """Submit items while chunks and nbytes in flight (default: those ahead of the caller)
        leave room."""
        with self.lock:
            chunks = len(self.ahead) if chunks is None else chunks
            nbytes = self.ahead_bytes if nbytes is None else nbytes
            while not self.exhausted and chunks < MAP_MAX_CHUNKS_AHEAD and \
                    (nbytes < self.max_bytes or chunks == 0):
                batch, weights, batch_bytes = [], [], 0
                while len(batch) < MAP_CHUNKS_PER_SUBMIT and chunks + len(batch) < \
                        MAP_MAX_CHUNKS_AHEAD:
                    chunk = list(islice(self.items, self.chunksize))
                    if not chunk:
                        self.exhausted = True
                        break
                    if not batch:  # sized again each round trip: items may grow
                        self.item_bytes = max(_pickled_size(chunk[0]), 1)
                    weight = self.item_bytes * len(chunk)
                    batch.append((self.first, chunk))
                    weights.append(weight)
                    self.first += len(chunk)
                    batch_bytes += weight
                    if batch_bytes >= CHUNK_TARGET_BYTES or nbytes + batch_bytes >= self.max_bytes:
                        break
                if not batch:
                    break
                futures = self.executor._submit(self.fn, protocol.MODE_STAR, batch, None,
                                                after_shutdown=True)
                self.ahead.extend(zip(futures, weights))
                self.ahead_bytes += batch_bytes
                chunks += len(batch)
                nbytes += batch_bytes

    def next_future(self) -> cf.Future | None:
        """The next chunk's future, in order, for the caller (None: none left); refills first
        when half the room is free."""
        with self.lock:
            if not self.exhausted and len(self.ahead) <= MAP_MAX_CHUNKS_AHEAD // 2 and \
                    self.ahead_bytes <= self.max_bytes // 2:
                self.fill()
            if not self.ahead:
                if self.dropped:
                    raise cf.CancelledError(
                        f"items #{self.first} and after of this map were never submitted: the "
                        "executor was shut down with cancel_futures=True")
                return None
            future, weight = self.ahead.popleft()
            self.ahead_bytes -= weight
            return future

    def drain(self):
        """Submit and run everything left, keeping Redis' share bounded by the chunks not done
        (shutdown(wait=True): the caller may read the results after it)."""
        with self.lock:
            while not self.exhausted:
                running = [(f, w) for f, w in self.ahead if not f.done()]
                if len(running) <= MAP_MAX_CHUNKS_AHEAD // 2 and \
                        sum(w for _, w in running) <= self.max_bytes // 2:
                    self.fill(len(running), sum(w for _, w in running))
                else:
                    cf.wait([f for f, _ in running], timeout=1.0,
                            return_when=cf.FIRST_COMPLETED)

    def cancel(self):
        """Nothing more is submitted; what is ahead is cancelled, and a caller still reading
        gets CancelledError at the first item that was never submitted."""
        with self.lock:
            self.dropped = not self.exhausted
            self.exhausted = True
            for future, _ in self.ahead:
                future.cancel()


class Executor(cf.Executor):
    """A concurrent.futures.Executor on the workers: submit, map, as_completed, wait, with.

    Nothing touches Redis until the first submit; the executor's tasks form one job."""

    def __init__(self, client: Client | None = None, task_timeout=None):
        _check_task_timeout(task_timeout)
        self._client = client
        self._task_timeout = task_timeout
        self._job: Job | None = None
        # chunk id -> (future, what the call was, or None for several items of a map: the first
        # item's index, the items)
        self._futures: dict[int, tuple[cf.Future, str | None, int, list | None]] = {}
        self._lock = threading.RLock()  # (a future cancelled under it calls back: _cancelled)
        self._reader: threading.Thread | None = None
        self._shutdown = False
        self._feeds: weakref.WeakSet[_MapFeed] = weakref.WeakSet()  # maps with items to submit

    def __repr__(self):
        state = "shut down" if self._shutdown else f"{len(self._futures)} pending"
        return f"<pyworker.Executor {state}>"

    def submit(self, fn, /, *args, **kwargs) -> cf.Future:
        if _nested(self._client):  # inside a task: run here, now (see _nested)
            future = cf.Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as exc:
                future.set_exception(exc)
            return future
        name = getattr(fn, "__qualname__", "function")
        (future,) = self._submit(fn, protocol.MODE_CALL, [(0, [(args, kwargs)])],
                                 f"{name}(*{serialize._describe(args)})")
        return future

    def _submit(self, fn, mode, chunks: list, what: str | None,
                after_shutdown: bool = False) -> list[cf.Future]:
        """Tasks, in one round trip, and their futures. what=None: chunks of a map, each
        (index of its first item, args tuples), whose future's result is the list of their
        values, or the first failing item's exception. after_shutdown: the rest of a map
        made before the shutdown."""
        with self._lock:
            if self._shutdown and not after_shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if self._job is None or not self._job.live:
                client = self._client or get_client()
                self._job = client.job(self._task_timeout)
                if client.live_workers() == 0:
                    _say_waiting(client, None, executor=True)
            job = self._job
            sha = job.add_function(fn)
            futures = [_Future(self) for _ in chunks]
            for future, chunk, (first, items) in zip(futures, job.submit(mode, sha, chunks),
                                                    chunks):
                future._chunk = chunk
                self._futures[chunk] = (future, what, first, None if what else items)
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(target=self._read, args=(job,), daemon=True,
                                                name="pyworker-executor")
                self._reader.start()
            return futures

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """concurrent.futures' map: results in order, ``timeout`` counted from this call. The
        items are submitted in round trips of many (not one per item, as a submit would), and
        not all at once: at most about map_budget_bytes() of pickled items (and
        MAP_MAX_CHUNKS_AHEAD tasks) wait in Redis ahead of the results taken so far, so a long
        map of big items cannot fill Redis. shutdown(wait=True) runs the rest, as
        concurrent.futures does. With chunksize > 1 each task runs that many items, as in
        ProcessPoolExecutor (pmap and imap size chunks themselves)."""
        if _nested(self._client):
            return iter(list(_in_task(fn, iterables, False)))
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive integer, not {chunksize!r}")
        end = None if timeout is None else time.monotonic() + timeout
        workers = (self._client or get_client()).live_workers()
        feed = _MapFeed(self, fn, iterables, chunksize, map_budget_bytes(workers))
        feed.fill()  # the first round trips now: a bad first item raises here, work starts
        with self._lock:
            if not feed.exhausted:
                self._feeds.add(feed)

        def results():
            try:
                while True:
                    future = feed.next_future()
                    if future is None:
                        return
                    yield from (future.result() if end is None
                                else future.result(end - time.monotonic()))
            finally:
                feed.cancel()  # (done: a no-op; abandoned: its queued tasks leave Redis)
        return results()

    def _read(self, job: Job):
        while True:
            with self._lock:
                if not self._futures:
                    self._reader = None
                    if self._shutdown:  # shutdown(wait=False): the last call is done
                        job.close()
                    return
                expected = len(self._futures)
            try:
                result = job.next_result(time.monotonic() + 1.0, expected - 1)
            except BaseException as exc:  # Redis gone for good: fail what is pending
                with self._lock:
                    futures, self._futures = self._futures, {}
                    self._reader = None
                for future, what, first, items in futures.values():
                    if what is None:
                        what = f"items #{first}-{first + len(items) - 1} of a map"
                    if future.set_running_or_notify_cancel():
                        future.set_exception(
                            JobLostError(f"{exc}; the call {what} was lost with it: submit it "
                                         "again") if isinstance(exc, JobLostError) else exc)
                return
            if result is None:
                continue
            with self._lock:
                entry = self._futures.pop(result.chunk, None)
            if entry is None:
                continue
            future, what, first, items = entry
            if not future.set_running_or_notify_cancel():
                continue
            try:
                if items is not None:  # several items of a map: their values, or the first error
                    if result.rest is not None and result.rest < len(items):
                        raise SerializationError(
                            f"items #{first + result.rest}-{first + len(items) - 1} of a map "
                            "were not run: the results of their chunk would have passed the "
                            "message limit (PYWORKER_MAX_MESSAGE_MB); pass a smaller chunksize")
                    future.set_result(_values(result, items, first, False))
                    continue
                if result.status != protocol.STATUS_OK:
                    _raise_for_status(result, [what], 0, False)
                if result.outputs:
                    _show_outputs(result, 0)
                if not result.errors and len(result.values) != 1:
                    raise SignatureError(
                        f"the result of the call {what} from worker {result.worker} has "
                        f"{len(result.values)} values, not 1: it is not this call's result")
                if result.errors:
                    packed = result.errors.get(0, result.errors.get(-1))
                    exc = serialize.unpack_exception(packed, f"call {what}", item=what,
                                                     worker=result.worker)
                    if isinstance(exc, _ITEM_ERRORS) and len(exc.args) == 1:
                        exc.args = (f"call {what} {exc.args[0]}",)
                    future.set_exception(exc)
                else:
                    future.set_result(result.values[0])
            except Exception as exc:
                future.set_exception(exc)

    def _cancelled(self, future: _Future):
        """A future was cancelled: its call is no longer waited for, and a worker running it
        stops (shutdown cancels the whole job instead)."""
        with self._lock:
            entry = self._futures.get(future._chunk)
            if entry is None or entry[0] is not future:
                return
            del self._futures[future._chunk]
            job = self._job
            if self._shutdown or job is None or not job.live:
                return
        try:
            job.client.broker.cancel_chunks(job.jid, [future._chunk])
        except PyworkerError:  # Redis gone: the call's result is ignored all the same
            pass

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            self._shutdown = True
            feeds = list(self._feeds)
            if cancel_futures:
                for chunk, (future, *_) in list(self._futures.items()):
                    if future.cancel():
                        self._futures.pop(chunk, None)
        # The maps' items not yet submitted: dropped, run now, or run by a thread of their own
        # (wait=False), as concurrent.futures runs every item of a map that was not cancelled.
        for feed in feeds:
            if cancel_futures:
                feed.cancel()
            elif wait:
                feed.drain()
            else:
                threading.Thread(target=feed.drain, daemon=True, name="pyworker-map").start()
        job = self._job
        if job is not None and cancel_futures:
            job.drop_queued()
        reader = self._reader
        if wait and reader is not None:
            reader.join()
        if job is not None and (wait or not self._futures):
            job.close()
