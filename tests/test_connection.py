"""The small Redis client against a real redis-server."""
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyworker import connection as resp
from support import ForkedChild, wait_until

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def r(redis_server):
    client = resp.Redis(redis_server.url, password=redis_server.password)
    yield client
    client.close()


def test_commands_and_replies(r):
    assert r.call("PING") == b"PONG"
    assert r.call("SET", "a", 1) == b"OK" and r.call("GET", "a") == b"1"
    assert r.call("GET", "missing") is None
    assert r.call("RPUSH", "l", "x", "y") == 2
    assert r.call("LRANGE", "l", 0, -1) == [b"x", b"y"]


def test_error_replies_raise(r):
    r.call("SET", "s", "v")
    with pytest.raises(resp.ReplyError, match="WRONGTYPE"):
        r.call("LPUSH", "s", "x")


def test_big_values_round_trip(r):
    blob = os.urandom(20 * 2**20)
    r.call("SET", "big", blob)
    assert r.call("GET", "big") == blob


def test_pipeline_keeps_order_and_reports_errors_in_place(r):
    replies = r.pipeline([("SET", "k", "1"), ("INCR", "k"), ("LPUSH", "k", "x"), ("GET", "k")],
                         raise_errors=False)
    assert replies[:2] == [b"OK", 2] and isinstance(replies[2], resp.ReplyError)
    assert replies[3] == b"2"


def test_scripts_load_themselves(r):
    script = resp.Script("return ARGV[1] .. 'x'")
    r.call("SCRIPT", "FLUSH")
    assert r.run(script, "a") == b"ax"
    assert r.run(script, "b") == b"bx"


def test_blocking_pop_times_out_with_none(r):
    assert r.call("BLPOP", "empty", "0.2", timeout=5.2) is None


def test_unix_socket_urls_connect_with_the_password(redis_server):
    assert redis_server.local_url.startswith("unix://")
    client = resp.Redis(redis_server.local_url, password=redis_server.password)
    try:
        assert client.call("PING") == b"PONG"
        assert client.pipeline([("SET", "u", "1"), ("GET", "u")]) == [b"OK", b"1"]
    finally:
        client.close()
    # the socket is as private as the password: only its owner may connect
    assert os.stat(redis_server.socket_path).st_mode & 0o777 == 0o700
    wrong = resp.Redis(redis_server.local_url, password="not-it")
    with pytest.raises(resp.ReplyError, match="WRONGPASS"):
        wrong.call("PING")


def test_unix_urls_name_a_path_and_a_db(tmp_path, redis_server):
    r = resp.Redis(f"unix://{redis_server.socket_path}?db=3", password=redis_server.password)
    try:
        assert b" db=3 " in r.call("CLIENT", "INFO")
    finally:
        r.close()
    r = resp.Redis(f"unix://{tmp_path}/r.sock?db=3")
    with pytest.raises(ValueError, match="no socket path"):
        resp.Redis("unix://")
    with pytest.raises(ValueError, match="unix://"):
        resp.Redis("http://localhost:6379")
    with pytest.raises(resp.ConnectionLost):
        r.call("PING")  # nothing listens there



