"""The caller's side of a job: functions and chunks in, results out, keys kept alive meanwhile."""
from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import weakref

from . import config, protocol, serialize, ship, shm, versions
from .config import Settings
from .errors import ConnectionError as PyworkerConnectionError
from .errors import JobLostError, SerializationError, SignatureError, VersionMismatchError
from .queue import FUNCTION_MISSING, Broker

MAX_WAKE_TOKENS = 256
# Without results for this long, a job checks that Redis still has it (one EXISTS).
LOST_CHECK_S = 2.0
_TASK_CONTEXT = protocol.mac_context(protocol.KIND_TASK)
log = logging.getLogger("pyworker")
# A take waits for one result and brings up to this many more that are in Redis already.
MAX_TAKE_AHEAD = 8
SHM_SWEEP_EVERY_S = 10.0  # orphaned segments are looked for at most this often, at a job start


def show_output(worker: str, text: str):
    """What a task printed, in this process's stdout, each line after its worker's name."""
    lines = text.splitlines(keepends=True)
    sys.stdout.write("".join(f"[{worker}] {line}" for line in lines))
    if not text.endswith("\n"):
        sys.stdout.write("\n")


class ChunkResult:
    __slots__ = ("chunk", "status", "worker", "detail", "values", "errors", "outputs", "rest",
                 "nbytes")

    def __init__(self, chunk, status, worker, detail="", values=None, errors=None, outputs=None,
                 rest=None, nbytes=0):
        self.chunk = chunk
        self.status = status
        self.worker = worker
        self.detail = detail
        self.values = values
        self.errors = errors or {}
        self.outputs = outputs or {}
        # None, or the offset of the first item the worker did not run: the chunk's results
        # would have been over the message limit, so the rest is for the caller to send again
        self.rest = rest
        self.nbytes = nbytes  # the result's size pickled (the caller sizes chunks by it)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _weakrefable(obj) -> bool:
    return type(obj).__weakrefoffset__ != 0


