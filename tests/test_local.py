"""LocalCluster and its redis-server."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import pyworker
from pyworker.errors import ConfigurationError, PyworkerError
from pyworker.local import LocalCluster, RedisServer

from support import need, wait_until


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


def test_local_processes_talk_through_the_unix_socket():
    with LocalCluster(1) as cluster:
        assert cluster.env["PYWORKER_REDIS_URL"] == cluster.redis.local_url
        assert cluster.client.broker.redis._kwargs["path"] == cluster.redis.socket_path
        assert pyworker.pmap(abs, [-3]) == [3]
        # the worker came through the socket too: Redis counts unix-socket clients by path
        clients = cluster.client.broker.redis.call("CLIENT", "LIST").decode()
        assert sum(" laddr=" + cluster.redis.socket_path + ":0 " in line
                   for line in clients.splitlines()) >= 2, clients
    assert not os.path.exists(cluster.redis.socket_path)


def test_a_socket_path_too_long_for_unix_falls_back_to_tcp(tmp_path):
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    server = RedisServer(workdir=str(deep)).start()
    try:
        assert not server.has_socket and server.local_url == server.url
        from pyworker import connection as resp
        assert resp.Redis(server.local_url, password=server.password).call("PING") == b"PONG"
    finally:
        server.stop()


def test_the_callers_spin_may_come_from_the_environment_nothing_else(monkeypatch):
    monkeypatch.setenv("PYWORKER_SPIN_S", "0")
    monkeypatch.setenv("PYWORKER_LEASE_S", "77")
    cluster = LocalCluster(0)
    try:
        settings = cluster.settings()
    finally:
        cluster.stop()  # removes the folder its (unstarted) Redis was given
    assert settings.spin_s == 0 and settings.lease_s != 77


def test_workers_that_cannot_start_fail_at_once_saying_why():
    # Without the check, this waited out the 30 s and said only "not ready".
    with pytest.raises(PyworkerError) as err:
        LocalCluster(2, worker_env={"PYWORKER_LEASE_S": "-1"}).start()
    msg = str(err.value)
    assert "cannot start: worker" in msg and "exited with 1" in msg, msg
    assert "PYWORKER_LEASE_S must be greater than 0" in msg, msg


def _alive(pid: int) -> bool:
    """Running (a zombie nobody has reaped yet is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_a_killed_caller_takes_its_redis_and_workers_with_it(tmp_path):
    # A notebook kernel killed (restarted) never runs LocalCluster.stop: its processes must not
    # outlive it.
    need(shutil.which("setpriv"), "setpriv is missing (apt-get install util-linux)")
    pids = tmp_path / "pids"
    script = ("import json, sys, time\nfrom pyworker import LocalCluster, pmap\n"
              "c = LocalCluster(2).start()\nassert pmap(abs, [-1]) == [1]\n"
              "open(sys.argv[1], 'w').write(json.dumps([c.redis.proc.pid]"
              " + [w.pid for w in c.workers]))\ntime.sleep(120)\n")
    caller = subprocess.Popen([sys.executable, "-c", script, str(pids)])
    try:
        wait_until(lambda: pids.exists() and pids.read_text(), 60, "the cluster to start")
        started = json.loads(pids.read_text())
        assert len(started) == 3 and all(_alive(p) for p in started)
    finally:
        caller.kill()
        caller.wait(10)
    try:
        wait_until(lambda: not any(_alive(p) for p in started), 20,
                   "redis-server and the workers to stop after their caller was killed")
    finally:
        for pid in filter(_alive, started):  # (when they did not: no orphans from the test)
            os.kill(pid, 9)


def test_a_setpriv_without_pdeathsig_is_not_used(tmp_path, monkeypatch):
    from pyworker import local
    old = tmp_path / "setpriv"  # util-linux before 2.33: no --pdeathsig
    old.write_text("#!/bin/sh\necho 'setpriv: unrecognized option' >&2\nexit 1\n")
    old.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    local._setpriv.cache_clear()
    try:
        assert local.with_parent(["redis-server", "x.conf"]) == ["redis-server", "x.conf"]
    finally:
        monkeypatch.undo()
        local._setpriv.cache_clear()
    need(shutil.which("setpriv"), "setpriv is missing (apt-get install util-linux)")
    assert local.with_parent(["true"])[1:] == ["--pdeathsig", "TERM", "--", "true"]


def test_a_worker_that_dies_is_replaced_and_says_so(make_cluster, capfd):
    import pyworker
    cluster = make_cluster(2)
    victim = cluster.workers[0]
    victim.kill()
    wait_until(lambda: cluster.replaced == 1 and cluster.workers[0] is not victim
               and len(pyworker.status(cluster.client).alive) >= 2, 20,
               "the dead worker to be replaced")
    assert cluster.workers[0].poll() is None
    assert "worker 0 (pid %d) exited with signal 9; starting another" % victim.pid in \
        capfd.readouterr().err
    assert pyworker.pmap(abs, range(-4, 0), client=cluster.client, timeout=20) == [4, 3, 2, 1]


def test_a_worker_stopped_on_purpose_is_not_replaced(make_cluster):
    cluster = make_cluster(1)
    cluster.workers[0].terminate()
    assert cluster.workers[0].wait(10) == 0
    looked = cluster.watched
    wait_until(lambda: cluster.watched >= looked + 2, 10, "the watcher to look twice")
    assert cluster.replaced == 0 and cluster.workers[0].poll() == 0
