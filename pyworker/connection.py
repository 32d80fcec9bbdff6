"""Redis connections for queue.py (the only module that imports this one), made by redis-py.

redis-py makes and speaks each connection: TCP, TLS with a CA bundle and client certificates,
Unix sockets, ACL users and credential providers, Sentinel's master discovery, the hiredis
reply parser, command packing, and closing a connection whose round trip an exception (Ctrl-C)
cut short. What is ours, and why:

- The pool. redis-py's ``ConnectionPool.get_connection()``/``release()`` cost about 8-15 µs a
  round trip here (a liveness poll that changes the socket's timeout twice, and metrics
  bookkeeping), a third of a loopback round trip, which every task pays several times. This
  pool keeps idle redis-py connections in a list and checks one with a single poll() before use.
- ``owed``: a connection whose replies were not all read (an exception between sending and
  reading, or a pipeline sent now and read later) is closed, never pooled, whichever connection
  class it is (redis-py's Sentinel connections do not close themselves on errors).
- Busy-polling for a reply (``spin``), and replies to a pipeline read later (``send``).
- Packing: commands of small arguments are packed by hiredis' C packer (redis-py's own
  ``pack_commands``, in Python, costs 11 µs for a 3-command pipeline, hiredis' 3 µs); a command
  with a big argument goes through redis-py's, which sends that argument without copying it.
- Errors: a Redis error reply is a ``ReplyError`` whose text starts with Redis' own code
  (``LOADING``, ``WRONGPASS`` ...), which queue.py turns into one clear line; every failure to
  reach Redis is a ``ConnectionLost`` (an OSError).
"""
from __future__ import annotations

import hashlib
import os
import select
import threading
import time
import weakref

import hiredis
import redis
import redis.exceptions as rx
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool
from redis.retry import Retry

_pid = os.getpid()  # this process's; set again in a forked child (_after_fork)
_pools: "weakref.WeakSet[Redis]" = weakref.WeakSet()
POOL_MAX_IDLE = 32
_BIG = 64 * 1024  # an argument this big is sent as its own buffer, not copied into the command
_BUFFERS = (bytes, bytearray, memoryview)


class ReplyError(Exception):
    """An error reply from the server; its text starts with Redis' code (ERR, WRONGPASS ...)."""


class ConnectionLost(OSError):
    """Redis could not be reached, or the connection failed or closed."""


def _reply_error(exc: rx.RedisError) -> ReplyError:
    code = getattr(exc, "status_code", None)
    text = str(exc)
    return ReplyError(f"{code} {text}" if code and not text.startswith(code) else text)


def _lost(exc: BaseException) -> ConnectionLost:
    return ConnectionLost(str(exc) or type(exc).__name__)


class Script:
    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class Pending:
    """The replies of a pipeline sent by Redis.send, not read yet."""

    def __init__(self, redis_: "Redis", conn, n: int):
        self._redis, self._conn, self._n = redis_, conn, n

    def replies(self) -> list:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("the replies of this pipeline were read already")
        if conn._pyw_pid != _pid:  # sent by the parent of this forked process: its replies
            raise ConnectionLost("these replies belong to the process that forked this one")
        try:
            return self._redis._read_all(conn, self._n)
        finally:
            self._redis._put(conn)


