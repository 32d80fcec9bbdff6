"""A Redis that can evict pyworker's keys (any maxmemory-policy but noeviction) is said once, at
connect time, by callers and workers; a Redis that will not tell its policy is not an error.
Real redis-server processes started with the policy on their command line."""
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

import pyworker
from pyworker import queue
from pyworker.config import Settings
from pyworker.local import free_port

from support import need, wait_until

PASSWORD = "eviction-test-password"
SECRET = "s" * 32


@pytest.fixture
def start_redis(tmp_path):
    """start_redis(*args): a redis-server on a free loopback port with these extra arguments."""
    need(shutil.which("redis-server"), "redis-server is not installed (bash ci/setup-env.sh test)")
    procs = []

    def start(*args):
        port = free_port()
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--requirepass", PASSWORD, "--save", "", "--dir", str(tmp_path),
                                 *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        client = pyworker.Client(Settings.from_env(redis_url=url, redis_password=PASSWORD,
                                                   secret=SECRET))

        def answers():
            assert proc.poll() is None, "redis-server exited"
            try:
                client.broker.ping()
                return True
            except pyworker.ConnectionError:
                return False
        wait_until(answers, 10, "redis-server to answer")
        client.close()
        return url
    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test starts as a new process would: no Redis warned about yet."""
    monkeypatch.setattr(queue, "_warned_eviction", set())


def client(url):
    return pyworker.Client(Settings.from_env(redis_url=url, redis_password=PASSWORD, secret=SECRET))


def warnings_in(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "pyworker.queue" and r.levelno >= logging.WARNING]


def test_allkeys_lru_is_warned_about_once(start_redis, caplog):
    url = start_redis("--maxmemory-policy", "allkeys-lru")
    caplog.set_level(logging.DEBUG, logger="pyworker.queue")
    first = client(url)
    first.ping()  # what pyworker.connect() does
    (message,) = warnings_in(caplog)
    assert "maxmemory-policy allkeys-lru" in message and "evicts any key" in message
    assert "strands jobs" in message and "Set maxmemory-policy noeviction" in message
    assert PASSWORD not in message
    assert first.broker.check_eviction_policy() == "allkeys-lru"
    # Another client of the same Redis, a job: no second warning in this process.
    second = client(url)
    second.ping()
    second.job()
    assert len(warnings_in(caplog)) == 1
    first.close()
    second.close()


def test_the_first_job_warns_without_a_ping(start_redis, caplog):
    """get_client() never pings: the first job asks instead."""
    url = start_redis("--maxmemory-policy", "allkeys-random")
    c = client(url)
    c.job()
    (message,) = warnings_in(caplog)
    assert "maxmemory-policy allkeys-random" in message
    c.close()


def test_volatile_policies_are_warned_about_too(start_redis, caplog):
    """volatile-* evict only keys with a TTL, and pyworker's keys all have one."""
    url = start_redis("--maxmemory-policy", "volatile-lru")
    c = client(url).ping()
    (message,) = warnings_in(caplog)
    assert "maxmemory-policy volatile-lru" in message
    assert "evicts keys that have a TTL, and pyworker's keys" in message
    c.close()


def test_noeviction_says_nothing(start_redis, caplog):
    url = start_redis("--maxmemory-policy", "noeviction")
    c = client(url).ping()
    assert c.broker.check_eviction_policy() == "noeviction"
    assert warnings_in(caplog) == []
    c.close()


def test_config_read_from_config_get_when_info_is_refused(start_redis, caplog):
    url = start_redis("--maxmemory-policy", "allkeys-lfu", "--rename-command", "INFO", "")
    c = client(url).ping()
    assert c.broker.check_eviction_policy() == "allkeys-lfu"
    assert "maxmemory-policy allkeys-lfu" in warnings_in(caplog)[0]
    c.close()


def test_a_redis_that_will_not_tell_is_no_error(start_redis, caplog):
    """Managed Redis often refuses CONFIG (and proxies INFO): nothing at warning level, a debug
    line, and the client works."""
    url = start_redis("--maxmemory-policy", "allkeys-lru", "--rename-command", "INFO", "",
                      "--rename-command", "CONFIG", "")
    caplog.set_level(logging.DEBUG, logger="pyworker.queue")
    c = client(url).ping()
    assert c.broker.check_eviction_policy() is None
    assert warnings_in(caplog) == []
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("refused CONFIG" in m and "maxmemory-policy is not known" in m for m in debug), debug
    assert c.job() is not None
    c.close()


def test_a_worker_logs_it(start_redis):
    """A worker started against such a Redis says it in its log, once."""
    url = start_redis("--maxmemory-policy", "volatile-ttl")
    env = {**os.environ, "PYWORKER_REDIS_URL": url, "PYWORKER_REDIS_PASSWORD": PASSWORD,
           "PYWORKER_SECRET": SECRET, "PYWORKER_WORKER_NAME": "evict-test"}
    proc = subprocess.Popen([sys.executable, "-m", "pyworker", "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if " started: redis " in line:
                break
        log = "".join(lines)
        assert "maxmemory-policy volatile-ttl" in log, log
        assert log.count("has maxmemory-policy") == 1, log
    finally:
        proc.terminate()
        proc.wait(20)
