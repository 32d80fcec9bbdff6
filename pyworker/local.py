"""A local cluster for one machine: redis-server on a free loopback port with a generated
password, N worker processes, optionally a JupyterLab. Used by laptops, scripts and the tests."""
from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from .config import Settings
from .errors import ConfigurationError, PyworkerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout_s: float, what: str, proc=None, log_path=None):
    deadline = time.monotonic() + timeout_s
    pause = 0.002  # what it waits for takes milliseconds (redis-server) to a few 100 ms
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)
    tail = _log_tail(log_path) if log_path else ""
    detail = "\n" + tail if tail else ""
    state = f"exited with {proc.returncode}" if proc is not None and proc.poll() is not None \
        else f"not ready after {timeout_s:g} s"
    raise PyworkerError(f"{what} {state}{detail}")


def with_parent(cmd: list[str], thread_outlives_child: bool = False) -> list[str]:
    """The command, made to get SIGTERM when this process dies, however it dies (SIGKILL, a
    notebook kernel restarted): otherwise a killed caller leaves its redis-server and workers
    running for ever. It is Linux's parent-death signal, set by setpriv (util-linux) before
    the exec; the signal is tied to the thread that starts the child, so it is set only from
    the main thread (a thread that ends would take the cluster with it), or from a thread that
    lives as long as the child should (``thread_outlives_child``)."""
    setpriv = _setpriv()
    if setpriv is None or not (thread_outlives_child
                               or threading.current_thread() is threading.main_thread()):
        return cmd
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]


@functools.lru_cache(maxsize=1)
def _setpriv() -> str | None:
    """setpriv, if it has --pdeathsig (util-linux 2.33 on): an older one would make every
    child fail to start."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    try:
        ok = subprocess.run([setpriv, "--pdeathsig", "TERM", "--", "true"], timeout=10,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return setpriv if ok else None


def _log_tail(path: str, lines: int = 15) -> str:
    """The last lines of a log file, or "" if it is missing or empty."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        tail = "".join(f.readlines()[-lines:])
    return tail if tail.strip() else ""


