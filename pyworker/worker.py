"""The worker loop: take a task, run it, send the result back; heartbeats; graceful stop."""
from __future__ import annotations

import logging
import mmap
import os
import _signal
import bisect
import hmac
import signal
import sys
import threading
import time
from collections import OrderedDict, deque
from functools import partial
from typing import NamedTuple

from . import board, protocol, serialize, shm
from ._version import __version__
from .config import Settings
from .errors import ConnectionError as PyworkerConnectionError
from .board import Board
from .errors import RedisError, SignatureError, TaskExitError
from .queue import Broker

log = logging.getLogger("pyworker.worker")
FUNCTION_CACHE_SIZE = 16
FUNCTION_CACHE_BYTES = 256 * 2**20  # pickled
# A worker whose tasks take less than this holds the next one while it runs the current one,
# so it can send a result without waiting for Redis' answer (see _loop). Longer tasks gain
# nothing from it, and a held task would wait behind them.
LOOKAHEAD_MAX_S = 1.0
# A connection failure this long after the last one is retried at once (see _loop).
RETRY_AT_ONCE_AFTER_S = 5.0
# An idle executor's wait in Redis doubles from PYWORKER_IDLE_WAIT_S up to this: a submit or a
# re-queued task wakes it at once (its wake list, or the common one), its supervisor wakes it to
# stop, so the wait's end only guards against a wake token that got lost (a worker killed after
# taking one) and a connection that died silently. Waking every second would cost Redis two
# commands per second per idle worker; this costs about one per 30 s.
IDLE_WAIT_MAX_S = 30.0


class _Report(NamedTuple):
    """A task's result, ready to send."""
    header: protocol.TaskHeader
    result: bytes  # the signed result message
    n_items: int
    payload: bytes | None  # the result payload, when it does not travel inline
    segment: str | None  # the result's shared-memory segment, if it has one
    run_s: float = 0.0  # how long its items ran (the metrics' task duration)
    failed: int = 0  # items that raised (the whole chunk failing: -1)


_FIRST_BUCKET = len(protocol.COUNTER_FIELDS)  # where the run-time histogram starts in _counts
OUTPUT_CAP_BYTES = 1 << 20  # what one task may print; the rest is counted, not kept
STREAM_AFTER_S = 1.0  # what a running task printed reaches its caller about this much later


class _OutputCapture:
    """Collects what items print, tagged with the item's offset in the chunk, up to
    OUTPUT_CAP_BYTES a task (then "... N bytes dropped"). Bytes are taken too, through
    ``.buffer`` or ``write``, as a real stdout's buffer would: a task that writes them must not
    fail its chunk (decoded as UTF-8, bad bytes replaced).

    With a ``streamer`` (the worker's), what is printed goes to the caller while the task
    runs (_Streamer); what is left when the chunk ends goes with its result."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, cap: int = OUTPUT_CAP_BYTES, streamer=None, where=None):
        self.offset = 0
        self.parts: dict[int, list[str]] = {}
        self.room = cap
        self.dropped = 0
        self.buffer = self  # sys.stdout.buffer.write(b"...") lands here too
        self.streamer = streamer
        self.where = where  # (jid, chunk), for the streamer
        self.streamed = 0  # output messages sent while the chunk ran

    def write(self, text):
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8", "replace")
        n = len(text)
        if n > self.room:
            self.dropped += n - max(self.room, 0)
            text = text[:max(self.room, 0)]
        if text:
            self.room -= len(text)
            if self.streamer is None:
                self.parts.setdefault(self.offset, []).append(text)
            else:
                with self.streamer.lock:
                    self.parts.setdefault(self.offset, []).append(text)
                self.streamer.poke()
        return n

    def flush(self):
        pass

    def isatty(self):
        return False

    def fileno(self):
        raise OSError("a pyworker task's output is captured; it has no file descriptor")

    def take(self) -> dict[int, str]:
        """What was printed since the last take (the streamer's, under its lock)."""
        out = {k: "".join(v) for k, v in self.parts.items()}
        self.parts = {}
        return out

    def texts(self) -> dict[int, str]:
        """What the result carries: what was not streamed, and under offset -1 how many
        output messages were (the caller shows those first)."""
        if self.streamer is not None:
            self.streamer.detach(self)
        out = self.take()
        if self.dropped:
            last = max(out) if out else 0
            out[last] = out.get(last, "") + f"\n... {self.dropped} bytes dropped (a task prints " \
                f"at most {OUTPUT_CAP_BYTES} bytes)\n"
        if self.streamed:
            out[-1] = self.streamed
        return out


class _Streamer:
    """Sends what a running task printed to its caller about once a second (STREAM_AFTER_S),
    so that a long task's progress shows while it runs. A thread of its own, asleep unless a
    task printed something: a task that prints nothing never wakes it (and a thread that
    wakes while a task runs takes the GIL from it). It sends under its lock, so once a chunk's
    capture is detached nothing of it is sent later than its result."""

    def __init__(self, worker):
        self.worker = worker
        self.lock = threading.Lock()
        self.pending = threading.Event()
        self.capture: _OutputCapture | None = None
        self.thread: threading.Thread | None = None

    def attach(self, capture: _OutputCapture):
        with self.lock:
            self.capture = capture

    def detach(self, capture: _OutputCapture):
        with self.lock:  # (waits for a send under way)
            if self.capture is capture:
                self.capture = None

    def poke(self):
        if not self.pending.is_set():
            self.pending.set()
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True,
                                               name="pyworker-output")
                self.thread.start()

    def _run(self):
        while True:
            self.pending.wait()
            time.sleep(STREAM_AFTER_S)
            with self.lock:
                self.pending.clear()
                capture = self.capture
                if capture is None:
                    continue
                parts = capture.take()
                if not parts:
                    continue
                jid, chunk = capture.where
                try:
                    self.worker.send_output(jid, chunk, parts)
                    capture.streamed += len(parts)
                except Exception as exc:  # it goes with the result instead
                    log.warning("worker %s: could not send a task's output: %s",
                                self.worker.name, exc)
                    for offset, text in parts.items():
                        capture.parts.setdefault(offset, []).insert(0, text)