def _blocked(fn):
    """fn()'s value, and how many times this thread blocked (voluntary context switches) in it:
    a busy-polling wait never blocks, a blocking read does."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    value = fn()
    return value, resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before


def _push_from_another_process(server, key):
    """RPUSH key, from a fresh Python process (so no thread of ours takes the GIL meanwhile);
    the value arrives after that process's start-up, some tens of milliseconds. It speaks RESP
    itself: importing a Redis client would make the wait, and so the chances that a thread of
    this process wakes in it, several times longer."""
    code = ("import socket, sys\n"
            "def bulk(*a): return ('*%d\\r\\n' % len(a) + ''.join("
            "'$%d\\r\\n%s\\r\\n' % (len(x.encode()), x) for x in a)).encode()\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "s.sendall(bulk('AUTH', sys.argv[2]) + bulk('RPUSH', sys.argv[3], 'late'))\n"
            "got = b''\n"
            "while got.count(b'\\r\\n') < 2: got += s.recv(100) or sys.exit('closed')\n"
            "sys.exit(0 if got.startswith(b'+OK') else got.decode())\n")
    return subprocess.Popen([sys.executable, "-S", "-c", code, str(server.port), server.password,
                             key], cwd=ROOT)


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs RUSAGE_THREAD (Linux)")
def test_a_spinning_pipeline_busy_polls_until_its_replies_arrive(r, redis_server):
    r.call("PING")  # connected (and authenticated: a blocking round trip) before measuring
    # Another thread of this process that wakes meanwhile (an earlier test's client lingers)
    # can make the spinning thread block once for the GIL: up to five tries, one must not
    # block at all (a blocking read blocks every time).
    tries = []
    for _ in range(5):
        pusher = _push_from_another_process(redis_server, "spun")
        replies, blocked = _blocked(lambda: r.pipeline(
            [("SET", "x", "1"), ("BLPOP", "spun", "20")], spin_s=20.0))
        assert pusher.wait(30) == 0
        assert replies == [b"OK", [b"spun", b"late"]]
        tries.append(blocked)
        if blocked == 0:
            break
    assert tries[-1] == 0, tries
    # a normal blocking connection afterwards
    assert r.call("BLPOP", "spun", "0.1", timeout=5.1) is None and r.call("GET", "x") == b"1"


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs RUSAGE_THREAD (Linux)")
@pytest.mark.parametrize("spin_s", [0.0, 0.005])
def test_without_spin_or_past_it_a_pipeline_blocks_and_still_reads_every_reply(
        r, redis_server, spin_s):
    pusher = _push_from_another_process(redis_server, "waited")
    replies, blocked = _blocked(lambda: r.pipeline([("BLPOP", "waited", "20")], spin_s=spin_s))
    assert pusher.wait(30) == 0
    assert replies == [[b"waited", b"late"]] and blocked >= 1


def test_a_pipeline_sent_now_is_read_later_and_only_once(r):
    first = r.send([("SET", "later", "1"), ("INCR", "later"), ("LPUSH", "later", "x")])
    second = r.send([("GET", "later")])  # another connection: the first is still the first's
    assert second.replies() == [b"2"]
    replies = first.replies()
    assert replies[:2] == [b"OK", 2] and isinstance(replies[2], resp.ReplyError)
    with pytest.raises(RuntimeError, match="read already"):
        first.replies()
    assert r.call("GET", "later") == b"2"  # both connections went back to the pool, usable


@pytest.fixture
def tls_redis(tmp_path):
    """redis-server speaking TLS only, with a self-signed certificate for 127.0.0.1."""
    from pyworker.local import free_port
    from support import need
    need(shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)")
    need(shutil.which("openssl"), "openssl is not installed (apt-get install openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", key, "-out", cert, "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind",
                             "127.0.0.1", "--tls-cert-file", cert, "--tls-key-file", key,
                             "--tls-auth-clients", "no", "--requirepass", "pw", "--save", "",
                             "--dir", tmp_path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "redis-server with TLS did not start"
                assert time.monotonic() < deadline, "redis-server with TLS did not listen in 10 s"
                time.sleep(0.02)
        yield f"rediss://127.0.0.1:{port}/0", cert
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_rediss_talks_tls_and_trusts_only_a_known_certificate(tls_redis, monkeypatch):
    url, cert = tls_redis
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # what OpenSSL trusts, besides the system
    r = resp.Redis(url, password="pw")
    try:
        assert r.call("PING") == b"PONG"
        # a pipeline that would busy-poll on a plain socket blocks instead, with the same replies
        assert r.pipeline([("SET", "k", "v"), ("BLPOP", "none", "0.05"), ("GET", "k")],
                          spin_s=0.01, timeout=2.0) == [b"OK", None, b"v"]
    finally:
        r.close()
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        resp.Redis(url, password="pw").call("PING")


def _interrupt_when_blocked(server, blocked=1, timeout_s=10.0):
    """Once ``blocked`` clients of the server wait in a blocking command, a real SIGINT to this
    process; its main thread then raises KeyboardInterrupt, as after Ctrl-C."""
    import signal
    import threading
    watcher = resp.Redis(server.url, password=server.password)

    def run():
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                info = watcher.call("INFO", "clients").decode()
                if f"blocked_clients:{blocked}\r" in info:
                    os.kill(os.getpid(), signal.SIGINT)
                    return
                time.sleep(0.005)
        finally:
            watcher.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("how", ["call", "pipeline", "pending"])
def test_ctrl_c_in_a_round_trip_leaves_no_reply_for_the_next_command(r, redis_server, how):
    """A blocking pop interrupted by a real SIGINT, alone, in a pipeline with replies after it,
    or as the replies of a pipeline sent earlier: the connection owes replies and is closed;
    the next commands on the pool read their own replies at once."""
    r.call("SET", "k", "1")
    commands = [("SET", "k", "2"), ("BLPOP", "never", "3"), ("GET", "k")]
    thread = _interrupt_when_blocked(redis_server)
    with pytest.raises(KeyboardInterrupt):
        if how == "call":
            r.call("BLPOP", "never", "3", timeout=10)
        elif how == "pipeline":
            r.pipeline(commands, timeout=10)
        else:
            r.send(commands).replies()
    thread.join(10)
    started = time.monotonic()
    assert r.call("RPUSH", "other", "x") == 1
    assert r.call("GET", "k") == (b"1" if how == "call" else b"2")
    assert r.pipeline([("LLEN", "other"), ("LLEN", "never")]) == [1, 0]
    assert time.monotonic() - started < 2.0, "the next commands waited for the blocking pop"
    # the interrupted connection is gone from the server, not waiting there any more
    wait_until(lambda: b"blocked_clients:0\r" in r.call("INFO", "clients"), 5,
               "the interrupted connection to leave the server")


def test_a_forked_child_gets_connections_of_its_own(r):
    """The child's pool starts empty (register_at_fork), so parent and child, each hammering
    its own key at the same time, never read each other's replies."""
    r.call("SET", "parent", "p")
    r.call("SET", "child", "c")
    assert r._idle, "the parent has pooled connections to hand down"
    child = ForkedChild(lambda: not r._idle and all(r.call("GET", "child") == b"c"
                                                    for _ in range(300)))
    try:
        for _ in range(300):
            assert r.call("GET", "parent") == b"p"
            assert r.pipeline([("GET", "parent"), ("GET", "child")]) == [b"p", b"c"]
    finally:
        assert child.result(), "the child read a reply that was not its own"


