"""LocalCluster and its redis-server."""
import os
import subprocess

import pytest

import pyworker
from pyworker.errors import ConfigurationError
from pyworker.local import LocalCluster, RedisServer


def test_local_cluster_is_the_default_backend_inside_its_block():
    with LocalCluster(2) as cluster:
        assert pyworker.get_client() is cluster.client
        assert pyworker.pmap(lambda x: -x, range(5)) == [0, -1, -2, -3, -4]
        assert len(pyworker.status().alive) == 2
        procs = list(cluster.workers) + [cluster.redis.proc]
    assert all(p.poll() is not None for p in procs), "everything it started has stopped"


def test_local_redis_listens_on_loopback_with_a_password(redis_server):
    conf = open(os.path.join(redis_server.dir, "redis.conf")).read()
    assert "bind 127.0.0.1" in conf and f'requirepass "{redis_server.password}"' in conf
    assert len(redis_server.password) >= 24


def test_missing_redis_server_says_how_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigurationError, match="apt-get install redis-server"):
        RedisServer()


def test_negative_worker_count_is_refused():
    with pytest.raises(ValueError, match="non-negative integer"):
        LocalCluster(-1)
