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

from pyworker import resp
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


def test_unix_urls_name_a_path_and_a_db(tmp_path):
    r = resp.Redis(f"unix://{tmp_path}/r.sock?db=3")
    assert (r.path, r.db) == (f"{tmp_path}/r.sock", 3)
    with pytest.raises(ValueError, match="no socket path"):
        resp.Redis("unix://")
    with pytest.raises(ValueError, match="unix://"):
        resp.Redis("http://localhost:6379")
    with pytest.raises(resp.RespConnectionError):
        r.call("PING")  # nothing listens there



def _blocked(fn):
    """fn()'s value, and how many times this thread blocked (voluntary context switches) in it:
    a busy-polling wait never blocks, a blocking read does."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    value = fn()
    return value, resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before


def _push_from_another_process(server, key):
    """RPUSH key, from a fresh Python process (so no thread of ours takes the GIL meanwhile);
    the value arrives after that process's start-up, a tenth of a second or more."""
    code = ("import sys; from pyworker import resp; "
            "resp.Redis(sys.argv[1], password=sys.argv[2]).call('RPUSH', sys.argv[3], 'late')")
    return subprocess.Popen([sys.executable, "-c", code, server.url, server.password, key],
                            cwd=ROOT)


@pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs RUSAGE_THREAD (Linux)")
def test_a_spinning_pipeline_busy_polls_until_its_replies_arrive(r, redis_server):
    r.call("PING")  # connected (and authenticated: a blocking round trip) before measuring
    # Another thread of this process that wakes meanwhile (an earlier test's client lingers)
    # can make the spinning thread block once for the GIL: up to three tries, one must not
    # block at all (a blocking read blocks every time).
    tries = []
    for _ in range(3):
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
