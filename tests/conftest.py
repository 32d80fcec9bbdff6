"""Shared fixtures: real redis-server processes and real worker processes, started and stopped
here. Tests that need a tool (helm, docker, redis-server) skip when it is missing on a developer's
machine, but fail under CI (PYWORKER_REQUIRE_ALL=1), so a missing install step in .ci/run can
never turn into a silently green run."""
import os
import shutil
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


@pytest.fixture(scope="session")
def need_fn():
    return need


def wait_until(predicate, timeout_s, what, interval_s=0.05):
    """Poll predicate until true; fail with `what` after timeout_s. Every wait is bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def _cluster(n, **kw):
    need(shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)")
    from pyworker import LocalCluster
    return LocalCluster(n, **kw)


@pytest.fixture(scope="session")
def cluster():
    """Two workers shared by the tests that do not hurt them."""
    with _cluster(2, lease_s=2.0) as c:
        yield c


@pytest.fixture
def make_cluster():
    """A private cluster for tests that kill, stop or starve workers."""
    made = []

    def make(n=2, **kw):
        kw.setdefault("lease_s", 1.5)
        c = _cluster(n, **kw)
        made.append(c)
        return c.start()

    yield make
    for c in made:
        c.stop()


@pytest.fixture
def redis_server():
    need(shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)")
    from pyworker.local import RedisServer
    server = RedisServer().start()
    yield server
    server.stop()


def redis_keys(cluster, pattern):
    return sorted(k.decode() for k in cluster.client.broker.redis.call("KEYS", pattern))
