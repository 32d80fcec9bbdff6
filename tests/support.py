"""Helpers the core tests import (`from support import ...`). Not named conftest: tests/chart
has a conftest.py too, and two modules named conftest cannot both be imported by name."""
import os
import time

import pytest

REQUIRE_ALL = os.environ.get("PYWORKER_REQUIRE_ALL") == "1"


def need(condition, reason):
    """Skip (or, under PYWORKER_REQUIRE_ALL=1, fail) unless ``condition`` holds."""
    if condition:
        return
    if REQUIRE_ALL:
        pytest.fail(f"required for this run but missing: {reason}", pytrace=False)
    pytest.skip(reason)


def wait_until(predicate, timeout_s, what, interval_s=0.05):
    """Poll predicate until true; fail with `what` after timeout_s. Every wait is bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def executors(cluster) -> dict[int, tuple[str, object]]:
    """Each live worker's executor pid (the process its tasks run in: os.getpid() in a task)
    -> (worker id in Redis, the worker's process in cluster.workers)."""
    import pyworker
    procs = {p.pid: p for p in cluster.workers}
    return {int(w["executor"]): (w.get("id", w["name"]), procs.get(int(w["pid"])))
            for w in pyworker.status(cluster.client).alive if w.get("executor")}


def redis_keys(cluster, pattern):
    return sorted(k.decode() for k in cluster.client.broker.redis.call("KEYS", pattern))


def shm_files(folder):
    """Names of the shared-memory segments in a PYWORKER_SHM_DIR (its pyworker-<uid> folder)."""
    path = os.path.join(str(folder), f"pyworker-{os.geteuid()}")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def shm_cluster(make_cluster, folder, n=2, client_dir=None, **kw):
    """A private cluster whose workers keep segments in ``folder`` (PYWORKER_SHM_DIR), and a
    client of it that uses ``client_dir`` (default: the same folder). Returns (cluster, client);
    the client is closed with the cluster."""
    import dataclasses

    import pyworker
    from pyworker import api
    for path in (folder, client_dir or folder):
        os.makedirs(str(path), exist_ok=True)
    env = {"PYWORKER_SHM_DIR": str(folder), **kw.pop("worker_env", {})}
    cluster = make_cluster(n, worker_env=env, **kw)
    client = pyworker.Client(dataclasses.replace(cluster.settings(),
                                                 shm_dir=str(client_dir or folder)))
    cluster.client.close()  # the cluster's own client goes; ours takes its place (and is the
    cluster.client = client  # default until the cluster stops, like the one it replaces)
    api._set_default(client)
    return cluster, client


def redis_bytes_in(cluster) -> int:
    """Bytes Redis has received so far (INFO stats total_net_input_bytes)."""
    info = cluster.client.broker.redis.call("INFO", "stats").decode()
    for line in info.splitlines():
        if line.startswith("total_net_input_bytes:"):
            return int(line.split(":")[1])
    raise AssertionError("no total_net_input_bytes in INFO stats")


class ReplyDroppingProxy:
    """A TCP proxy in front of Redis that forwards everything, except that it cuts the
    connection instead of passing on some answers: the request ran in Redis, its answer is
    lost. It counts the answers to requests containing ``marker`` (for instance a script's
    sha) that contain ``answer_marker`` (if given), and drops those whose count is in
    ``drop``."""

    def __init__(self, upstream_port, marker: bytes, drop: set[int],
                 answer_marker: bytes | None = None):
        import socket
        import threading
        self.upstream_port, self.marker, self.drop = upstream_port, marker, set(drop)
        self.answer_marker = answer_marker
        self.seen = self.dropped = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            upstream.settimeout(None)
            state = {"armed": False}
            for args in ((client, upstream, state, True), (upstream, client, state, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src, dst, state, to_redis):
        import socket
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if to_redis:
                    if self.marker in data:
                        state["armed"] = True
                elif state["armed"] and (self.answer_marker is None
                                         or self.answer_marker in data):
                    state["armed"] = False
                    with self._lock:
                        self.seen += 1
                        lose = self.seen in self.drop
                        self.dropped += lose
                    if lose:
                        break  # the answer is lost with the connection
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):  # shutdown first: it wakes the other direction's blocked recv
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self._stop.set()
        self._server.close()


class ForkedChild:
    """fn() in a forked child while this process goes on; result() says whether it returned
    something true. The child leaves with os._exit, never through pytest."""

    def __init__(self, fn):
        read, write = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            ok = b"0"
            try:
                ok = b"1" if fn() else b"0"
            finally:
                os.write(write, ok)
                os._exit(0)
        os.close(write)
        self._read = read

    def result(self) -> bool:
        _, status = os.waitpid(self.pid, 0)
        try:
            return os.read(self._read, 1) == b"1" and status == 0
        finally:
            os.close(self._read)