_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork():
    """A forked child starts with no jobs and a lock nobody holds (the parent's keeper thread
    may have held it at the fork); its Redis pools are emptied by connection.py."""
    for client in list(_clients):
        client._lock = threading.Lock()
        client._jobs = weakref.WeakSet()
        client._keeper = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Client:
    """One connection to one Redis: creates jobs and keeps their keys alive while they run."""

    def __init__(self, settings: Settings | None = None, **overrides):
        self.settings = settings or Settings.from_env(**overrides)
        self.broker = Broker(self.settings)
        self.signer = serialize.Signer(self.settings.secret)
        self.limit_bytes = int(self.settings.max_message_mb * 2**20)
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()
        self._uploaded: dict[str, float] = {}  # sha -> when its blob's TTL was last set in full
        self.caller_host = socket.gethostname()
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._last_reap = 0.0
        self._warned_no_workers = False
        self.spin_s = self.settings.spin_s if _cores() > 1 else 0.0
        # (live workers, whether all share this caller's memory, when, by environment)
        self._workers_seen: tuple[int, bool, float, dict] | None = None
        self.versions = versions.Checker(self.settings.ship_modules)
        self.shm = shm.Store.open(self.settings)
        self._last_sweep: float | None = None
        self._by_reference: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._groups: dict[str, Client] = {}
        _clients.add(self)

    @property
    def group(self) -> str:
        return self.settings.group

    def for_group(self, group: str | None) -> "Client":
        """The client of the same Redis for another worker group (None: this one). Made once,
        with its own pool and keep-alive: a group is a queue of its own (Settings.queue_prefix)."""
        if group is None or group == self.settings.group:
            return self
        with self._lock:
            other = self._groups.get(group)
            if other is None:
                other = self._groups[group] = Client(self.settings.for_group(group))
            return other

    def groups(self) -> list[str]:
        """The worker groups: "default" and every group workers registered in."""
        named = sorted(g for g in self.broker.groups() if g != config.DEFAULT_GROUP)
        return [config.DEFAULT_GROUP, *named]

    def __repr__(self):
        return f"<pyworker.Client redis={self.broker.where}>"

    def ping(self):
        self.broker.ping()
        self.broker.check_eviction_policy()
        return self

    def close(self):
        for other in list(self._groups.values()):
            other.close()
        self.broker.close()

    def _workers(self, max_age_s: float = 2.0) -> tuple[int, bool, float, dict]:
        now = time.monotonic()
        cached = self._workers_seen
        if cached is None or now - cached[2] > max_age_s or cached[0] == 0:
            rows = self.broker.live_worker_rows(self.versions.known())
            n = len(rows)
            same = self.shm is not None and n > 0 and all(r[1] == self.shm.ident for r in rows)
            self._workers_seen = cached = (n, same, now, self.versions.group(rows))
        return cached

    def live_workers(self, max_age_s: float = 2.0) -> int:
        """Workers with a live lease (cached for max_age_s: it only sizes chunks)."""
        return self._workers(max_age_s)[0]

    def workers_share_memory(self) -> bool:
        """Whether every live worker advertises this caller's shared-memory directory (same
        host, same /dev/shm, same user); cached like live_workers."""
        return self.shm is not None and self._workers()[1]

    def forget_workers(self):
        self._workers_seen = None

    def worker_envs(self, max_age_s: float = 2.0) -> dict:
        """The live workers by environment (versions.Checker.group), cached like
        live_workers."""
        return self._workers(max_age_s)[3]

    def job(self, task_timeout: float | None = None) -> "Job":
        if self.shm is not None:
            now = time.monotonic()
            if self._last_sweep is None or now - self._last_sweep > SHM_SWEEP_EVERY_S:
                self._last_sweep = now
                self.shm.sweep()
        self.broker.check_eviction_policy()  # once per Broker: a warning if Redis can evict
        job = Job(self, task_timeout)
        with self._lock:
            self._jobs.add(job)
            # The keeper sets _keeper to None under this lock when it ends (it catches everything
            # else); a forked child has none running (_after_fork).
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_alive, daemon=True,
                                                name="pyworker-keepalive")
                self._keeper.start()
        return job

    def _keep_alive(self):
        """While jobs run, refresh their TTLs; a vanished caller's keys then expire by themselves."""
        interval = max(self.settings.job_ttl_s / 4, 0.2)
        idle_since = None
        while True:
            time.sleep(interval)
            with self._lock:
                jobs = [j for j in self._jobs if j.live]
                if not jobs:
                    # Linger a while: starting a thread per short job would cost latency.
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since > 60:
                        self._keeper = None
                        return
                    continue
                idle_since = None
            try:
                shas = {sha for j in jobs for sha in j.fn_shas}
                self.broker.keep_alive([j.jid for j in jobs], shas,
                                       {j.jid: j.alive_record() for j in jobs if j.created})
            except Exception:  # the next round retries; the caller's own calls report errors
                pass

    def maybe_reap(self):
        now = time.monotonic()
        if now - self._last_reap >= self.settings.lease_s / 2:
            self._last_reap = now
            self.broker.reap()

    def forget_uploads(self):
        """Send every function again with its next job (Redis lost what it had)."""
        self._uploaded.clear()

    def function_blob(self, fn) -> tuple[str, bytes | None]:
        """sha of the pickled function, and its signed blob if it must be (re)sent."""
        blob, sha = self._pickled_function(fn)
        if len(blob) > self.limit_bytes:
            name = getattr(fn, "__qualname__", repr(fn))
            raise serialize.SerializationError(
                f"function {name} is {len(blob) / 2**20:.1f} MiB pickled (with what it "
                f"captures), over the limit of {self.settings.max_message_mb:g} MiB; raise "
                "PYWORKER_MAX_MESSAGE_MB, or load big objects inside the function instead"
            )
        sent = self._uploaded.get(sha)
        if sent is not None and time.monotonic() - sent < self.settings.job_ttl_s / 2:
            return sha, None  # still in Redis: the job's submit refreshes its TTL instead
        return sha, self.signer.seal_blob(blob)


    def _pickled_function(self, fn) -> tuple[bytes, str]:
        """cloudpickle(fn) and its sha. An importable function of an installed module is
        pickled as a reference (its module and name, never what it captures), so its bytes
        cannot go stale: it is pickled once per process instead of once per call; so is an
        object that declares itself immutable. An importable function of the caller's own
        module travels by value with its module (ship.py): it is pickled again when a file of
        that module changed (an edit, %autoreload) or its code was swapped. Everything else is
        pickled every time."""
        name = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
        try:
            hit = self._by_reference.get(fn) if _weakrefable(fn) else None
        except TypeError:  # unhashable
            hit = None
        if hit is not None and hit[0] == name and (
                hit[3] is None or hit[3].current(fn)):
            return hit[1], hit[2]
        by_value = ship.modules_to_ship(fn) if self.settings.ship_modules else ()
        data = serialize.dumps_function(fn, by_value)
        sha = serialize.function_sha(data)
        # An object whose type says it never changes (pyworker_immutable: the joblib backend's
        # arguments sent once, a Pool call's chunk runner) cannot go stale either.
        if _weakrefable(fn) and (serialize.pickled_by_reference(fn)
                                 or getattr(type(fn), "pyworker_immutable", False)):
            fresh = ship.Freshness(ship.module_files(by_value), fn) if by_value else None
            try:
                self._by_reference[fn] = (name, data, sha, fresh)
            except TypeError:
                pass
        return data, sha