class TaskLogHandler(logging.Handler):
    """Records that a task logs (not pyworker's own) go with what it prints to its caller,
    formatted as logging's last-resort handler does (level:logger:message)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))

    def emit(self, record):
        stream = sys.stderr
        if isinstance(stream, _OutputCapture) and not record.name.startswith("pyworker"):
            try:
                stream.write(self.format(record) + "\n")
            except Exception:
                self.handleError(record)


def _exit_error(exc: BaseException) -> Exception:
    """What a task's SystemExit, KeyboardInterrupt or GeneratorExit becomes: an error of its
    item, which re-raised in the caller must not exit or interrupt the caller itself."""
    err = TaskExitError(f"raised {type(exc).__name__}({', '.join(repr(a) for a in exc.args)}) "
                        "(sys.exit() or argparse in the task?): it failed alone, its worker "
                        "went on")
    err.__cause__ = exc
    err.__traceback__ = exc.__traceback__
    return err


def _approx_bytes(value) -> int:
    """About how many bytes a result takes pickled: exact for arrays, bytes and strings, a
    pickle of it otherwise (only a sample of a chunk's results is measured)."""
    nbytes = getattr(value, "nbytes", None)
    if type(nbytes) is int:
        return nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    try:
        return len(serialize.dumps_data(value))
    except Exception:
        return 0  # unpicklable: pack_results says so for its item


CHECK_EVERY_MAX = 1024  # items between two looks at the size of a chunk's results


def run_chunk(fn, mode: int, items, capture, board=None, failed=None, budget: int = 0):
    """Apply fn to every item; exceptions are caught per item so one bad item loses no others.
    The loop carries nothing it does not need (a chunk of no-ops is mostly loop): the call is
    chosen once per chunk, and an exception resumes the loop after its item.

    ``capture``: what items print is captured (True, or the _OutputCapture to use).
    ``board`` (board.Board): the task is watched, each item's start is written there, so that
    a supervisor can tell which item killed its executor or overran its time limit.
    ``failed``: offset -> packed exception, for items that are not run again (they killed
    executors too often, or overran their time limit).
    ``budget``: about how many bytes the chunk's results may take. After items 1, 2, 4 ... (at
    most CHECK_EVERY_MAX apart) the size of the last result, times the items since the last
    look, is added up; past the budget the chunk stops there, and the items not run go back to
    the caller (returned as ``rest``, their offset), so that small inputs with big results do
    not run a worker out of memory.

    Returns (values, errors, outputs, rest): rest is None, or the offset of the first item not
    run (values then has that many entries)."""
    values = [None] * len(items)
    errors = {}
    out = capture if isinstance(capture, _OutputCapture) else _OutputCapture() if capture \
        else None
    saved = sys.stdout, sys.stderr
    if out is not None:
        sys.stdout = sys.stderr = out
    if mode == protocol.MODE_ONE:
        call = fn
    elif mode == protocol.MODE_STAR:
        def call(item):
            return fn(*item)
    else:
        def call(item):
            return fn(*item[0], **item[1])
    n, offset, stop = len(items), 0, len(items)
    look, step, looked, size = (1, 1, 0, 0) if budget else (n, n, 0, 0)
    try:
        while offset < stop:
            try:
                end = min(look, stop)
                if board is not None or failed:
                    for offset in range(offset, end):
                        if failed and offset in failed:
                            errors[offset] = failed[offset]
                            continue
                        if out is not None:
                            out.offset = offset
                        if board is not None:
                            board.item(offset)
                        values[offset] = call(items[offset])
                elif out is None:
                    for offset in range(offset, end):
                        values[offset] = call(items[offset])
                else:
                    for offset in range(offset, end):
                        out.offset = offset
                        values[offset] = call(items[offset])
                offset = end
                if offset == look and offset < stop:
                    size += _approx_bytes(values[offset - 1]) * (offset - looked)
                    looked = offset
                    if size > budget:
                        stop = offset
                    step = min(step * 2, CHECK_EVERY_MAX)
                    look = offset + step
            except Exception as exc:
                errors[offset] = serialize.pack_exception(exc)
                offset += 1
            except BaseException as exc:  # the task's own sys.exit(), not the worker's stop
                errors[offset] = serialize.pack_exception(_exit_error(exc))
                offset += 1
    finally:
        sys.stdout, sys.stderr = saved
    if board is not None:
        board.item(-1)  # past the items: the results are being pickled
    if stop < n:
        del values[stop:]
        return values, errors, (out.texts() if out is not None else {}), stop
    return values, errors, (out.texts() if out is not None else {}), None


def pack_results(values, errors, outputs, buffers: list | None = None, rest=None) -> bytes:
    """The pickled (values, errors, outputs), and rest when the chunk came back in part; with a
    ``buffers`` list, big buffers out of band."""
    body = (values, errors, outputs) if rest is None else (values, errors, outputs, rest)
    try:
        return serialize.dumps_data(body, buffers)
    except Exception:
        if buffers:
            del buffers[:]
    for offset, value in enumerate(values):
        if offset in errors:
            continue
        try:
            serialize.dumps_data(value)
        except Exception as exc:
            wrapped = serialize.SerializationError(
                f"the result ({type(value).__name__}) cannot be sent back: "
                f"{type(exc).__name__}: {exc}"
            )
            errors[offset] = serialize.pack_exception(wrapped)
            values[offset] = None
    body = (values, errors, outputs) if rest is None else (values, errors, outputs, rest)
    return serialize.dumps_data(body, buffers)


def fit_results(values, errors, outputs, rest, limit: int):
    """Results whose message is over ``limit`` bytes: an item whose own result is over it fails
    with SerializationError (on every transport alike); if the rest are still over it
    together, only the leading items that fit are sent, and the others go back to the caller
    to be run again in a chunk of their own (rest). Returns (values, errors, outputs, rest)."""
    sizes = []
    for offset, value in enumerate(values):
        size = 0
        if offset not in errors:
            try:
                size = serialize.payload_size(serialize.dumps_data(value, oob := []), oob)
            except Exception:
                size = 0  # pack_results says why it cannot go
        if size > limit:
            errors[offset] = serialize.pack_exception(serialize.SerializationError(
                f"returned a result of {size / 2**20:.1f} MiB pickled, over the limit of "
                f"{limit / 2**20:g} MiB (PYWORKER_MAX_MESSAGE_MB); return less (a file path, "
                "a smaller array) or raise the limit on the workers and the caller"))
            values[offset], size = None, 0
        sizes.append(size)
    total, keep = 0, len(values)
    for offset, size in enumerate(sizes):
        total += size
        if total > limit * 0.9 and offset > 0:  # (room for the errors and outputs)
            keep = offset
            break
    if keep < len(values):
        del values[keep:]
        errors = {k: v for k, v in errors.items() if k < keep}
        outputs = {k: v for k, v in outputs.items() if k < keep}
        rest = keep if rest is None else min(rest, keep)
    return values, errors, outputs, rest


class TaskPlan:
    """What a supervisor tells the next executor about a task that killed the one before:
    watch it item by item, and which items not to run again (they failed for good)."""

    def __init__(self):
        self.watch = False
        self.failed: dict[int, tuple] = {}  # offset (-1: the whole chunk) -> packed exception
        self.deaths: dict[int, int] = {}  # offset (-1: outside any item) -> executors it killed


class Worker:
    """The executor: takes tasks from Redis, runs them, sends the results back. It runs user
    code, so it runs in a process of its own that its supervisor (supervisor.py) forks and
    replaces when it dies; the supervisor registers the worker, keeps its lease and reaps.
    Both use the worker's one id in Redis (``worker_id``, the supervisor's; by default the
    name itself)."""

    def __init__(self, settings: Settings, broker: Broker | None = None,
                 board: Board | None = None, plans: dict[str, TaskPlan] | None = None,
                 worker_id: str | None = None):
        self.settings = settings
        self.name = worker_id or protocol.check_name("worker name", settings.worker_name)
        self.broker = broker or Broker(settings)
        self.signer = serialize.Signer(settings.secret)
        self.limit_bytes = int(settings.max_message_mb * 2**20)
        self.shm = shm.Store.open(settings)
        self.functions: OrderedDict[str, object] = OrderedDict()
        self._function_bytes: dict[str, int] = {}
        self.stopping = threading.Event()
        self.board = board if board is not None else Board()
        self.streamer = _Streamer(self)
        self.plans = plans if plans is not None else {}
        self.done = 0
        self.tasks_run = 0
        self.recycle_reason: str | None = None
        self._rss_every = 0.0
        self._statm = None
        self._cwd = os.getcwd()
        self._on_term = None
        # Items done go to Redis (throughput, status()) at most once per heartbeat interval,
        # with a result when there is one: with every result would cost every task Redis calls.
        self._uncounted = 0
        # What the next beat adds to the metrics' counters (protocol.counter_fields order).
        self._counts = [0] * len(protocol.counter_fields())
        self._beat_at = 0.0
        self._beat_lock = threading.Lock()
        self._task_ctx = protocol.mac_context(protocol.KIND_TASK)
        # Jobs whose tasks this worker could not verify -> when (monotonic): it takes no more
        # of their tasks for a job TTL (Broker.skip_jobs).
        self.refused: OrderedDict[str, float] = OrderedDict()
        self._alive: dict[str, int] = {}  # jid -> verified 'alive' record's time

    # --- lifecycle -----------------------------------------------------------------------------

    def install_signal_handlers(self):
        def on_term(signum, frame):
            if self.stopping.is_set():
                os._exit(128 + signum)  # a second signal: stop now; the supervisor gives back
            log.info("worker %s: %s received, stopping after the current task",
                     self.name, signal.Signals(signum).name)
            self.stopping.set()

        self._on_term = on_term
        signal.signal(signal.SIGTERM, on_term)
        # Ctrl-C in a terminal reaches the whole process group: the supervisor decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def run(self) -> int:
        """Run tasks until stopped, or due to be replaced (recycling). What the worker holds in
        Redis is run first: tasks the executor before this one had taken."""
        self._loop(deque(self._adopt_held()))
        self.board.end(board.RECYCLING if self.recycle_reason else board.STOPPING)
        return 0

    def _adopt_held(self) -> list[bytes]:
        mine = self.broker.held_tasks(self.name)
        first = [t for f, t in mine.items() if f in self.plans]  # the one that killed
        return self._adopt(first + [t for f, t in mine.items() if f not in self.plans])

    def _recycle_due(self) -> bool:
        """Between tasks: has this executor run its share of tasks, or grown past the memory
        limit (PYWORKER_MAX_TASKS_PER_CHILD, PYWORKER_MAX_MEMORY_MB)?"""
        s = self.settings
        if s.max_tasks_per_child and self.tasks_run >= s.max_tasks_per_child:
            self.recycle_reason = f"it ran {self.tasks_run} tasks (PYWORKER_MAX_TASKS_PER_CHILD)"
            return True
        if s.max_memory_mb:
            now = time.monotonic()
            if now < self._rss_every:  # at most every 10 ms: a task of µs pays nothing
                return False
            self._rss_every = now + 0.01
            rss = self._rss()
            if rss > s.max_memory_mb * 2**20:
                self.recycle_reason = (f"its memory ({rss / 2**20:.0f} MiB resident) passed "
                                       f"PYWORKER_MAX_MEMORY_MB={s.max_memory_mb:g}")
                return True
        return False

    def _rss(self) -> int:
        if self._statm is None:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        return int(os.pread(self._statm, 100, 0).split()[1]) * mmap.PAGESIZE

    def _restore(self):
        """What a task may have changed for the tasks after it: the working directory, and the
        handler that lets the worker stop gracefully."""
        if os.getcwd() != self._cwd:
            os.chdir(self._cwd)
        # (_signal: signal.getsignal turns the answer into an enum, 3 µs a task here)
        if self._on_term is not None and _signal.getsignal(signal.SIGTERM) is not self._on_term:
            signal.signal(signal.SIGTERM, self._on_term)

    def _loop(self, held: deque):
        """Run tasks until stopped. While tasks are quick, the worker holds one more than it
        runs (finish takes it, see queue._FINISH): it then sends each result and runs the
        held task at once, reading Redis' answer (the next task to hold) after that task, so
        no round trip stands between two tasks. A held task stays in the worker's active hash
        like the one it runs, so a worker that dies loses neither, and one that stops gives
        back what it had not started (deregister_worker)."""
        answer = None  # settles a result sent ahead: its answer is (kept, tasks taken)
        idle_wait = self.settings.idle_wait_s
        resync = False  # after a lost connection: what does Redis say this worker holds?
        last_failure = float("-inf")
        if not held:
            try:
                first = self.broker.dequeue(self.name)
            except (PyworkerConnectionError, RedisError) as exc:  # the loop looks again
                log.error("worker %s: %s", self.name, exc)
                first, resync = None, True
            if first is not None:
                held.append(first)
        while not self.stopping.is_set():
            try:
                if not held and self._counts[0]:
                    self._count_done()
                if resync and answer is None:
                    # A dequeue whose answer was lost may have run: its task is in Redis as
                    # this worker's, and nobody else would ever run it.
                    known = {_field(t) for t in held}
                    mine = self.broker.held_tasks(self.name)
                    held.extend(self._adopt([t for f, t in mine.items() if f not in known]))
                    resync = False
                if answer is not None and not held:
                    answer, settle = None, answer
                    held.extend(settle())
                    continue
                if not held:
                    # Reached only when the queues were empty at the last look.
                    # (items done and not yet counted go in within a beat, not a long wait)
                    wait = min(idle_wait, self.settings.heartbeat_s) if self._counts[0] \
                        else idle_wait
                    if self.refused:
                        # Off the idle stack (it skips jobs it cannot verify): nothing wakes
                        # it for a new task but a common token, so it looks for itself.
                        self._skip_refused()
                        wait = min(wait, self.settings.idle_wait_s)
                    task = self.broker.wait_and_dequeue(self.name, wait, self.stopping)
                    if task is not None:
                        held.append(task)
                        idle_wait = self.settings.idle_wait_s
                    else:
                        idle_wait = min(idle_wait * 2, max(IDLE_WAIT_MAX_S,
                                                           self.settings.idle_wait_s))
                    continue
                started = time.monotonic()
                report = self._process(held[0])
                self.board.end()
                self._restore()
                ran = held.popleft()
                if answer is not None:
                    answer, settle = None, answer
                    # what it holds besides: the task just run (its result not sent yet) too
                    held.extend(settle(holding=(ran, *held)))
                if report is None:
                    continue
                self.tasks_run += 1
                if self._recycle_due():
                    self.stopping.set()
                quick = time.monotonic() - started < LOOKAHEAD_MAX_S
                if self.stopping.is_set():
                    self._report(report, 0)
                elif held:
                    answer = self._report_ahead(report, 1 if quick else 0)
                else:
                    held.extend(self._report(report, 2 if quick else 1))
            except (PyworkerConnectionError, RedisError) as exc:  # none ends the loop
                resync = True
                # The first failure in a while is retried at once (a dropped connection: the
                # pool makes a new one, and a task whose answer was lost waits for it); failures
                # in a row wait, so that an outage is not hammered.
                now = time.monotonic()
                if now - last_failure > RETRY_AT_ONCE_AFTER_S:
                    log.error("worker %s: %s; retrying at once", self.name, exc)
                else:
                    log.error("worker %s: %s; retrying in 1 s", self.name, exc)
                    self.stopping.wait(1.0)
                last_failure = now
        if answer is not None:
            try:
                answer()  # what it took stays held in Redis: the next executor runs it, or
            except (PyworkerConnectionError, RedisError) as exc:  # deregistering gives it back
                log.error("worker %s: could not send a result: %s", self.name, exc)
        if self._counts[0]:
            try:
                self._count_done(force=True)
            except (PyworkerConnectionError, RedisError):
                pass

    def _count_done(self, force: bool = False):
        """Items done since the last beat go into Redis' figures (an idle worker's last ones)."""
        due = self._due_beat(None, force)
        if due is not None:
            try:
                self.broker.heartbeat(self.name, *due)
            except BaseException:
                self._missed_beat(due)
                raise

    # --- one task ------------------------------------------------------------------------------

    def _process(self, task: bytes) -> _Report | None:
        """Run one task: its report to send, or None if it was dropped (and said so)."""
        try:
            line = protocol.header_line(task)
            lost = protocol.lost_marker(line) if b" !lost " in line else None
            if lost is not None:
                self._answer_lost(task, line, lost)
                return None
            header = protocol.parse_task_header(line)
        except ValueError as exc:
            ids = protocol.task_ids(task[:512])
            if ids is None:
                log.error("worker %s: dropped a malformed task (%s)", self.name, exc)
                return None
            # Most likely a caller with another pyworker version: say so to it, or it waits
            # for a result that never comes. (Not the header's text: it is not verified.)
            reason = (f"worker {self.name} (pyworker {__version__}) cannot read the task's "
                      "header: caller and workers must run the same pyworker version")
            log.error("worker %s: refused chunk %d of job %s: %s (%s)", self.name, ids[1], ids[0],
                      reason, exc)
            self._drop(protocol.TaskHeader(ids[0], ids[1], "", "", "", False),
                       protocol.STATUS_MISMATCH, reason)
            return None
        field = f"{header.jid} {header.chunk}"
        plan = self.plans.get(field)
        self.board.begin(field, header.timeout)
        payload = None
        if header.ref:
            payload = self.broker.task_payload(header.jid, header.chunk)
            if payload is None:  # the job ended, or the chunk is done, after this was queued
                self._drop(header, protocol.STATUS_RESEND, "the task's payload left Redis")
                return None
        try:
            _, payload = self.signer.open(self._task_ctx, task, payload, line)
        except SignatureError as exc:
            self._refuse(header, exc)
            return None
        if not self._alive_now(header):
            log.error("worker %s: did not run task %d of job %s: the job is not alive (it "
                      "ended, or this is an old task put back into Redis)", self.name,
                      header.chunk, header.jid)
            self.broker.forget_tasks(self.name, header.jid, field)
            return None
        if (header.python, header.cloudpickle) != (serialize.PYTHON_VERSION,
                                                    serialize.CLOUDPICKLE_VERSION):
            reason = (f"caller runs Python {header.python} with cloudpickle {header.cloudpickle}, "
                      f"worker {self.name} runs Python {serialize.PYTHON_VERSION} with cloudpickle "
                      f"{serialize.CLOUDPICKLE_VERSION}; use the same versions on both sides")
            log.error("worker %s: refused job %s: %s", self.name, header.jid, reason)
            self._drop(header, protocol.STATUS_MISMATCH, reason)
            return None
        buffers = None
        if header.shared:
            try:
                payload, buffers = self._read_segment(header, payload)
            except shm.SegmentTampered as exc:
                log.error("worker %s: rejected task %d of job %s without unpickling it: %s",
                          self.name, header.chunk, header.jid, exc)
                self._drop(header, protocol.STATUS_REJECTED, f"shared memory: {exc}")
                return None
            except (OSError, ValueError) as exc:
                # Not on the caller's host after all, or the file is gone: the caller resends
                # the chunk through Redis (or ignores this, if the chunk is already done).
                self._drop(header, protocol.STATUS_RESEND, f"{type(exc).__name__}: {exc}")
                return None
        try:
            if plan is not None and -1 in plan.failed:
                raise _Failed(plan.failed[-1])
            fn = self._function(header.fn_sha)
            mode, items = serialize.loads(payload, buffers)
        except _Failed as failed:
            values, errors, outputs = [], {-1: failed.packed}, {}
            items, run_s = (), 0.0
        except SignatureError as exc:
            log.error("worker %s: rejected function of job %s without unpickling it: %s",
                      self.name, header.jid, exc)
            self._drop(header, protocol.STATUS_REJECTED, f"function: {exc}")
            return None
        except Exception as exc:
            # The whole chunk fails alike (offset -1): say why, for every item, to the caller.
            values, errors, outputs, rest = [], {-1: serialize.pack_exception(exc)}, {}, None
            items, run_s = (), 0.0
        else:
            watch = header.timeout > 0 or (plan is not None and plan.watch)
            capture = None
            if self.settings.forward_output:
                capture = _OutputCapture(streamer=self.streamer, where=(header.jid, header.chunk))
                self.streamer.attach(capture)
            started = time.perf_counter()
            values, errors, outputs, rest = run_chunk(
                fn, mode, items, capture,
                self.board if watch else None, plan.failed if plan is not None else None,
                self.limit_bytes)
            run_s = time.perf_counter() - started
        del payload, buffers  # the task's memory can go before the result is written
        # Big buffers out of band only if the result may go back through shared memory.
        oob = [] if self.shm is not None and header.shm != protocol.NO_SHM else None
        body = pack_results(values, errors, outputs, oob, rest)
        size = serialize.payload_size(body, oob)
        if size > self.limit_bytes:
            values, errors, outputs, rest = fit_results(values, errors, outputs, rest,
                                                        self.limit_bytes)
            oob = [] if oob is not None else None
            body = pack_results(values, errors, outputs, oob, rest)
            size = serialize.payload_size(body, oob)
        segment = None
        owner = self._shm_owner(header) if size > protocol.INLINE_MAX_BYTES else None
        if oob is not None and owner is not None:
            try:
                segment = self.shm.write(header.jid, header.chunk, shm.RESULT, owner, body, oob)
            except OSError as exc:
                log.warning("worker %s: shared memory failed (%s); the result goes through Redis",
                            self.name, exc)
        if segment is None and oob:
            body = pack_results(values, errors, outputs, None, rest)  # in-band, for Redis
            size = len(body)
        if segment is not None:
            flag, body, inline = protocol.SHARED, segment.encode(), True
        else:
            inline = size <= protocol.INLINE_MAX_BYTES
            flag = protocol.INLINE if inline else protocol.BY_REF
        result = self.signer.seal(
            protocol.mac_context(protocol.KIND_RESULT, header.jid),
            protocol.result_header(header.chunk, protocol.STATUS_OK, self.name, flag), body,
            inline)
        return _Report(header, result, len(values) if rest is not None else len(items),
                       None if inline else body,
                       segment.name if segment is not None else None, run_s,
                       -1 if -1 in errors else len(errors))

    def _shm_owner(self, header) -> str | None:
        """The caller's owner tag if a big result may go back through shared memory: the
        caller said which directory it uses, and it is this worker's."""
        if self.shm is None or header.shm == protocol.NO_SHM:
            return None
        tag = shm.Store.parse_tag(header.shm)
        if tag is None or tag[0] != self.shm.ident:
            return None
        return tag[1]

    def _read_segment(self, header, descriptor):
        if self._shm_owner(header) is None:
            raise OSError("this worker does not share the caller's shared-memory directory")
        desc = shm.Descriptor.parse(descriptor)
        if desc.jid != header.jid or desc.kind != shm.TASK:
            raise shm.SegmentTampered("the segment belongs to another task")
        return self.shm.read(desc, self.limit_bytes)

    def _due_beat(self, report: _Report | None, force: bool = False):
        """Count a report's items and its task (the metrics' counters); (items not yet counted
        in Redis, total, counter deltas) when a beat is due (a heartbeat interval since the
        last, or ``force``), else None."""
        with self._beat_lock:
            if report is not None:
                n = report.n_items
                self.done += n
                self._uncounted += n
                counts = self._counts
                counts[0] += 1
                counts[2] += n
                if report.failed:
                    counts[1] += 1
                    counts[3] += n if report.failed < 0 else report.failed
                counts[4] += int(report.run_s * 1e6)
                counts[_FIRST_BUCKET + bisect.bisect_left(protocol.TASK_SECONDS_BUCKETS,
                                                          report.run_s)] += 1
            now = time.monotonic()
            if now - self._beat_at < self.settings.heartbeat_s and not force:
                return None
            beat = (self._uncounted, self.done, protocol.counter_deltas(self._counts))
            self._uncounted, self._beat_at = 0, now
            self._counts = [0] * len(self._counts)
            return beat

    def _missed_beat(self, beat):
        with self._beat_lock:
            self._uncounted += beat[0]  # counted with the next beat
            for i, v in enumerate(beat[2].split()):
                self._counts[i] += int(v)
            self._beat_at = 0.0

    def _report(self, report: _Report, take: int) -> list[bytes]:
        """Send a result and take up to ``take`` tasks (see queue._FINISH); the tasks taken."""
        return self._settle(report, take, self._due_beat(report))

    def _report_ahead(self, report: _Report, take: int):
        """_report without waiting for Redis' answer: returns what waits for it."""
        beat = self._due_beat(report)
        h = report.header
        try:
            wait = self.broker.finish_later(self.name, h.jid, h.chunk, report.result, take,
                                            report.payload, had_payload=h.ref, beat=beat)
        except PyworkerConnectionError:
            wait = None  # sent again, and waited for, when its answer is due
        return partial(self._settle, report, take, beat, wait)

    def _settle(self, report: _Report, take: int, beat, wait=None, holding=()) -> list[bytes]:
        """The answer to a result (sent already, if ``wait`` reads its answer); sends it (again)
        until Redis takes it, for up to reconnect_s. ``holding``: the tasks this worker holds
        already (taken ahead, not started).

        A finish whose answer was lost may have run in Redis all the same: before sending it
        again, the worker looks at what Redis says it holds. Its task gone from there means
        the finish ran (the result is in, and what it took is there); sending it again would
        find the task no longer held, call the result not kept, and strand the tasks it took."""
        h = report.header
        deadline = time.monotonic() + self.settings.reconnect_s
        failed, attempts = False, 0
        while True:
            try:
                if wait is not None:
                    kept, tasks = wait()
                elif failed and (ran := self._ran(h, holding)) is not None:
                    kept, tasks = True, ran
                else:
                    kept, tasks = self.broker.finish(self.name, h.jid, h.chunk, report.result,
                                                     take, report.payload, had_payload=h.ref,
                                                     beat=beat, holding=bool(holding))
                break
            except PyworkerConnectionError as exc:
                wait, failed = None, True
                if time.monotonic() > deadline:
                    if beat is not None:
                        self._missed_beat(beat)
                    raise
                log.error("worker %s: could not send a result: %s; retrying", self.name, exc)
                if attempts:  # the first retry at once: the connection may just have dropped
                    time.sleep(0.5)
                attempts += 1
        if report.segment is not None and not kept:
            self.shm.remove(report.segment)  # nobody will read it
        return tasks

    def _ran(self, header, holding) -> list[bytes] | None:
        """After a lost answer: None if Redis still has the task as held by this worker (the
        finish did not run), else the tasks that finish took (held, and not in ``holding``).
        (If the worker was declared dead meanwhile, its tasks went back to the queues and it
        holds nothing: the result is then called kept, which at worst leaves a shared-memory
        segment for the sweep.)"""
        held = self.broker.held_tasks(self.name)
        if f"{header.jid} {header.chunk}" in held:
            return None
        known = {_field(t) for t in holding}
        return self._adopt([t for f, t in held.items() if f not in known])

    def _adopt(self, tasks: list[bytes]) -> list[bytes]:
        """Tasks found in this worker's active hash that it did not know of. One that a
        submit handed over is also waiting in its wake list: taken out of there, or the
        worker would run it a second time when it next waits."""
        self.broker.unhand(self.name, tasks)
        return tasks

    def send_output(self, jid: str, chunk: int, parts: dict[int, str]):
        """What items of a running chunk printed, to its caller now (the streamer's)."""
        self.broker.push_output(jid, [
            self.signer.seal(protocol.mac_context(protocol.KIND_OUTPUT, jid),
                             protocol.output_header(chunk, offset, self.name), text.encode())
            for offset, text in sorted(parts.items())])

    def _drop(self, header, status, reason, worker: str | None = None):
        msg = self.signer.seal(protocol.mac_context(protocol.KIND_RESULT, header.jid),
                               protocol.result_header(header.chunk, status, worker or self.name,
                                                      reason))
        self.broker.drop_task(self.name, header.jid, header.chunk, msg, had_payload=header.ref)

    def _answer_lost(self, task: bytes, line: bytes, lost: tuple[str, int, str, int]):
        """The reaper gave up on a task (its workers died too often) and queued it wrapped
        (protocol LOST_MARK): it has no key, so this worker checks the task and signs the
        'lost' answer."""
        jid, chunk, dead, deaths = lost
        inner = task[len(line):]
        try:
            inner_line = protocol.header_line(inner)
            header = protocol.parse_task_header(inner_line)
            if (header.jid, header.chunk) != (jid, chunk):
                raise ValueError("the task inside is another")
            payload = self.broker.task_payload(jid, chunk) if header.ref else None
            if header.ref and payload is None:
                raise ValueError("its payload left Redis")
            self.signer.open(self._task_ctx, inner, payload, inner_line)
        except SignatureError as exc:
            self._refuse(protocol.TaskHeader(jid, chunk, "", "", "", False), exc)
            return
        except ValueError as exc:
            log.error("worker %s: dropped a lost-task notice for chunk %d of job %s: %s",
                      self.name, chunk, jid, exc)
            self.broker.forget_tasks(self.name, jid, f"{jid} {chunk}")
            return
        log.error("worker %s: chunk %d of job %s fails: the workers running it died %d times "
                  "(the last: %s)", self.name, chunk, jid, deaths, dead)
        self._drop(header, protocol.STATUS_LOST, str(deaths), worker=dead)

    def _refuse(self, header, exc):
        """A task this worker cannot verify: given back for another worker, and this worker
        takes no more of its job's tasks (one worker with another key must not fail jobs)."""
        first = header.jid not in self.refused
        self.refused[header.jid] = time.monotonic()
        self.refused.move_to_end(header.jid)
        self._skip_refused()
        if first:
            log.error("worker %s: cannot verify the tasks of job %s: signing key differs (this "
                      "worker's PYWORKER_SECRET is not its caller's: %s); gave the task back to "
                      "the queue for another worker, and takes no more tasks of this job",
                      self.name, header.jid, exc)
        self.broker.give_back(self.name, header.jid, header.chunk)

    def _skip_refused(self):
        """The jobs dequeues skip: those refused within a job TTL (at most 64)."""
        horizon = time.monotonic() - self.settings.job_ttl_s
        for jid in [j for j, at in self.refused.items() if at < horizon]:
            del self.refused[jid]
        while len(self.refused) > 64:
            self.refused.popitem(last=False)
        self.broker.skip_jobs = list(self.refused)

    def _alive_now(self, header) -> bool:
        """Whether the task's job is alive: by the time signed into the task, else by the job's
        signed 'alive' record in Redis (a replayed old task, or a job that ended, is not)."""
        now = time.time()
        if now <= header.alive + protocol.CLOCK_SKEW_S:
            return True
        known = self._alive.get(header.jid)
        if known is not None and now <= known + protocol.CLOCK_SKEW_S:
            return True
        record = protocol.parse_alive_record(self.broker.job_alive_record(header.jid))
        if record is None or not hmac.compare_digest(
                record[1], self.signer.alive_mac(header.jid, record[0])):
            return False
        if len(self._alive) > 256:
            self._alive.clear()
        self._alive[header.jid] = record[0]
        return now <= record[0] + protocol.CLOCK_SKEW_S

    def _function(self, sha: str):
        fn = self.functions.get(sha)
        if fn is not None:
            self.functions.move_to_end(sha)
            return fn
        blob = self.broker.get_function(sha)
        if blob is None:
            raise LookupError(f"function {sha} is no longer in Redis (its job expired)")
        fn = serialize.loads_function(self.signer.open_blob(blob, sha))
        self.functions[sha] = fn
        # Bounded by count and by size: 16 closures that each hold a 200 MB model would
        # otherwise stay in memory together.
        self._function_bytes[sha] = len(blob)
        while len(self.functions) > 1 and (
                len(self.functions) > FUNCTION_CACHE_SIZE
                or sum(self._function_bytes.values()) > FUNCTION_CACHE_BYTES):
            old, _ = self.functions.popitem(last=False)
            self._function_bytes.pop(old, None)
        return fn


def _field(task: bytes) -> str | None:
    """A task message's field in its worker's active hash ("<jid> <chunk>")."""
    try:
        h = protocol.parse_task_header(protocol.header_line(task))
    except ValueError:
        return None
    return f"{h.jid} {h.chunk}"


class _Failed(Exception):
    """A task whose whole chunk failed for good (it killed executors outside any item)."""

    def __init__(self, packed):
        super().__init__()
        self.packed = packed
