"""The caller's side of a job: functions and chunks in, results out, keys kept alive meanwhile."""
from __future__ import annotations

import os
import socket
import threading
import time
import uuid
import weakref

from . import protocol, serialize
from .config import Settings
from .errors import ConnectionError as PyworkerConnectionError
from .errors import SignatureError
from .queue import Broker

MAX_WAKE_TOKENS = 256


class ChunkResult:
    __slots__ = ("chunk", "status", "worker", "detail", "values", "errors", "outputs")

    def __init__(self, chunk, status, worker, detail="", values=None, errors=None, outputs=None):
        self.chunk = chunk
        self.status = status
        self.worker = worker
        self.detail = detail
        self.values = values
        self.errors = errors or {}
        self.outputs = outputs or {}


class Client:
    """One connection to one Redis: creates jobs and keeps their keys alive while they run."""

    def __init__(self, settings: Settings | None = None, **overrides):
        self.settings = settings or Settings.from_env(**overrides)
        self.broker = Broker(self.settings)
        self.signer = serialize.Signer(self.settings.secret)
        self.limit_bytes = int(self.settings.max_message_mb * 2**20)
        self._jobs: weakref.WeakSet[Job] = weakref.WeakSet()
        self._uploaded: dict[str, float] = {}
        self._lock = threading.Lock()
        self._keeper: threading.Thread | None = None
        self._last_reap = 0.0
        self._warned_no_workers = False
        self._workers_seen: tuple[int, float] | None = None

    def __repr__(self):
        return f"<pyworker.Client redis={self.broker.where}>"

    def ping(self):
        self.broker.ping()
        return self

    def close(self):
        self.broker.close()

    def live_workers(self, max_age_s: float = 2.0) -> int:
        """Workers with a live lease (cached for max_age_s: it only sizes chunks)."""
        now = time.monotonic()
        cached = self._workers_seen
        if cached is None or now - cached[1] > max_age_s or cached[0] == 0:
            self._workers_seen = cached = (self.broker.live_workers(), now)
        return cached[0]

    def job(self) -> "Job":
        job = Job(self)
        with self._lock:
            self._jobs.add(job)
            if self._keeper is None or not self._keeper.is_alive():
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
                self.broker.keep_alive([j.jid for j in jobs], shas)
            except Exception:  # the next round retries; the caller's own calls report errors
                pass

    def maybe_reap(self):
        now = time.monotonic()
        if now - self._last_reap >= self.settings.lease_s / 2:
            self._last_reap = now
            self.broker.reap()

    def function_blob(self, fn) -> tuple[str, bytes | None]:
        """sha of the pickled function, and its signed blob if it must be (re)sent."""
        blob = serialize.dumps_function(fn)
        if len(blob) > self.limit_bytes:
            name = getattr(fn, "__qualname__", repr(fn))
            raise serialize.SerializationError(
                f"function {name} is {len(blob) / 2**20:.1f} MiB pickled (with what it "
                f"captures), over the limit of {self.settings.max_message_mb:g} MiB; raise "
                "PYWORKER_MAX_MESSAGE_MB, or load big objects inside the function instead"
            )
        sha = serialize.function_sha(blob)
        sent = self._uploaded.get(sha)
        if sent is not None and time.monotonic() - sent < self.settings.job_ttl_s / 2:
            return sha, None  # still in Redis: the job's submit refreshes its TTL instead
        return sha, self.signer.seal_blob(blob)


class Job:
    """A job id in Redis with its chunks; results come back through next_result()."""

    def __init__(self, client: Client):
        self.client = client
        self.jid = uuid.uuid4().hex[:20]
        self.live = True
        self.created = False
        self.fn_shas: set[str] = set()
        self._pending_blobs: dict[str, bytes] = {}
        self._next_chunk = 0
        self._submit_lock = threading.Lock()

    def add_function(self, fn) -> str:
        sha, blob = self.client.function_blob(fn)
        if sha not in self.fn_shas:
            self.fn_shas.add(sha)
            if blob is not None:
                self._pending_blobs[sha] = blob
        return sha

    def submit(self, mode: int, fn_sha: str, chunks: list[tuple[int, list]]) -> list[int]:
        """Queue chunks (first item index, items); returns their chunk ids. Pickling happens
        before anything is queued, so a bad item queues nothing of this batch. The first
        submit also creates the job and uploads its function, in the same round trip."""
        client = self.client
        with self._submit_lock:
            messages, ids, big = [], [], {}
            for first, items in chunks:
                payload = serialize.dumps_chunk(mode, items, first, client.limit_bytes)
                chunk = self._next_chunk + len(ids)
                inline = len(payload) <= protocol.INLINE_MAX_BYTES
                header = protocol.task_header(self.jid, chunk, fn_sha, serialize.PYTHON_VERSION,
                                              serialize.CLOUDPICKLE_VERSION, ref=not inline)
                messages.append(client.signer.seal(header, payload, inline))
                if not inline:
                    big[chunk] = payload
                ids.append(chunk)
            meta = None
            if not self.created:
                meta = {"created": f"{time.time():.3f}",
                        "caller": f"{socket.gethostname()}:{os.getpid()}",
                        "python": serialize.PYTHON_VERSION}
            blobs, self._pending_blobs = self._pending_blobs, {}
            try:
                queued = client.broker.submit(self.jid, messages,
                                              min(len(messages), MAX_WAKE_TOKENS), meta, blobs,
                                              big, touch=self.fn_shas - set(blobs) if meta else ())
            except BaseException:
                self._pending_blobs.update(blobs)
                raise
            self.created = True
            now = time.monotonic()
            for sha in blobs:
                client._uploaded[sha] = now
            if queued < 0:
                raise RuntimeError(f"job {self.jid} was cancelled or expired")
            self._next_chunk += len(ids)
            return ids

    def next_result(self, deadline: float | None) -> ChunkResult | None:
        """The next result; None once the deadline passed. Survives a short Redis outage."""
        client = self.client
        lost_since = None
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                return None
            try:
                data = client.broker.pop_result(self.jid, wait)
                if data is None:
                    client.maybe_reap()
                    continue
                return self._parse(data)
            except PyworkerConnectionError:
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since > client.settings.reconnect_s:
                    raise
                time.sleep(0.2)

    def _parse(self, data: bytes) -> ChunkResult:
        h = protocol.parse_result_header(protocol.header_line(data))
        if h.status != protocol.STATUS_OK:
            return ChunkResult(h.chunk, h.status, h.worker, h.detail)
        payload = None
        if h.ref:
            payload = self.client.broker.take_result_payload(self.jid, h.payload_field)
            if payload is None:
                raise RuntimeError(f"the result of chunk {h.chunk} from worker {h.worker} "
                                   "vanished from Redis before it could be read")
        try:
            _, payload = self.client.signer.open(data, payload)
        except SignatureError as exc:
            raise SignatureError(
                f"a result for job {self.jid} from worker {h.worker} failed its signature check "
                f"and was not unpickled: {exc}"
            ) from None
        values, errors, outputs = serialize.loads(payload)
        return ChunkResult(h.chunk, h.status, h.worker, "", values, errors, outputs)

    def drop_queued(self):
        self.client.broker.drop_queued(self.jid)

    def close(self, now: bool = True):
        """Delete the job's keys: what is still queued leaves Redis, running tasks are dropped.
        A job that finished normally (now=False) is cleaned up with the next round trip."""
        if self.live:
            self.live = False
            if self.created:
                self.client.broker.end_job(self.jid, now=now)
