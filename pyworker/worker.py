"""The worker loop: take a task, run it, send the result back; heartbeats; graceful stop."""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from functools import partial
from typing import NamedTuple

from . import protocol, serialize, shm
from ._version import __version__
from .config import Settings
from .errors import ConnectionError as PyworkerConnectionError
from .errors import RedisError
from .errors import SignatureError
from .queue import Broker

log = logging.getLogger("pyworker.worker")
FUNCTION_CACHE_SIZE = 16
# A worker whose tasks take less than this holds the next one while it runs the current one,
# so it can send a result without waiting for Redis' answer (see _loop). Longer tasks gain
# nothing from it, and a held task would wait behind them.
LOOKAHEAD_MAX_S = 1.0
# A connection failure this long after the last one is retried at once (see _loop).
RETRY_AT_ONCE_AFTER_S = 5.0


class _Report(NamedTuple):
    """A task's result, ready to send."""
    header: protocol.TaskHeader
    result: bytes  # the signed result message
    n_items: int
    payload: bytes | None  # the result payload, when it does not travel inline
    segment: str | None  # the result's shared-memory segment, if it has one


class _OutputCapture:
    """Collects what items print, tagged with the item's offset in the chunk."""

    def __init__(self):
        self.offset = 0
        self.parts: dict[int, list[str]] = {}

    def write(self, text):
        if text:
            self.parts.setdefault(self.offset, []).append(text)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return False

    def texts(self) -> dict[int, str]:
        return {k: "".join(v) for k, v in self.parts.items()}


def run_chunk(fn, mode: int, items: list, capture: bool):
    """Apply fn to every item; exceptions are caught per item so one bad item loses no others.
    The loop carries nothing it does not need (a chunk of no-ops is mostly loop): the call is
    chosen once per chunk, and an exception resumes the loop after its item."""
    values = [None] * len(items)
    errors = {}
    out = _OutputCapture() if capture else None
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
    n, offset = len(items), 0
    try:
        while offset < n:
            try:
                if out is None:
                    for offset in range(offset, n):
                        values[offset] = call(items[offset])
                else:
                    for offset in range(offset, n):
                        out.offset = offset
                        values[offset] = call(items[offset])
                offset = n
            except Exception as exc:
                errors[offset] = serialize.pack_exception(exc)
                offset += 1
    finally:
        sys.stdout, sys.stderr = saved
    return values, errors, (out.texts() if out is not None else {})


def pack_results(values, errors, outputs, buffers: list | None = None) -> bytes:
    """The pickled (values, errors, outputs); with a ``buffers`` list, big buffers out of band."""
    try:
        return serialize.dumps_data((values, errors, outputs), buffers)
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
    return serialize.dumps_data((values, errors, outputs), buffers)