# --- what users of managed Redis need: CA bundle, mutual TLS, ACL users, Sentinel -------------

def _openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    from support import need
    need(shutil.which("openssl"), "openssl is not installed (apt-get install openssl)")
    d = tmp_path / "pki"
    d.mkdir()
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout",
             d / "ca.key", "-out", d / "ca.pem", "-subj", "/CN=pyworker test CA")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", d / f"{name}.key", "-out",
                 d / f"{name}.csr", "-subj", f"/CN={name}")
        extfile = d / f"{name}.ext"
        extfile.write_text(ext + "\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey",
                 d / "ca.key", "-CAcreateserial", "-days", "1", "-out", d / f"{name}.pem",
                 "-extfile", extfile)
    return d


def _start_redis(args, tmp_path, port, tls=False):
    from support import need
    need(shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)")
    proc = subprocess.Popen(["redis-server", *map(str, args), "--save", "", "--dir", tmp_path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, f"redis-server {args} did not start"
            assert time.monotonic() < deadline, "redis-server did not listen in 10 s"
            time.sleep(0.02)


def _broker(**settings):
    from pyworker.config import Settings
    from pyworker.queue import Broker
    return Broker(Settings(secret="test-secret-16-bytes", connect_timeout_s=2.0, **settings))


def test_mutual_tls_with_a_ca_bundle_a_client_certificate_and_its_key(pki, tmp_path):
    from pyworker.errors import ConfigurationError
    from pyworker.errors import ConnectionError as PyworkerConnectionError
    from pyworker.local import free_port
    port = free_port()
    proc = _start_redis(["--port", 0, "--tls-port", port, "--bind", "127.0.0.1",
                         "--tls-cert-file", pki / "server.pem", "--tls-key-file",
                         pki / "server.key", "--tls-ca-cert-file", pki / "ca.pem",
                         "--tls-auth-clients", "yes", "--requirepass", "pw"], tmp_path, port)
    url = f"rediss://127.0.0.1:{port}/0"
    try:
        b = _broker(redis_url=url, redis_password="pw", redis_ca_file=str(pki / "ca.pem"),
                    redis_cert_file=str(pki / "client.pem"),
                    redis_key_file=str(pki / "client.key"))
        b.ping()
        assert b.redis.call("SET", "k", "v") == b"OK"
        b.close()
        # the server wants a client certificate: without one the handshake fails
        with pytest.raises(PyworkerConnectionError, match=f"cannot reach Redis at 127.0.0.1:{port}"):
            _broker(redis_url=url, redis_password="pw",
                    redis_ca_file=str(pki / "ca.pem")).ping()
        # without the CA bundle the server's certificate is not trusted, and the error says so
        with pytest.raises(PyworkerConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            _broker(redis_url=url, redis_password="pw", redis_cert_file=str(pki / "client.pem"),
                    redis_key_file=str(pki / "client.key")).ping()
        with pytest.raises(ConfigurationError, match="go together"):
            _broker(redis_url=url, redis_cert_file=str(pki / "client.pem"))
        with pytest.raises(ConfigurationError, match="no such file"):
            _broker(redis_url=url, redis_ca_file=str(tmp_path / "missing.pem"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_acl_user_with_its_password_from_settings_or_the_url(redis_server):
    from pyworker.errors import ConnectionError as PyworkerConnectionError
    admin = resp.Redis(redis_server.url, password=redis_server.password)
    try:
        admin.call("ACL", "SETUSER", "alice", "on", ">alice-password", "~pyw:*", "&*", "+@all")
    finally:
        admin.close()
    host = f"127.0.0.1:{redis_server.port}"
    for settings in ({"redis_url": f"redis://{host}/0", "redis_username": "alice",
                      "redis_password": "alice-password"},
                     {"redis_url": f"redis://alice:alice-password@{host}/0"}):
        b = _broker(**settings)
        assert b.redis.call("ACL", "WHOAMI") == b"alice"
        assert b.redis.call("SET", "pyw:k", "v") == b"OK"
        with pytest.raises(resp.ReplyError, match="NOPERM"):
            b.redis.call("SET", "other:k", "v")  # outside what alice may touch
        b.close()
    with pytest.raises(PyworkerConnectionError, match="refused the password") as info:
        _broker(redis_url=f"redis://{host}/0", redis_username="alice",
                redis_password="wrong-password").ping()
    assert not info.value.retryable and "wrong-password" not in str(info.value)


def test_sentinel_failover_is_waited_out_by_a_running_pmap(tmp_path):
    """A master, its replica and a sentinel; workers and caller find the master through the
    sentinel. The master is killed while a pmap runs: the sentinel promotes the replica, and the
    pmap ends with every result."""
    import signal as _signal
    import pyworker
    from pyworker.client import Client
    from pyworker.config import Settings
    from pyworker.local import free_port
    m, r, s = free_port(), free_port(), free_port()
    auth = ["--requirepass", "pw", "--masterauth", "pw", "--bind", "127.0.0.1"]
    procs = []
    workers = []
    try:
        (tmp_path / "m").mkdir(), (tmp_path / "r").mkdir()
        procs.append(_start_redis(["--port", m, *auth], tmp_path / "m", m))
        procs.append(_start_redis(["--port", r, "--replicaof", "127.0.0.1", m, *auth],
                                  tmp_path / "r", r))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(f"port {s}\nbind 127.0.0.1\ndir {tmp_path}\n"
                        f"sentinel monitor mymaster 127.0.0.1 {m} 1\n"
                        "sentinel auth-pass mymaster pw\n"
                        "sentinel down-after-milliseconds mymaster 1000\n"
                        "sentinel failover-timeout mymaster 10000\n")
        procs.append(_start_redis([conf, "--sentinel"], tmp_path, s))
        replica = resp.Redis(f"redis://127.0.0.1:{r}/0", password="pw")
        wait_until(lambda: b"master_link_status:up" in replica.call("INFO", "replication"), 20,
                   "the replica to sync")
        env = {"PYWORKER_REDIS_URL": "redis:///0", "PYWORKER_REDIS_PASSWORD": "pw",
               "PYWORKER_REDIS_SENTINELS": f"127.0.0.1:{s}",
               "PYWORKER_REDIS_SENTINEL_MASTER": "mymaster", "PYWORKER_SECRET": "test-secret-16-bytes",
               "PYWORKER_LEASE_S": "5"}
        settings = Settings.from_env(environ=env)
        client = Client(settings)
        for i in range(2):
            log = open(tmp_path / f"worker-{i}.log", "w")
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "pyworker", "worker"], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT, env={**os.environ, **env,
                                                "PYWORKER_WORKER_NAME": f"w{i}"}))
        wait_until(lambda: len(pyworker.status(client).alive) == 2, 30, "two workers")
        started = tmp_path / "started"

        def slow(x):
            import time
            open(str(started), "a").close()
            time.sleep(0.3)
            return x * x

        box = {}

        def run():
            try:
                box["result"] = pyworker.pmap(slow, range(40), chunksize=1, client=client,
                                              timeout=120, progress=False)
            except BaseException as exc:
                box["error"] = exc

        import threading
        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_until(started.exists, 30, "the pmap to start")
        procs[0].send_signal(_signal.SIGKILL)  # the master
        t.join(150)
        assert "error" not in box, box.get("error")
        assert box.get("result") == [x * x for x in range(40)]
        assert b"role:master" in replica.call("INFO", "replication"), "the replica took over"
        client.close()
        replica.close()
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)