class Redis:
    """A thread-safe pool of redis-py connections to one server: from a redis://, rediss:// or
    unix:// URL (redis-py's URL rules: user and password, ``?db=``), or the master that Redis
    Sentinel names (``sentinels``: (host, port) pairs, ``sentinel_master``: its name).
    ``tls``: redis-py's ssl_* options (CA bundle, client certificate and key)."""

    def __init__(self, url: str, password=None, connect_timeout=5.0, timeout=30.0,
                 username=None, tls: dict | None = None, sentinels=(), sentinel_master=None,
                 sentinel_password=None):
        # RESP2: queue.py reads hashes as flat lists (redis-py 8 speaks RESP3 by default)
        kwargs = {"socket_connect_timeout": connect_timeout, "socket_timeout": timeout,
                  "retry": Retry(NoBackoff(), 0), "protocol": 2}
        if not url or not url.startswith("unix://"):
            kwargs["socket_keepalive"] = True
        if password:
            kwargs["password"] = password
        if username:
            kwargs["username"] = username
        if tls:
            kwargs.update(tls)
        if sentinels:
            from redis.sentinel import Sentinel, SentinelConnectionPool
            pool_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("ssl")}
            if tls:
                pool_kwargs.update(tls, ssl=True)
            from redis.connection import parse_url
            pool_kwargs["db"] = parse_url(url).get("db", 0) if url else 0
            manager = Sentinel(
                list(sentinels), socket_timeout=connect_timeout,
                sentinel_kwargs={"socket_connect_timeout": connect_timeout,
                                 "socket_timeout": connect_timeout,
                                 **({"password": sentinel_password} if sentinel_password else {})})
            pool = SentinelConnectionPool(sentinel_master, manager, **pool_kwargs)
        else:
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError(f"scheme must be redis://, rediss:// or unix://, not "
                                 f"{url.split('://', 1)[0]!r}")
            if url.startswith("unix://") and not url[len("unix://"):].split("?", 1)[0]:
                raise ValueError("no socket path in the URL")
            try:
                pool = ConnectionPool.from_url(url, **kwargs)
            except (ValueError, TypeError) as exc:
                raise ValueError(str(exc)) from None
            # (from_url lets the URL's userinfo win; a password given apart wins here)
            pool.connection_kwargs.update(
                {k: v for k, v in (("password", password), ("username", username)) if v})
            if tls and not url.startswith("rediss://"):
                raise ValueError("TLS options (CA, certificate, key) need a rediss:// URL")
        self._make = pool.connection_class
        self._kwargs = pool.connection_kwargs
        self._pool = pool  # for Sentinel: it finds the master (and keeps what it learnt)
        self._idle: list = []
        self._lock = threading.Lock()
        _pools.add(self)

    # --- the pool ---------------------------------------------------------------------------

    def _new(self):
        conn = self._make(**self._kwargs)
        conn._pyw_pid = _pid
        conn._pyw_owed = 0
        conn._pyw_poller = None
        try:
            conn.connect()
        except rx.ResponseError as exc:  # AUTH refused (WRONGPASS ...), SELECT out of range
            conn.disconnect()
            raise _reply_error(exc) from None
        except (rx.RedisError, OSError) as exc:
            conn.disconnect()
            if isinstance(exc, rx.AuthenticationError):
                raise ReplyError(f"{exc.status_code or 'WRONGPASS'} {exc}") from None
            raise _lost(exc) from None
        poller = select.poll()  # made once: idle_and_open runs before every round trip
        poller.register(conn._sock, select.POLLIN)
        conn._pyw_poller = (conn._sock, poller)
        return conn

    @staticmethod
    def _idle_and_open(conn) -> bool:
        """An idle pooled connection has nothing to read: readable means the server closed it
        (or sent what nobody asked for). One poll(), no wait."""
        sock, poller = conn._pyw_poller or (None, None)
        if sock is None or getattr(conn, "_sock", None) is not sock:
            return False
        try:
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def _get(self, fresh=False):
        while not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if self._idle_and_open(conn):
                return conn
            conn.disconnect()  # closed by the server meanwhile (a restart)
        return self._new()

    def _put(self, conn):
        """Back into the pool; closed instead if a round trip on it was cut short (replies still
        owed) or it is the parent's (a forked child's copy)."""
        if conn._pyw_owed or conn._pyw_pid != _pid or getattr(conn, "_sock", None) is None:
            if conn._pyw_pid == _pid:
                conn.disconnect()
            return
        with self._lock:
            if len(self._idle) < POOL_MAX_IDLE:
                self._idle.append(conn)
                return
        conn.disconnect()

    def _with_connection(self, use, retry: bool = True):
        """Run use(conn); a pooled connection that turns out dead (the server restarted or
        closed it while idle) is replaced once by a new one. Not with retry=False: a command
        that is not idempotent (one that moves tasks) may have run before the connection broke,
        and its caller must find out what happened instead."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        pooled = conn is not None
        if conn is None or not self._idle_and_open(conn):
            if conn is not None:
                conn.disconnect()
            conn = self._get()
        try:
            return use(conn)
        except ConnectionLost:
            if not pooled or not retry:
                raise
            self.close()
            self._put(conn)
            conn = self._get(fresh=True)
            return use(conn)
        finally:
            self._put(conn)

    # --- one connection -----------------------------------------------------------------------

    @staticmethod
    def _pack(conn, commands) -> list:
        for args in commands:
            for arg in args:
                if type(arg) in _BUFFERS and len(arg) >= _BIG:
                    return conn.pack_commands(commands)
        return [b"".join([hiredis.pack_command(args) for args in commands])]

    def _send(self, conn, commands):
        conn._pyw_owed += len(commands)  # before the first byte: a send cut short leaves it owing
        try:
            conn.send_packed_command(self._pack(conn, commands), check_health=False)
        except rx.RedisError as exc:
            raise _lost(exc) from None

    def _read(self, conn, timeout=None):
        try:
            if timeout is None:
                reply = conn.read_response(disable_decoding=True)
            else:
                reply = conn.read_response(disable_decoding=True, timeout=timeout)
        except rx.RedisError as exc:
            # An error reply (redis-py raises some as ConnectionErrors: LOADING, NOAUTH; those
            # carry Redis' code) or a failure; after the latter the connection is unusable.
            if getattr(exc, "status_code", None) is None and not isinstance(exc, rx.ResponseError):
                conn.disconnect()
                raise _lost(exc) from None
            reply = _reply_error(exc)
        except OSError as exc:
            conn.disconnect()
            raise _lost(exc) from None
        conn._pyw_owed -= 1
        return reply

    def _read_all(self, conn, n, timeout=None, spin_until=None, spin_at=None):
        replies = []
        for i in range(n):
            if spin_until is not None and (spin_at is None or i in spin_at):
                self._spin(conn, spin_until)
            replies.append(self._read(conn, timeout))
        return replies

    @staticmethod
    def _spin(conn, until: float) -> None:
        """Busy-poll for reply bytes until time.perf_counter() reaches ``until``, yielding the
        core between polls, before the blocking read. Where a core would otherwise go idle
        until the reply arrives, waking it costs more than a short reply takes (on a VM above
        all); the blocking read after the spin reports what went wrong, if anything did."""
        sock = getattr(conn, "_sock", None)
        if sock is None or hasattr(sock, "pending"):  # TLS: a record may be half there: block
            return
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            while not poller.poll(0) and time.perf_counter() < until:
                os.sched_yield()
        except (OSError, ValueError):
            pass

    # --- commands ------------------------------------------------------------------------------

    def call(self, *args, timeout=None, retry: bool = True):
        """One command's reply (``timeout``: how long to wait for it; a blocking command's
        wait plus a margin). An error reply raises ReplyError."""
        def use(conn):
            self._send(conn, (args,))
            reply = self._read(conn, timeout)
            if isinstance(reply, ReplyError):
                raise reply
            return reply
        return self._with_connection(use, retry)

    def pipeline(self, commands, raise_errors=True, spin_s: float = 0.0, retry: bool = True,
                 timeout=None, spin_at=None):
        """Replies of several commands sent at once; error replies in place (or raised, with
        raise_errors). With spin_s, replies are busy-polled for until spin_s after the send
        (only those whose index is in ``spin_at``, if given)."""
        def use(conn):
            self._send(conn, commands)
            until = time.perf_counter() + spin_s if spin_s > 0 else None
            return self._read_all(conn, len(commands), timeout, until, spin_at)
        replies = self._with_connection(use, retry)
        if raise_errors:
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
        return replies

    def send(self, commands) -> Pending:
        """Send a pipeline now and read its replies later (Pending.replies(), error replies in
        place); the connection is the pipeline's until then."""
        with self._lock:
            pooled = bool(self._idle)
        conn = self._get()
        try:
            try:
                self._send(conn, commands)
            except ConnectionLost:
                if not pooled:
                    raise
                self.close()  # the pool was stale (the server restarted): once more, afresh
                self._put(conn)
                conn = self._get(fresh=True)
                self._send(conn, commands)
        except BaseException:
            self._put(conn)  # owing replies: closed
            raise
        return Pending(self, conn, len(commands))

    def run(self, script: Script, *args, retry: bool = True):
        try:
            return self.call("EVALSHA", script.sha, 0, *args, retry=retry)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return self.call("EVAL", script.source, 0, *args, retry=retry)

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            if conn._pyw_pid == _pid:
                conn.disconnect()

    def _forked(self):
        """In a forked child: the pooled connections are the parent's sockets. The child drops
        its copies without a word to Redis (redis-py's disconnect() shuts a socket down only in
        the process that made it) and makes its own from now on. The lock is new too: another
        thread of the parent may have held it at the fork."""
        self._idle, self._lock = [], threading.Lock()


def _after_fork():
    global _pid
    _pid = os.getpid()
    for pool in list(_pools):
        pool._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

__all__ = ["ConnectionLost", "Pending", "Redis", "ReplyError", "Script", "redis"]
