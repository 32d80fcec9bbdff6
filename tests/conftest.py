"""Shared fixtures: real redis-server processes and real worker processes, started and stopped
here. Tests that need a tool (helm, docker, redis-server) skip when it is missing on a developer's
machine, but fail under CI (PYWORKER_REQUIRE_ALL=1), so a missing install step in .ci/run can
never turn into a silently green run."""
import shutil

import pytest

from support import need


@pytest.fixture(scope="session")
def need_fn():
    return need


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