class RedisServer:
    """A private redis-server: loopback only, a generated password, no persistence. It also
    listens on a Unix socket in its own mode-700 directory, which local processes use: a round
    trip through it takes about half as long as through TCP loopback."""

    def __init__(self, port: int | None = None, password: str | None = None, workdir=None,
                 appendonly: bool = False):
        exe = shutil.which("redis-server")
        if exe is None:
            raise ConfigurationError(
                "redis-server is not on PATH: install it (Debian/Ubuntu: `apt-get install "
                "redis-server`; macOS: `brew install redis`; conda: `conda install redis`)")
        self.exe = exe
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(24)
        self._own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="pyworker-redis-")
        self.appendonly = appendonly
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    @property
    def has_socket(self) -> bool:
        # sun_path holds 104-108 bytes; a long TMPDIR means TCP only
        return hasattr(socket, "AF_UNIX") and len(os.fsencode(self.socket_path)) < 100

    @property
    def local_url(self) -> str:
        """What processes on this machine use: the Unix socket when there is one."""
        return f"unix://{self.socket_path}?db=0" if self.has_socket else self.url

    def launch(self):
        """Start redis-server without waiting for it (wait_ready waits)."""
        conf = os.path.join(self.dir, "redis.conf")
        with open(conf, "w") as f:
            f.write(f"bind 127.0.0.1\nport {self.port}\nrequirepass \"{self.password}\"\n"
                    f"dir \"{self.dir}\"\nsave \"\"\n"
                    f"appendonly {'yes' if self.appendonly else 'no'}\n"
                    + (f"unixsocket \"{self.socket_path}\"\nunixsocketperm 700\n"
                       if self.has_socket else "")
                    + "protected-mode yes\ndaemonize no\nlogfile redis.log\n")
        os.chmod(conf, 0o600)
        self.proc = subprocess.Popen(with_parent([self.exe, conf]), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self):
        _wait(self._answers, 10, f"redis-server on port {self.port}", self.proc,
              os.path.join(self.dir, "redis.log"))
        return self

    def start(self):
        return self.launch().wait_ready()

    def _answers(self) -> bool:
        if self.has_socket and not os.path.exists(self.socket_path):
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"-NOAUTH", b"+PONG", b"-ERR"))
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """``with LocalCluster(4) as cluster: pmap(...)`` — Redis plus N worker processes.

    Inside the block the cluster is pyworker's default backend."""

    def __init__(self, n_workers: int = 2, *, lease_s: float | None = None,
                 max_retries: int | None = None, worker_env: dict | None = None,
                 quiet: bool = True, replace_workers: bool = True, worker_cwd=None):
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be a non-negative integer, not {n_workers!r}")
        self.n_workers = n_workers
        self.redis = RedisServer()
        self.secret = secrets.token_urlsafe(32)
        self.extra = {"lease_s": lease_s, "max_retries": max_retries}
        self.worker_env = worker_env or {}
        # The workers' working directory (the caller's if None): another folder, with another
        # PYTHONPATH in worker_env, stands for worker pods that lack the caller's files.
        self.worker_cwd = worker_cwd
        self.quiet = quiet
        self.workers: list[subprocess.Popen] = []
        self._worker_args: list[tuple] = []  # (name, env) each worker was started with
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self.replace_workers = replace_workers  # start another when a worker dies (_watch)
        self.replaced = 0  # workers that died and were replaced
        self.watched = 0  # the watcher's looks at the workers so far
        self.client = None
        self._previous_default = None
        self._log_dir = None

    @property
    def env(self) -> dict:
        """The PYWORKER_* variables that point a process at this cluster."""
        env = {"PYWORKER_REDIS_URL": self.redis.local_url,
               "PYWORKER_REDIS_PASSWORD": self.redis.password,
               "PYWORKER_SECRET": self.secret}
        for key, value in self.extra.items():
            if value is not None:
                env[f"PYWORKER_{key.upper()}"] = str(value)
        return env

    def settings(self) -> Settings:
        # The cluster's own connection, whatever the environment says; only how this caller
        # waits (PYWORKER_SPIN_S) may come from it.
        spin = {k: v for k, v in os.environ.items() if k == "PYWORKER_SPIN_S"}
        return Settings.from_env(environ=spin, **{
            "redis_url": self.redis.local_url, "redis_password": self.redis.password,
            "secret": self.secret, **self.extra})

    def start(self):
        from . import api
        from .client import Client
        self.redis.launch()
        self._log_dir = self.redis.dir
        try:
            # Workers start while Redis does: their interpreter and imports take longer than
            # redis-server, and they retry quickly at first (Worker._wait_for_redis).
            for _ in range(self.n_workers):
                self.add_worker()
            self.redis.wait_ready()
            self.client = Client(self.settings())
            self.wait_for_workers(self.n_workers)
        except BaseException:
            self.stop()
            raise
        self._previous_default = api._default
        api._set_default(self.client)
        if self.replace_workers:
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="pyworker-local-watch")
            self._watcher.start()
        return self

    def add_worker(self, name: str | None = None, env: dict | None = None) -> subprocess.Popen:
        self._worker_args.append((name, env))
        self.workers.append(self._start_worker(len(self.workers), from_watcher=False))
        return self.workers[-1]

    def _start_worker(self, i: int, from_watcher: bool) -> subprocess.Popen:
        name, env = self._worker_args[i]
        wenv = {**os.environ, **self.env, **self.worker_env, **(env or {})}
        if name:
            wenv["PYWORKER_WORKER_NAME"] = name
        with open(self._worker_log(i), "a") as log:
            cmd = [sys.executable, "-m", "pyworker", "worker"]
            if self.quiet:
                cmd.append("--quiet")
            return subprocess.Popen(with_parent(cmd, thread_outlives_child=from_watcher),
                                    env=wenv, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.worker_cwd)

    def _worker_log(self, i: int) -> str:
        return os.path.join(self._log_dir, f"worker-{i}.log")

    def _watch(self):
        """Replaces a worker that died (exited with an error or a signal) while the cluster
        runs, and says so: at once if it had run a while, else after a back-off that doubles
        (0.5 s up to 30 s), so a worker that cannot start does not spin. A worker that exited
        cleanly (code 0) was stopped on purpose (SIGTERM) and is left stopped."""
        started = {i: time.monotonic() for i in range(len(self.workers))}
        delay: dict[int, float] = {}
        due: dict[int, float] = {}
        while not self._stopping.wait(0.2):
            self.watched += 1
            for i, proc in enumerate(list(self.workers)):
                code = proc.poll()
                if code is None or code == 0:
                    continue
                now = time.monotonic()
                if i not in due:
                    lived = now - started.get(i, now)
                    delay[i] = 0.0 if lived > 30 else min(max(2 * delay.get(i, 0.25), 0.5), 30)
                    due[i] = now + delay[i]
                    how = f"code {code}" if code > 0 else f"signal {-code}"
                    print(f"pyworker: worker {i} (pid {proc.pid}) exited with {how}; starting "
                          f"another" + (f" in {delay[i]:g} s" if delay[i] else "")
                          + f" (log: {self._worker_log(i)})", file=sys.stderr, flush=True)
                if now < due[i]:
                    continue
                del due[i]
                if self._stopping.is_set():
                    return
                self.workers[i] = self._start_worker(i, from_watcher=True)
                started[i] = time.monotonic()
                self.replaced += 1

    def wait_for_workers(self, n: int, timeout_s: float = 30):
        """Until n workers are registered. Once too few of this cluster's worker processes are
        left running to get there (a worker that cannot import pyworker, a bad PYWORKER_*
        setting, ...), fails at once, with the exit code and the end of the log of one that
        exited, instead of waiting out timeout_s."""
        client = self.client

        def ready():
            if client.live_workers(max_age_s=0) >= n:
                return True
            if sum(p.poll() is None for p in self.workers) < n:
                raise self._worker_exited(n)
            return False

        _wait(ready, timeout_s, f"{n} pyworker worker(s)")

    def _worker_exited(self, n: int) -> PyworkerError:
        i, proc = [(i, p) for i, p in enumerate(self.workers) if p.poll() is not None][-1]
        log_path = self._worker_log(i)
        tail = _log_tail(log_path)
        return PyworkerError(
            f"{n} pyworker worker(s) cannot start: worker {i} exited with {proc.returncode}"
            + (f"; the end of its log ({log_path}):\n{tail}" if tail else
               f" and wrote nothing to {log_path}"))

    def stop(self):
        from . import api
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(5)
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.workers:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.client is not None:
            if api._default is self.client:
                api._set_default(self._previous_default)
            self.client.close()
        self.redis.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
