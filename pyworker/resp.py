"""A small Redis client (RESP2 over TCP or TLS) used by queue.py.

Why not redis-py: a command costs ~140 µs in redis-py 8 against ~30 µs for the round trip
itself on loopback, and one-item latency is a few round trips. This client does only what
pyworker needs: AUTH/SELECT, commands, pipelines, Lua scripts by SHA, blocking pops."""
from __future__ import annotations

import hashlib
import os
import select
import socket
import threading
import time
import weakref
from urllib.parse import parse_qs, unquote, urlsplit

_BIG = 64 * 1024
_pid = os.getpid()  # this process's; set again in a forked child (_after_fork)
_pools: "weakref.WeakSet[Redis]" = weakref.WeakSet()


class ReplyError(Exception):
    """An error reply from the server (-ERR, -WRONGPASS, -NOSCRIPT ...)."""


class RespConnectionError(OSError):
    """The connection failed or closed."""


def _encode_all(commands) -> list:
    buffers = []
    for args in commands:
        buffers.extend(_encode(args))
    return buffers


def _encode(args) -> list:
    """RESP request for one command, as buffers: the framing and ASCII arguments as one str,
    encoded once (cheaper than a bytes format per argument); bytes arguments kept apart
    (Connection._send joins the small ones)."""
    out, text = [], [f"*{len(args)}\r\n"]
    for arg in args:
        kind = type(arg)
        if kind is str and arg.isascii():
            text.append(f"${len(arg)}\r\n{arg}\r\n")
            continue
        if kind is int:
            arg = str(arg)
            text.append(f"${len(arg)}\r\n{arg}\r\n")
            continue
        if kind is str:
            arg = arg.encode()
        elif kind is float:
            arg = repr(arg).encode()
        text.append(f"${len(arg)}\r\n")
        out.append("".join(text).encode())
        out.append(arg)
        text = ["\r\n"]
    out.append("".join(text).encode())
    return out