class Job:
    """A job id in Redis with its chunks; results come back through next_result()."""

    def __init__(self, client: Client, task_timeout: float | None = None):
        self.client = client
        self.task_timeout = task_timeout or 0.0  # each item's time limit on the workers
        self.jid = os.urandom(10).hex()  # secrets.token_hex(10), without its two calls
        self.live = True
        self.created = False
        self.fn_shas: set[str] = set()
        self._functions: dict[str, object] = {}  # sha -> function, to upload it again
        self._pending_blobs: dict[str, bytes] = {}
        self._unchecked: set[str] = set()  # shas sent without their blob, not yet submitted
        self._sent = False  # a submit went out (it may have created the job, answered or not)
        self._next_chunk = 0
        self._submit_lock = threading.Lock()
        self.shm = client.shm
        # chunk -> (mode, fn_sha, first index, items, segment name) for chunks sent through
        # shared memory: the segment is removed when the chunk's result is in, and the items
        # are sent again through Redis if a worker cannot read the segment.
        self._segments: dict[int, tuple] = {}
        self._shm_off = False
        self._used_shm = False  # a segment of this job was written or read
        self._early: list[bytes] = []  # results that came back with a submit
        # Results taken (moved to the job's taken list) that Redis keeps until acknowledged
        # with the next pop; after a lost connection, the list is read back (_recover).
        self._unacked: list[bytes] = []
        self._recover = False
        self._last_result = self._last_check = time.monotonic()
        self._result_ctx = protocol.mac_context(protocol.KIND_RESULT, self.jid)
        self._output_ctx = protocol.mac_context(protocol.KIND_OUTPUT, self.jid)
        self._forged = 0  # messages dropped: not signed for this job with this caller's key
        self._envs: dict = {}  # the workers' environments checked when a function was added
        self._late: set[str] = set()  # environments checked since, from results (env digest)
        self._warned: set[str] = set()  # packages warned about (VersionMismatchWarning)
        if self.shm is not None:
            shm.job_started(self.jid)

    def add_function(self, fn) -> str:
        """The function's sha; its blob goes with the next submit. Raises VersionMismatchError
        (nothing sent) if live workers cannot run it; warns once per job about packages of
        other versions on some (versions.py)."""
        client = self.client
        sha, blob = client.function_blob(fn)
        if sha not in self.fn_shas:
            self._envs = client.worker_envs()
            try:
                client.versions.check(self, sha, fn, self._envs)
            except VersionMismatchError:
                if not self._sent:
                    self.close(now=True)
                raise
            self.fn_shas.add(sha)
            self._functions[sha] = fn
            if blob is not None:
                self._pending_blobs[sha] = blob
            else:  # uploaded lately: the next submit checks that Redis still has it
                self._unchecked.add(sha)
        return sha

    def _message(self, mode, fn_sha, first, items, chunk, use_shm):
        """The signed task message of a chunk, and its payload if that travels by reference."""
        client = self.client
        oob = [] if use_shm else None
        payload = serialize.dumps_chunk(mode, items, first, client.limit_bytes, oob)
        tag = self.shm.tag() if self.shm is not None else protocol.NO_SHM
        if use_shm and serialize.payload_size(payload, oob) > protocol.INLINE_MAX_BYTES:
            try:
                desc = self.shm.write(self.jid, chunk, shm.TASK, tag.split(".", 1)[1], payload,
                                      oob)
            except OSError:
                self._shm_off = True  # e.g. /dev/shm full: Redis from now on
            else:
                self._used_shm = True
                self._segments[chunk] = (mode, fn_sha, first, items, desc.name)
                header = protocol.task_header(self.jid, chunk, fn_sha, serialize.PYTHON_VERSION,
                                              serialize.CLOUDPICKLE_VERSION,
                                              where=protocol.SHARED, shm=tag,
                                              timeout=self.task_timeout, alive=self._alive())
                return client.signer.seal(_TASK_CONTEXT, header, desc.encode()), None
        if oob:  # big buffers were out of band, but this payload goes through Redis
            payload = serialize.dumps_chunk(mode, items, first, client.limit_bytes)
        inline = len(payload) <= protocol.INLINE_MAX_BYTES
        header = protocol.task_header(self.jid, chunk, fn_sha, serialize.PYTHON_VERSION,
                                      serialize.CLOUDPICKLE_VERSION, ref=not inline, shm=tag,
                                      timeout=self.task_timeout, alive=self._alive())
        return (client.signer.seal(_TASK_CONTEXT, header, payload, inline),
                None if inline else payload)

    def _alive(self) -> int:
        """Until when a task made now may run (protocol 'A'): the job's TTL from now; after
        that, workers ask the job's 'alive' record that the keep-alive renews."""
        return int(time.time() + self.client.settings.job_ttl_s)

    def alive_record(self) -> str:
        until = self._alive()
        return protocol.alive_record(until, self.client.signer.alive_mac(self.jid, until))

    def submit(self, mode: int, fn_sha: str, chunks: list[tuple[int, list]],
               wait_s: float | None = None, spin_s: float = 0.0) -> list[int]:
        """Queue chunks (first item index, items); returns their chunk ids. Pickling happens
        before anything is queued, so a bad item queues nothing of this batch. The first
        submit also creates the job and uploads its function, in the same round trip. With
        wait_s (the caller waits for results next anyway), that round trip also waits up to
        wait_s for the first result, which next_result() then returns, busy-polling for it the
        first spin_s (a short one-chunk call: see Settings.spin_s).

        Redis out of reach is waited for (PYWORKER_RECONNECT_S), the batch then sent again:
        if the lost attempt had queued it after all, its chunks run twice and the second
        result of each is ignored; a result it took is found in the taken list (_recover)."""
        deadline = None
        warned = False
        while True:
            try:
                return self._submit(mode, fn_sha, chunks, wait_s, spin_s)
            except PyworkerConnectionError as exc:
                if deadline is None:
                    deadline = time.monotonic() + self.client.settings.reconnect_s
                if not exc.retryable or time.monotonic() >= deadline:
                    raise
                self._recover = self.created or wait_s is not None
                if not warned:
                    warned = True
                    print(f"pyworker: {exc}; sending again for up to "
                          f"{self.client.settings.reconnect_s:g} s", file=sys.stderr, flush=True)
                time.sleep(0.2)

    def _submit(self, mode, fn_sha, chunks, wait_s, spin_s) -> list[int]:
        client = self.client
        with self._submit_lock:
            use_shm = (self.shm is not None and not self._shm_off
                       and client.workers_share_memory())
            messages, ids, big = [], [], {}
            try:
                for first, items in chunks:
                    chunk = self._next_chunk + len(ids)
                    message, payload = self._message(mode, fn_sha, first, items, chunk, use_shm)
                    messages.append(message)
                    if payload is not None:
                        big[chunk] = payload
                    ids.append(chunk)
                meta = None
                now = time.monotonic()
                if not self.created:
                    meta = {"created": f"{time.time():.3f}",
                            "caller": f"{client.caller_host}:{os.getpid()}",
                            "python": serialize.PYTHON_VERSION,
                            "cloudpickle": serialize.CLOUDPICKLE_VERSION,
                            "pyworker": versions.__version__,
                            "protocol": str(protocol.PROTOCOL_VERSION)}
                blobs, self._pending_blobs = self._pending_blobs, {}
                check = sorted(self._unchecked)
                try:
                    self._sent = True
                    queued = self._send(messages, meta, blobs, big, check, wait_s, spin_s)
                    if queued == FUNCTION_MISSING:
                        # Redis lost functions uploaded before (flushed, or restarted without
                        # persistence) and queued nothing: upload them, and submit again.
                        client.forget_uploads()
                        for sha in check:
                            blobs[sha] = client.function_blob(self._functions[sha])[1]
                        self._unchecked.difference_update(check)
                        check = []
                        queued = self._send(messages, meta, blobs, big, check, wait_s, spin_s)
                except BaseException:
                    self._pending_blobs.update(blobs)
                    raise
            except BaseException:  # nothing of this batch was queued
                self._drop_segments([c for c in self._segments if c >= self._next_chunk])
                raise
            self.created = True
            self._unchecked.difference_update(check)
            for sha in (*blobs, *check):  # each has its full TTL in Redis now
                client._uploaded[sha] = now
            if queued < 0:
                self._drop_segments(ids)
                raise self._lost()
            self._next_chunk += len(ids)
            return ids

    def _send(self, messages, meta, blobs, big, check, wait_s, spin_s) -> int:
        """broker.submit; a first result that came with it waits in _early."""
        queued = self.client.broker.submit(self.jid, messages,
                                           min(len(messages), MAX_WAKE_TOKENS), meta, blobs,
                                           big, check=check, pop_s=wait_s, spin_s=spin_s)
        if wait_s is None:
            return queued
        queued, first_result = queued
        if first_result is not None:
            self._early.append(first_result)
            self._unacked.append(first_result)
        return queued

    def _drop_segments(self, chunks):
        for chunk in chunks:
            entry = self._segments.pop(chunk, None)
            if entry is not None:
                self.shm.remove(entry[4])

    def _resend(self, chunk: int) -> None:
        """A worker could not read this chunk's segment (not on this host after all, or the file
        is gone): send the same chunk again through Redis, and keep Redis for this job."""
        with self._submit_lock:
            entry = self._segments.get(chunk)
            if entry is None:
                return  # done already: its result is in
            self._shm_off = True
            self.client.forget_workers()
            mode, fn_sha, first, items, name = entry
            message, payload = self._message(mode, fn_sha, first, items, chunk, False)
            queued = self.client.broker.submit(
                self.jid, [message], 1, payloads={chunk: payload} if payload is not None else None)
            if queued < 0:
                raise self._lost()
            self._drop_segments((chunk,))

    def next_result(self, deadline: float | None, more: int = 0,
                    on_wait=None) -> ChunkResult | None:
        """The next result; None once the deadline passed. ``more``: how many other results
        the caller still expects; up to MAX_TAKE_AHEAD of those that are in Redis already come
        in the same round trip (the next calls return them without one). ``on_wait()`` is
        called about once a second while no result comes (a progress bar's clock). Survives a
        short Redis outage, and raises JobLostError when Redis no longer has the job (checked
        after an outage and every LOST_CHECK_S without results)."""
        client = self.client
        lost_since = None
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                if lost_since is not None or (
                        self.created and time.monotonic() - self._last_result > LOST_CHECK_S
                        and time.monotonic() - self._last_check > LOST_CHECK_S):
                    self._last_check = time.monotonic()
                    if self.created and not client.broker.job_exists(self.jid):
                        raise self._lost()
                    lost_since = None
                    if self.created:
                        self._check_refusals()
                if self._recover:
                    self._recover_taken()
                data = (self._early.pop(0) if self._early
                        else self._pop(wait, min(more, MAX_TAKE_AHEAD)))
                if data is None:
                    client.maybe_reap()
                    if client.settings.forward_output:
                        self.show_streamed()  # a long task's progress, while it runs
                    if on_wait is not None:
                        on_wait()
                    continue
                try:
                    result = self._parse(data)
                    if result is None:
                        continue
                    self._last_result = time.monotonic()
                    if result.status == protocol.STATUS_RESEND and result.chunk in self._segments:
                        self._resend(result.chunk)
                        continue
                except PyworkerConnectionError:
                    self._early.insert(0, data)  # handled again, once Redis is back
                    raise
                if self._segments:
                    self._drop_segments((result.chunk,))
                if result.outputs and -1 in result.outputs:
                    del result.outputs[-1]  # it sent some of its output while it ran: first
                    self.show_streamed()
                return result
            except PyworkerConnectionError:
                self._recover = self.created  # a result taken may have been lost on the way
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > client.settings.reconnect_s:
                    raise
                time.sleep(0.2)

    def _late_worker(self, env: str):
        """A worker of an environment this job has not checked (it started after the job, or
        its packages changed) returned a result: check the job's functions against it (the
        live workers' list is read again: one round trip per environment new to this job)."""
        self._late.add(env)
        client = self.client
        groups = client.worker_envs()
        if env not in groups:  # not in the list as last read: read it again
            client.forget_workers()
            groups = client.worker_envs()
        client.versions.late(self, env, groups)

    def _check_refusals(self):
        """No results for a while: if every live worker said it cannot verify this job's
        tasks, none ever will run them: they run another pyworker protocol (their published
        versions say so), or their signing key differs from this caller's: say which. If every
        live worker gave them back, some because a pip_install failed there, say that."""
        live, refused, pipless, either = self.client.broker.refusals(self.jid)
        if live and pipless and either >= live:
            from .pip import no_worker_error
            self.close(now=True)
            raise no_worker_error(self.client, live, pipless, refused)
        if live and refused >= live:
            self.close(now=True)
            self.client.forget_workers()
            groups = self.client.worker_envs()
            bad = [(env, ids) for env, ids in groups.values() if versions.fatal(env)]
            if bad:
                raise versions.mismatch_error(bad, sum(len(i) for _, i in groups.values()),
                                              sent=True)
            raise SignatureError(
                f"none of the {live} live worker(s) could verify this job's tasks: their "
                "signing key differs from this caller's. Set the same PYWORKER_SECRET (the "
                "chart's signingKey Secret) for the caller and the workers; "
                "pyworker.status() shows which workers refused")

    def _pop(self, wait: float, more: int):
        got = self.client.broker.pop_results(self.jid, wait, len(self._unacked), more)
        self._unacked = got
        if not got:
            return None
        self._early.extend(got[1:])
        return got[0]

    def _recover_taken(self):
        """After a lost connection: results taken whose answer never arrived are still in the
        taken list; those this job had already are skipped (their acknowledgement may not
        have happened)."""
        taken = self.client.broker.taken_results(self.jid)
        had = set(self._unacked) | set(self._early)
        self._early.extend(m for m in taken if m not in had)
        self._unacked = list(taken)  # acknowledged with the next pop
        self._recover = False

    def show_streamed(self):
        """Print what this job's tasks printed while they ran (output messages), so far."""
        for data in self.client.broker.pop_outputs(self.jid):
            try:
                line = protocol.header_line(data)
                _, text = self.client.signer.open(self._output_ctx, data, None, line)
                _, _, worker = protocol.parse_output_header(line)
            except (ValueError, SignatureError):
                continue  # not from a worker that has our secret: never shown
            show_output(worker, bytes(text).decode("utf-8", "replace"))

    def _lost(self) -> JobLostError:
        """The job is gone from Redis; this Job object is finished."""
        self.close(now=True)
        self.client.forget_uploads()  # the functions' blobs went with it
        return JobLostError(
            f"Redis at {self.client.broker.where} no longer has job {self.jid}: it restarted "
            "without persistence, was flushed, or evicted the job's keys (maxmemory)")

    def _parse(self, data: bytes) -> ChunkResult | None:
        """The result in a message; None for one that is not signed for this job with this
        caller's key (forged, replayed from another job, or from a worker with another key):
        it is dropped, with a warning, and the real result is waited for."""
        line = protocol.header_line(data)
        h = protocol.parse_result_header(line)
        payload = None
        if h.ref:
            payload = self.client.broker.take_result_payload(self.jid, h.payload_field)
            if payload is None:
                raise RuntimeError(f"the result of chunk {h.chunk} from worker {h.worker} "
                                   "vanished from Redis before it could be read")
        try:
            _, payload = self.client.signer.open(self._result_ctx, data, payload, line)
        except SignatureError as exc:
            self._forged += 1
            log.warning("pyworker: dropped a %r result for chunk %d of job %s (it claims worker "
                        "%s): %s; not this job's, or not from a worker with this caller's key. "
                        "Nothing of it was unpickled", h.status, h.chunk, self.jid,
                        h.worker, exc)
            return None
        if h.status != protocol.STATUS_OK:
            return ChunkResult(h.chunk, h.status, h.worker, h.detail)
        if h.env and h.env not in self._envs and h.env not in self._late:
            self._late_worker(h.env)
        buffers = None
        if h.shared:
            payload, buffers = self._read_result_segment(h, payload)
        nbytes = serialize.payload_size(payload, buffers)
        body = serialize.loads(payload, buffers)
        values, errors, outputs = body[:3]
        rest = body[3] if len(body) > 3 else None
        return ChunkResult(h.chunk, h.status, h.worker, "", values, errors, outputs, rest, nbytes)

    def _read_result_segment(self, h, descriptor):
        self._used_shm = True
        desc = shm.Descriptor.parse(descriptor)
        if self.shm is None or desc.jid != self.jid or desc.kind != shm.RESULT:
            raise SignatureError(f"worker {h.worker} sent a result segment that is not this "
                                 f"job's ({desc.name})")
        try:
            return self.shm.read(desc, self.client.limit_bytes)
        except shm.SegmentTampered as exc:
            raise SignatureError(f"a result for job {self.jid} from worker {h.worker} was not "
                                 f"unpickled: {exc}") from None
        except ValueError:  # over this caller's limit (the worker's may be higher)
            raise SerializationError(
                f"the result of chunk {h.chunk} from worker {h.worker} is over this caller's "
                f"limit of {self.client.limit_bytes / 2**20:g} MiB (PYWORKER_MAX_MESSAGE_MB); "
                "use the same limit on the workers and the caller") from None
        except OSError as exc:
            raise RuntimeError(f"the result of chunk {h.chunk} from worker {h.worker} could not "
                               f"be read from shared memory: {exc}") from None
        finally:
            self.shm.remove(desc.name)

    def drop_queued(self):
        self.client.broker.drop_queued(self.jid)

    def close(self, now: bool = True):
        """Delete the job's keys: what is still queued leaves Redis, running tasks are dropped.
        A job that finished normally (now=False) is cleaned up with the next round trip.
        Its shared-memory segments go at once either way (a result segment that a worker wrote
        but could not report, because it died, is found by the next sweep: shm.Store.sweep)."""
        if self.live:
            self.live = False
            try:
                if self.created or self._sent:
                    self.client.broker.end_job(self.jid, now=now)
            finally:
                if self.shm is not None:
                    shm.job_ended(self.jid)
                    self._segments.clear()
                    if now or self._used_shm:  # else there is nothing to look for
                        self.shm.remove_job(self.jid)