class Worker:
    def __init__(self, settings: Settings, broker: Broker | None = None):
        self.settings = settings
        self.name = protocol.check_name("worker name", settings.worker_name)
        self.broker = broker or Broker(settings)
        self.signer = serialize.Signer(settings.secret)
        self.limit_bytes = int(settings.max_message_mb * 2**20)
        self.shm = shm.Store.open(settings)
        self.functions: OrderedDict[str, object] = OrderedDict()
        self.stopping = threading.Event()
        self.done = 0
        # The worker beats (lease, liveness, items done) at most once per heartbeat interval:
        # with a result when it has one, else from the heartbeat thread. Beating with every
        # result would cost every task several Redis calls, and a heartbeat thread that talks
        # to Redis while tasks run takes the GIL from them twice a beat.
        self._uncounted = 0
        self._beat_at = 0.0
        self._beat_lock = threading.Lock()
        self._hb_thread = None
        # The rest of a heartbeat's duties (see _duties) run between tasks, in the main thread;
        # the heartbeat thread steps in only when they are overdue.
        self._duty_lock = threading.Lock()
        self._duty_at = 0.0
        self._reap_at = 0.0

    # --- lifecycle -----------------------------------------------------------------------------

    def install_signal_handlers(self):
        def on_term(signum, frame):
            if self.stopping.is_set():
                raise SystemExit(128 + signum)  # a second signal: stop now, the task is re-run
            log.info("worker %s: %s received, stopping after the current task",
                     self.name, signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)

    def _wait_for_redis(self):
        """Redis may start after the workers (pods start in any order; LocalCluster starts
        both at once): retry for reconnect_s, every 20 ms at first and then less often, up to
        every second; one log line per attempt once it has taken a second; a wrong password
        fails at once."""
        start = time.monotonic()
        deadline = start + self.settings.reconnect_s
        pause = 0.02
        while True:
            try:
                return self.broker.ping()
            except PyworkerConnectionError as exc:
                if not exc.retryable or time.monotonic() >= deadline or self.stopping.is_set():
                    raise
                if time.monotonic() - start >= 1.0:
                    log.warning("worker %s: %s; retrying", self.name, exc)
                self.stopping.wait(pause)
                pause = min(pause * 2, 1.0)

    def run(self) -> int:
        b = self.broker
        self._wait_for_redis()
        # A worker restarted under the same name first puts back what its last life held.
        b.reap(force_name=self.name)
        if self.shm is not None:
            swept = self.shm.sweep()
            if swept:
                log.info("worker %s: removed %d shared-memory segment(s) of callers that are gone",
                         self.name, swept)
        self._started = time.time()
        b.register_worker(self.name, self._info())
        self._touch_heartbeat_file()
        self._duty_at = self._reap_at = time.monotonic()
        log.info("worker %s started: redis %s, pid %d, python %s, cloudpickle %s", self.name,
                 b.where, os.getpid(), serialize.PYTHON_VERSION, serialize.CLOUDPICKLE_VERSION)
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name="pyworker-heartbeat")
        self._hb_thread.start()
        try:
            self._loop()
        finally:
            self.stopping.set()
            # (bounded: a heartbeat stuck in a Redis call must not hold up the stop)
            self._hb_thread.join(timeout=1.0)
            try:
                with self._beat_lock:  # the last items into the throughput figures
                    last, self._uncounted = self._uncounted, 0
                if last:
                    b.heartbeat(self.name, last, self.done)
                b.deregister_worker(self.name)
            except PyworkerConnectionError as exc:
                log.error("worker %s: could not deregister: %s", self.name, exc)
            log.info("worker %s stopped: %d items done", self.name, self.done)
        return 0

    def _loop(self):
        """Run tasks until stopped. While tasks are quick, the worker holds one more than it
        runs (finish takes it, see queue._FINISH): it then sends each result and runs the
        held task at once, reading Redis' answer (the next task to hold) after that task, so
        no round trip stands between two tasks. A held task stays in the worker's active hash
        like the one it runs, so a worker that dies loses neither, and one that stops gives
        back what it had not started (deregister_worker)."""
        held: deque[bytes] = deque()
        answer = None  # settles a result sent ahead: its answer is (kept, tasks taken)
        resync = False  # after a lost connection: what does Redis say this worker holds?
        last_failure = float("-inf")
        try:
            first = self.broker.dequeue(self.name)
        except (PyworkerConnectionError, RedisError) as exc:  # the loop looks again
            log.error("worker %s: %s", self.name, exc)
            first, resync = None, True
        if first is not None:
            held.append(first)
        while not self.stopping.is_set():
            try:
                if time.monotonic() - self._duty_at >= self.settings.heartbeat_s:
                    self._duties(beat=not held)  # a busy worker beats with its results
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
                    task = self.broker.wait_and_dequeue(self.name, self.settings.idle_wait_s)
                    if task is not None:
                        held.append(task)
                    continue
                started = time.monotonic()
                report = self._process(held[0])
                ran = held.popleft()
                if answer is not None:
                    answer, settle = None, answer
                    # what it holds besides: the task just run (its result not sent yet) too
                    held.extend(settle(holding=(ran, *held)))
                if report is None:
                    continue
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
                answer()  # what it took stays held in Redis: deregistering gives it back
            except PyworkerConnectionError as exc:
                log.error("worker %s: could not send a result: %s", self.name, exc)

    def _info(self) -> dict:
        """What the worker registers (status(), shared memory, hand-offs: queue._SUBMIT)."""
        return {
            "host": socket.gethostname(), "pid": os.getpid(), "started": f"{self._started:.3f}",
            "done": self.done, "seen": f"{time.time():.3f}",
            "python": serialize.PYTHON_VERSION, "cloudpickle": serialize.CLOUDPICKLE_VERSION,
            "shm": self.shm.ident if self.shm is not None else "",
            "handoff": "1",  # a submit may hand it a task instead of a token
        }

    def _heartbeat_loop(self):
        """Does the heartbeat's duties when the main thread has not for a while: it is inside a
        long task (or stuck). Waking only then matters: each time this thread runs while a
        task does, the two pass the GIL back and forth, every few ms, at every system call
        (measured: about 0.8 ms of CPU a second, and the task preempted each time)."""
        overdue = self.settings.heartbeat_s * 1.5
        while not self.stopping.wait(max(0.0, self._duty_at + overdue - time.monotonic())):
            if time.monotonic() - self._duty_at >= overdue:
                self._duties()

    def _duties(self, beat: bool = True):
        """Every heartbeat: beat (unless beat=False: the results carry the beats), touch the
        heartbeat file; every lease/2, also reap the workers whose lease ended and register
        again if Redis lost this worker's registration. Whichever thread comes first does them;
        the other skips them."""
        if not self._duty_lock.acquire(blocking=False):
            return
        try:
            now = self._duty_at = time.monotonic()
            due = self._due_beat(0) if beat else None
            if due is not None:
                try:
                    self.broker.heartbeat(self.name, *due)
                except BaseException:
                    self._missed_beat(due)
                    raise
            self._touch_heartbeat_file()
            if now - self._reap_at >= self.settings.lease_s / 2:
                self._reap_at = now
                for dead in self.broker.reap():
                    log.info("worker %s: worker %s missed its lease; its tasks were re-queued",
                             self.name, dead)
                # A beat re-registers a worker Redis forgot, but with its lease alone: the
                # rest (host, shared memory, hand-offs) goes back here.
                if not self.stopping.is_set() and self.broker.registration_lost(self.name):
                    self.broker.register_worker(self.name, self._info())
                    log.warning("worker %s: Redis had lost this worker's registration (a "
                                "restart without persistence?); registered again", self.name)
        except (PyworkerConnectionError, RedisError) as exc:
            log.error("worker %s: heartbeat failed: %s", self.name, exc)
        except Exception:  # the heartbeat must outlive any surprise
            log.exception("worker %s: heartbeat error", self.name)
        finally:
            self._duty_lock.release()

    def _touch_heartbeat_file(self):
        """The liveness probe reads the file's mtime: one system call, after the first."""
        path = self.settings.heartbeat_file
        if path:
            try:
                os.utime(path)
            except FileNotFoundError:
                with open(path, "w") as f:
                    f.write(f"{self.name}\n")

    # --- one task ------------------------------------------------------------------------------

    def _process(self, task: bytes) -> _Report | None:
        """Run one task: its report to send, or None if it was dropped (and said so)."""
        try:
            line = protocol.header_line(task)
            header = protocol.parse_task_header(line)
        except ValueError as exc:
            ids = protocol.task_ids(task[:512])
            if ids is None:
                log.error("worker %s: dropped a malformed task (%s)", self.name, exc)
                return None
            # Most likely a caller with another pyworker version: say so to it, or it waits
            # for a result that never comes.
            reason = (f"worker {self.name} (pyworker {__version__}) cannot read the task's "
                      f"header ({exc}): caller and workers must run the same pyworker version")
            log.error("worker %s: refused chunk %d of job %s: %s", self.name, ids[1], ids[0],
                      reason)
            self._drop(protocol.TaskHeader(ids[0], ids[1], "", "", "", False),
                       protocol.STATUS_MISMATCH, reason)
            return None
        payload = None
        if header.ref:
            payload = self.broker.task_payload(header.jid, header.chunk)
            if payload is None:  # the job ended, or the chunk is done, after this was queued
                self._drop(header, protocol.STATUS_RESEND, "the task's payload left Redis")
                return None
        try:
            _, payload = self.signer.open(task, payload, line)
        except SignatureError as exc:
            log.error("worker %s: rejected task %d of job %s without unpickling it: %s",
                      self.name, header.chunk, header.jid, exc)
            self._drop(header, protocol.STATUS_REJECTED,
                       f"the task's signature does not match this worker's secret ({exc}); "
                       "caller and workers must share the same PYWORKER_SECRET")
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
            fn = self._function(header.fn_sha)
            mode, items = serialize.loads(payload, buffers)
        except SignatureError as exc:
            log.error("worker %s: rejected function of job %s without unpickling it: %s",
                      self.name, header.jid, exc)
            self._drop(header, protocol.STATUS_REJECTED, f"function: {exc}")
            return None
        except Exception as exc:
            # The whole chunk fails alike (offset -1): say why, for every item, to the caller.
            values, errors, outputs = [], {-1: serialize.pack_exception(exc)}, {}
            items = ()
        else:
            values, errors, outputs = run_chunk(fn, mode, items, self.settings.forward_output)
        del payload, buffers  # the task's memory can go before the result is written
        # Big buffers out of band only if the result may go back through shared memory.
        oob = [] if self.shm is not None and header.shm != protocol.NO_SHM else None
        body = pack_results(values, errors, outputs, oob)
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
            body = pack_results(values, errors, outputs)  # in-band, for Redis
            size = len(body)
        if segment is not None:
            flag, body, inline = protocol.SHARED, segment.encode(), True
        else:
            inline = size <= protocol.INLINE_MAX_BYTES
            flag = protocol.INLINE if inline else protocol.BY_REF
        result = self.signer.seal(
            protocol.result_header(header.chunk, protocol.STATUS_OK, self.name, flag), body,
            inline)
        return _Report(header, result, len(items), None if inline else body,
                       segment.name if segment is not None else None)

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

    def _due_beat(self, n_items: int):
        """Add n_items to the items done; (items not yet counted in Redis, total) when a beat
        is due (a heartbeat interval since the last), else None."""
        with self._beat_lock:
            self.done += n_items
            self._uncounted += n_items
            now = time.monotonic()
            if now - self._beat_at < self.settings.heartbeat_s:
                return None
            beat, self._uncounted, self._beat_at = (self._uncounted, self.done), 0, now
            return beat

    def _missed_beat(self, beat):
        with self._beat_lock:
            self._uncounted += beat[0]  # counted with the next beat
            self._beat_at = 0.0

    def _report(self, report: _Report, take: int) -> list[bytes]:
        """Send a result and take up to ``take`` tasks (see queue._FINISH); the tasks taken."""
        return self._settle(report, take, self._due_beat(report.n_items))

    def _report_ahead(self, report: _Report, take: int):
        """_report without waiting for Redis' answer: returns what waits for it."""
        beat = self._due_beat(report.n_items)
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

    def _drop(self, header, status, reason):
        msg = protocol.result_header(header.chunk, status, self.name, reason)
        self.broker.drop_task(self.name, header.jid, header.chunk, msg, had_payload=header.ref)

    def _function(self, sha: str):
        fn = self.functions.get(sha)
        if fn is not None:
            self.functions.move_to_end(sha)
            return fn
        blob = self.broker.get_function(sha)
        if blob is None:
            raise LookupError(f"function {sha} is no longer in Redis (its job expired)")
        fn = serialize.loads(self.signer.open_blob(blob))
        self.functions[sha] = fn
        while len(self.functions) > FUNCTION_CACHE_SIZE:
            self.functions.popitem(last=False)
        return fn


def _field(task: bytes) -> str | None:
    """A task message's field in its worker's active hash ("<jid> <chunk>")."""
    try:
        h = protocol.parse_task_header(protocol.header_line(task))
    except ValueError:
        return None
    return f"{h.jid} {h.chunk}"


def main(settings: Settings) -> int:
    worker = Worker(settings)
    worker.install_signal_handlers()
    return worker.run()