class Connection:
    def __init__(self, host, port, password=None, username=None, db=0, tls=False,
                 connect_timeout=5.0, timeout=30.0, path=None):
        self.host, self.port = host, port
        self.timeout = timeout
        self.tls = tls
        try:
            if path:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(connect_timeout)
                try:
                    sock.connect(path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as exc:
            raise RespConnectionError(exc.strerror or str(exc)) from None
        if not path:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if tls:
            import ssl  # here: most connections are not TLS, and ssl costs every start
            try:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            except OSError:  # e.g. the server's certificate is not trusted: said in the error
                sock.close()
                raise
        sock.settimeout(timeout)
        self.sock = sock
        self._timeout_now = timeout  # what the socket is set to (each change is a system call)
        self.file = sock.makefile("rb", buffering=256 * 1024)
        self._poller = select.poll()  # made once: idle_and_open runs before every round trip
        self._poller.register(sock, select.POLLIN)
        self.broken = False
        # Replies sent for and not read in full yet. A connection owing any (a round trip cut
        # short by Ctrl-C or any other exception: half a command sent, a reply half read into
        # the buffer, a blocking pop still waiting) is closed, never reused: its next reader
        # would take someone else's reply (Redis._put).
        self.owed = 0
        self.pid = _pid  # the process whose connection this is (a forked child has a copy)
        if password:
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            self.call(*auth)
        if db:
            self.call("SELECT", db)

    def idle_and_open(self) -> bool:
        """An idle pooled connection has nothing to read: readable means the server closed
        it (or sent what nobody asked for). One poll() call, no wait: a command that is not
        idempotent can then rarely meet a connection that was dead before it was sent."""
        try:
            return not self._poller.poll(0)
        except (OSError, ValueError):
            return False

    def close(self):
        self.broken = True
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass

    def _send(self, buffers):
        # One write for everything small: separate writes cost the server one wake-up each.
        out, small = [], []
        for buf in buffers:
            if len(buf) >= _BIG:
                if small:
                    out.append(b"".join(small))
                    small = []
                out.append(buf)
            else:
                small.append(buf)
        if small:
            out.append(b"".join(small))
        try:
            for buf in out:
                self.sock.sendall(buf)
        except OSError as exc:
            self.close()
            raise RespConnectionError(f"lost connection: {exc}") from None

    def _read(self):
        f = self.file
        line = f.readline()
        if not line.endswith(b"\r\n"):
            raise RespConnectionError("connection closed by the server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n)
            if len(data) < n or f.read(2) != b"\r\n":
                raise RespConnectionError("connection closed in the middle of a reply")
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        raise RespConnectionError(f"not a Redis reply: {line[:40]!r}")

    def _set_timeout(self, timeout):
        if timeout != self._timeout_now:
            self.sock.settimeout(timeout)
            self._timeout_now = timeout

    def read_reply(self, timeout=None):
        """One reply, waiting up to ``timeout`` (else the connection's default) for it."""
        try:
            self._set_timeout(self.timeout if timeout is None else timeout)
            reply = self._read()
        except (OSError, ValueError) as exc:
            self.close()
            if isinstance(exc, RespConnectionError):
                raise
            raise RespConnectionError(f"lost connection: {exc}") from None
        self.owed -= 1
        return reply

    def spin(self, until: float) -> None:
        """Busy-poll for reply bytes until time.perf_counter() reaches ``until``, yielding the
        core between polls, before the blocking read. Where a core would otherwise go idle
        until the reply arrives, waking it costs more than a short reply takes (on a VM above
        all, where an idle virtual CPU is woken by the host); a blocking read after the spin
        reports what went wrong, if anything did."""
        f = self.file
        if self.tls:
            return  # a TLS record may be in flight without a whole reply: just block
        try:
            self._set_timeout(0.0)
            while not f.peek(1) and time.perf_counter() < until:
                os.sched_yield()
        except OSError:
            pass

    def call(self, *args, timeout=None):
        self.owed += 1  # before the first byte: a send cut short leaves it owing
        self._send(_encode(args))
        reply = self.read_reply(timeout)
        if timeout is not None:
            self._set_timeout(self.timeout)
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    def pipeline(self, commands, spin_s: float = 0.0, timeout=None, spin_at=None):
        """Replies of several commands sent at once; error replies come back as ReplyError
        objects in place (the caller decides), like MULTI-less redis-py pipelines. With spin_s,
        each reply is busy-polled for (see spin) until spin_s after the send, or only those
        whose index is in ``spin_at`` (the others come with one before them). ``timeout``:
        for reading each reply (a blocking command's wait plus a margin), else the default."""
        self.owed += len(commands)
        self._send(_encode_all(commands))
        if spin_s <= 0:
            replies = [self.read_reply(timeout) for _ in commands]
        else:
            until = time.perf_counter() + spin_s
            replies = []
            for i in range(len(commands)):
                if spin_at is None or i in spin_at:
                    self.spin(until)
                replies.append(self.read_reply(timeout))
        if timeout is not None:
            self._set_timeout(self.timeout)
        return replies


class Pending:
    """The replies of a pipeline sent by Redis.send, not read yet."""

    def __init__(self, redis: "Redis", conn: Connection, n: int):
        self._redis, self._conn, self._n = redis, conn, n

    def replies(self) -> list:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("the replies of this pipeline were read already")
        if conn.pid != _pid:  # sent by the parent of this forked process: its replies
            raise RespConnectionError("these replies belong to the process that forked this one")
        try:
            return [conn.read_reply() for _ in range(self._n)]
        finally:
            self._redis._put(conn)  # closed instead if a reply was left unread


class Script:
    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class Redis:
    """A thread-safe pool of connections to one server, made from a redis:// or rediss:// URL,
    or unix:///path/to/redis.sock?db=0 (a local server: about half the round trip of TCP
    loopback)."""

    def __init__(self, url: str, password=None, connect_timeout=5.0, timeout=30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"scheme must be redis://, rediss:// or unix://, not "
                             f"{parts.scheme!r}")
        self.path = None
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("no socket path in the URL")
            self.host, self.port, self.path = "localhost", 0, unquote(parts.path)
            db = parse_qs(parts.query).get("db", ["0"])[0]
        else:
            if not parts.hostname:
                raise ValueError("no host in the URL")
            self.host = parts.hostname
            self.port = parts.port or 6379
            db = parts.path.strip("/")
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = password or (unquote(parts.password) if parts.password else None)
        self.db = int(db) if db else 0
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        _pools.add(self)

    def _get(self, fresh=False) -> Connection:
        while not fresh:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                break
            if conn.idle_and_open():
                return conn
            conn.close()  # closed by the server meanwhile (a restart): not worth a failure
        return Connection(self.host, self.port, self.password, self.username, self.db, self.tls,
                          self.connect_timeout, self.timeout, self.path)

    def _put(self, conn: Connection):
        """Back into the pool; closed instead if a round trip on it was cut short (replies
        still owed), or it is the parent's (a forked child's copy)."""
        if conn.broken:
            return
        if conn.owed or conn.pid != _pid:
            conn.close()
            return
        with self._lock:
            if len(self._idle) < 32:
                self._idle.append(conn)
                return
        conn.close()

    def _with_connection(self, use, retry: bool = True):
        """Run use(conn); a pooled connection that turns out dead (the server restarted or
        closed it while idle) is replaced once by a new one. Not with retry=False: a command
        that is not idempotent (one that moves tasks) may have run before the connection
        broke, and its caller must find out what happened instead."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        pooled = conn is not None
        if conn is None or not conn.idle_and_open():
            if conn is not None:
                conn.close()  # closed by the server meanwhile (a restart)
            conn = self._get()
        try:
            return use(conn)
        except RespConnectionError:
            if not pooled or not retry:
                raise
            self.close()
            conn = self._get(fresh=True)
            return use(conn)
        finally:
            self._put(conn)

    def call(self, *args, timeout=None, retry: bool = True):
        return self._with_connection(lambda conn: conn.call(*args, timeout=timeout), retry)

    def pipeline(self, commands, raise_errors=True, spin_s: float = 0.0, retry: bool = True,
                 timeout=None, spin_at=None):
        replies = self._with_connection(
            lambda conn: conn.pipeline(commands, spin_s, timeout, spin_at), retry)
        if raise_errors:
            for reply in replies:
                if isinstance(reply, ReplyError):
                    raise reply
        return replies

    def send(self, commands) -> "Pending":
        """Send a pipeline now and read its replies later (Pending.replies(), error replies in
        place); the connection is the pipeline's until then."""
        buffers = _encode_all(commands)
        with self._lock:
            pooled = bool(self._idle)
        conn = self._get()
        try:
            try:
                conn.owed += len(commands)
                conn._send(buffers)
            except RespConnectionError:
                if not pooled:
                    raise
                self.close()  # the pool was stale (the server restarted): once more, afresh
                conn = self._get(fresh=True)
                conn.owed += len(commands)
                conn._send(buffers)
        except BaseException:
            conn.close()  # half a pipeline may be on the wire: nobody can use it any more
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
            conn.close()

    def _forked(self):
        """In a forked child: the pooled connections are the parent's sockets (copies of its
        descriptors). The child closes its copies, which leaves the parent's connections as
        they are (close() sends nothing), and makes its own from now on. The lock is new too:
        another thread of the parent may have held it at the fork."""
        idle, self._idle, self._lock = self._idle, [], threading.Lock()
        for conn in idle:
            conn.close()


def _after_fork():
    global _pid
    _pid = os.getpid()
    for pool in list(_pools):
        pool._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
