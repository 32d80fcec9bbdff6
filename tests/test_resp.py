"""The small Redis client against a real redis-server."""
import os

import pytest

from pyworker import resp


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
    assert r.blocking("BLPOP", "empty", "0.2", wait_s=0.2) is None


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
