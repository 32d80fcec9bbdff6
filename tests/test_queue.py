"""The queue's guarantees between jobs and callers: fairness, cancellation, expiry, isolation."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import pyworker

from support import redis_keys, shm_files, wait_until

CALLER = r"""
import json, os, sys, time
from pyworker import pmap
tag, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
print("started", flush=True)
out = pmap(lambda x: (time.sleep(delay), (tag, x, os.getpid()))[1], range(n), chunksize=1,
           progress=False)
print(json.dumps(out), flush=True)
"""


def _caller(cluster, *args, **env):
    return subprocess.Popen([sys.executable, "-c", CALLER, *map(str, args)],
                            env={**os.environ, **cluster.env, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_callers_running_at_once_never_get_each_others_results(make_cluster):
    cluster = make_cluster(2)
    a = _caller(cluster, "A", 60, 0.01)
    b = _caller(cluster, "B", 60, 0.01)
    out_a, err_a = a.communicate(timeout=60)
    out_b, err_b = b.communicate(timeout=60)
    res_a = json.loads(out_a.splitlines()[-1])
    res_b = json.loads(out_b.splitlines()[-1])
    assert [(t, x) for t, x, _ in res_a] == [("A", x) for x in range(60)], err_a
    assert [(t, x) for t, x, _ in res_b] == [("B", x) for x in range(60)], err_b


def test_a_huge_job_does_not_starve_a_small_one_started_later(make_cluster):
    cluster = make_cluster(2)
    big_done = threading.Event()

    def big():
        pyworker.pmap(time.sleep, [0.02] * 400, chunksize=1, client=cluster.client,
                      progress=False)
        big_done.set()

    t = threading.Thread(target=big, daemon=True)
    t.start()
    wait_until(lambda: redis_keys(cluster, "pyw:job:*:q"), 20, "the big job to be queued")
    small_client = pyworker.Client(cluster.settings())
    try:
        started = time.monotonic()
        assert pyworker.pmap(abs, range(-4, 0), chunksize=1, client=small_client) == [4, 3, 2, 1]
        took = time.monotonic() - started
    finally:
        small_client.close()
    assert not big_done.is_set(), "the small job waited for the whole big job"
    assert took < 2.0, f"the small job took {took:.1f} s behind a 4 s job"
    t.join(60)
    assert big_done.is_set()


def test_ctrl_c_cancels_the_whole_job_at_once(make_cluster):
    cluster = make_cluster(1)
    caller = _caller(cluster, "C", 50, 1.0)
    assert caller.stdout.readline().strip() == "started"
    wait_until(lambda: [w for w in pyworker.status(cluster.client).alive if w.get("current")],
               20, "the worker to start the caller's first task")
    assert redis_keys(cluster, "pyw:job:*:q")
    caller.send_signal(signal.SIGINT)
    sent = time.monotonic()
    caller.wait(5)
    assert time.monotonic() - sent < 2.0, "the caller did not get control back at once"
    assert "KeyboardInterrupt" in caller.stderr.read()
    # Within 2 s the queued tasks have left Redis ...
    wait_until(lambda: not redis_keys(cluster, "pyw:job:*"), 2.0 - (time.monotonic() - sent),
               "the job's keys to leave Redis")
    # ... and the running one is neither retried nor reported.
    wait_until(lambda: not [w for w in pyworker.status(cluster.client).alive if w.get("current")],
               5, "the worker to finish its current task")
    assert redis_keys(cluster, "pyw:job:*") == []
    info = pyworker.status(cluster.client).alive[0]
    assert int(info["done"]) <= 2


BIG_CALLER = r"""
import sys, time
import numpy as np
from pyworker import pmap
print("started", flush=True)
pmap(lambda a: (time.sleep(0.5), a + 1)[1], [np.ones(2**17) for _ in range(12)], chunksize=1,
     progress=False)
"""


def test_ctrl_c_leaves_no_shared_memory_segment(make_cluster, tmp_path):
    folder = tmp_path / "shm"
    folder.mkdir()
    cluster = make_cluster(2, worker_env={"PYWORKER_SHM_DIR": str(folder)})
    caller = subprocess.Popen([sys.executable, "-c", BIG_CALLER],
                              env={**os.environ, **cluster.env, "PYWORKER_SHM_DIR": str(folder)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert caller.stdout.readline().strip() == "started"
    wait_until(lambda: len([w for w in pyworker.status(cluster.client).alive
                            if w.get("current")]) == 2, 20, "both workers to start a task")
    assert len(shm_files(folder)) >= 3, "queued and running chunks are in shared memory"
    caller.send_signal(signal.SIGINT)
    caller.wait(5)
    assert "KeyboardInterrupt" in caller.stderr.read()
    assert not [n for n in shm_files(folder) if ".t." in n], "the caller removed its segments"
    # the two running tasks finish afterwards: their results are dropped, and so are the files
    wait_until(lambda: not [w for w in pyworker.status(cluster.client).alive if w.get("current")],
               10, "the workers to finish their tasks")
    # (a worker removes its result's file once it has read finish's answer, just after Redis
    # dropped the task from its active hash, which is what status() shows)
    wait_until(lambda: shm_files(folder) == [], 5, "the workers to remove their result files")


def test_a_vanished_callers_job_expires(make_cluster):
    cluster = make_cluster(1)
    caller = _caller(cluster, "V", 30, 0.5, PYWORKER_JOB_TTL_S="2")
    assert caller.stdout.readline().strip() == "started"
    wait_until(lambda: redis_keys(cluster, "pyw:job:*:q"), 20, "the caller's job to be queued")
    assert redis_keys(cluster, "pyw:fn:*")
    caller.kill()  # SIGKILL: no chance to clean up
    caller.wait(5)
    wait_until(lambda: not redis_keys(cluster, "pyw:job:*") and not redis_keys(cluster, "pyw:fn:*"),
               10, "the abandoned job's keys to expire")
    r = cluster.client.broker.redis
    wait_until(lambda: r.call("LLEN", "pyw:jobs") == 0, 5, "the job to leave the rotation")


def test_a_submit_that_waits_for_its_result_never_waits_on_a_fresh_redis(make_cluster,
                                                                          monkeypatch):
    # The last batch's submit waits for the first result in the same round trip; on a Redis
    # that does not have the submit script yet, that wait must not sit behind a failed submit.
    from pyworker import api
    monkeypatch.setattr(api, "FIRST_RESULT_WAIT_S", 3.0)
    cluster = make_cluster(1)
    cluster.client.broker.redis.call("SCRIPT", "FLUSH")
    started = time.monotonic()
    assert pyworker.pmap(abs, [-1], client=cluster.client, timeout=60) == [1]
    assert pyworker.pmap(abs, [-2], client=cluster.client, timeout=60) == [2]
    assert time.monotonic() - started < 2.5, "a submit waited for a result it had not queued"
    # Scripts gone behind the client's back (a Redis restart): at worst one wait, then right.
    cluster.client.broker.redis.call("SCRIPT", "FLUSH")
    assert pyworker.pmap(abs, [-3], client=cluster.client, timeout=60) == [3]
    assert pyworker.pmap(abs, [-4], client=cluster.client, timeout=60) == [4]


def test_surplus_wake_tokens_never_pile_up(redis_server):
    """Busy workers take their next task with their finish: tokens for more waiting workers
    than there are would each cost some idle worker a useless round trip later."""
    from pyworker.config import Settings
    from pyworker.queue import Broker
    broker = Broker(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                             secret="test-secret-16-bytes"))
    try:
        for name in ("w1", "w2"):  # registered and busy: neither is on the idle stack
            broker.register_worker(name, {"pid": "1"})
        broker.submit("job1", [b"t"] * 8, 8, meta={"created": "1"})
        assert broker.redis.call("LLEN", broker.keys.wake) == 2
        for _ in range(20):  # a long job: one more chunk for each result
            broker.submit("job1", [b"t"], 1)
        assert broker.redis.call("LLEN", broker.keys.wake) == 2
        # an idle worker is woken through its own list, and takes its share of the room
        broker.redis.call("DEL", broker.keys.wake)
        broker.redis.call("LPUSH", broker.keys.idle, "w1")
        broker.submit("job1", [b"t"] * 8, 8)
        assert broker.redis.call("LLEN", broker.keys.worker_wake("w1")) == 1
        assert broker.redis.call("LLEN", broker.keys.wake) == 1
    finally:
        broker.close()


def test_live_workers_are_those_with_a_lease_in_one_round_trip(redis_server, monkeypatch):
    from pyworker import connection as resp
    from pyworker.config import Settings
    from pyworker.queue import Broker
    broker = Broker(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                             secret="test-secret-16-bytes"))
    try:
        assert broker.live_worker_shm() == []
        broker.register_worker("a", {"shm": "id-a"})
        broker.register_worker("b", {"pid": "2"})  # no shared memory
        broker.register_worker("c", {"shm": "id-c"})
        broker.redis.call("DEL", broker.keys.heartbeat("c"))  # its lease is gone
        sent = []
        send = resp.Redis._send
        monkeypatch.setattr(resp.Redis, "_send", lambda s, c, b: (sent.append(1), send(s, c, b)))
        assert sorted(broker.live_worker_shm()) == ["", "id-a"]
        assert len(sent) == 1, "one round trip, however many workers"
        assert broker.live_workers() == 2
    finally:
        broker.close()


def _broker(redis_server):
    from pyworker.config import Settings
    from pyworker.queue import Broker
    return Broker(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                           secret="test-secret-16-bytes"))


def test_an_idle_worker_is_handed_its_task_and_an_older_one_gets_a_token(redis_server):
    """A submit gives a task itself to an idle worker that takes hand-offs (into its active
    hash, as a dequeue would: nothing is lost if it dies), so it starts without a dequeue; a
    worker from before hand-offs gets a token and dequeues. The rest stays queued."""
    broker = _broker(redis_server)
    r, k = broker.redis, broker.keys
    try:
        broker.register_worker("new", {"pid": "1", "handoff": "1"})
        broker.register_worker("old", {"pid": "2"})
        r.call("RPUSH", k.idle, "new", "old")  # "new" idle most recently
        tasks = [f"job1 {i} fn 3.11 3 i -\n".encode() + b"x" * 40 for i in range(3)]
        assert broker.submit("job1", tasks, 3, meta={"created": "1"}) == 2  # two queued
        assert broker.wait_and_dequeue("new", 1.0) == tasks[0]
        assert broker.held_tasks("new") == {"job1 0": tasks[0]}
        assert broker.wait_and_dequeue("old", 1.0) == tasks[1]  # token, then its dequeue
        assert broker.held_tasks("old") == {"job1 1": tasks[1]}
        assert r.call("LRANGE", k.queue("job1"), 0, -1) == [tasks[2]]
        assert r.call("LLEN", k.idle) == 0
    finally:
        broker.close()


def test_a_task_handed_to_a_worker_comes_before_queued_ones_when_it_dequeues(redis_server):
    """A worker on the idle stack is not always blocked on its wake list: here its wait has
    just ended and it dequeues, while a submit hands it a task and another job has one
    queued. The handed task (already in its active hash) must come first, or it waits there
    until the worker next goes idle. The same holds for the task a finish takes."""
    broker = _broker(redis_server)
    r, k = broker.redis, broker.keys
    try:
        broker.register_worker("w", {"pid": "1", "handoff": "1"})
        queued = b"big 0 fn 3.11 3 i -\n" + b"q" * 40
        broker.submit("big", [queued], 0, meta={"created": "1"})
        r.call("LPUSH", k.idle, "w")
        handed = b"small 0 fn 3.11 3 i -\n" + b"h" * 40
        broker.submit("small", [handed], 1, meta={"created": "1"})
        assert r.call("LRANGE", k.worker_wake("w"), 0, -1) == [handed]
        assert broker.dequeue("w") == handed
        assert r.call("LLEN", k.worker_wake("w")) == 0
        # a finish that takes the next task: the handed one first, then the queue
        handed2 = b"small 1 fn 3.11 3 i -\n" + b"h" * 40
        r.call("LPUSH", k.idle, "w")
        broker.submit("small", [handed2], 1)
        kept, tasks = broker.finish("w", "small", 0, b"0 ok w i\n", 2)
        assert kept and tasks == [handed2, queued]
        assert set(broker.held_tasks("w")) == {"small 1", "big 0"}
    finally:
        broker.close()


def test_a_worker_that_finds_no_task_goes_idle_unless_it_holds_one_to_run(redis_server):
    """A finish sent ahead (the worker runs a task it holds meanwhile) that finds nothing must
    not put the worker on the idle stack: a submit would hand it a task that waits behind the
    held one, while a worker really idle waits for nothing."""
    broker = _broker(redis_server)
    r, k = broker.redis, broker.keys
    try:
        for name in ("busy", "idle"):
            broker.register_worker(name, {"pid": "1", "handoff": "1"})
        tasks = [f"job1 {i} fn 3.11 3 i -\n".encode() + b"x" * 40 for i in range(2)]
        broker.submit("job1", tasks, 0, meta={"created": "1"})
        assert broker.dequeue("idle") == tasks[0] and broker.dequeue("busy") == tasks[1]
        broker.finish("idle", "job1", 0, b"0 ok idle i\n", 2)  # found nothing: idle
        assert r.call("LRANGE", k.idle, 0, -1) == [b"idle"]
        broker.finish("busy", "job1", 1, b"1 ok busy i\n", 1, holding=True)
        assert r.call("LRANGE", k.idle, 0, -1) == [b"idle"], "a worker holding a task went idle"
        new = b"job2 0 fn 3.11 3 i -\n" + b"n" * 40
        broker.submit("job2", [new], 1, meta={"created": "1"})
        assert broker.held_tasks("idle") == {"job2 0": new}, "the idle worker got it"
    finally:
        broker.close()


def test_a_handed_task_adopted_from_the_active_hash_never_runs_twice(redis_server):
    """After a lost connection a worker adopts what Redis says it holds; a task handed over
    meanwhile also waits in its wake list, and must leave it (Worker._adopt)."""
    from pyworker.config import Settings
    from pyworker.worker import Worker
    worker = Worker(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                             secret="test-secret-16-bytes", worker_name="w1"))
    broker = worker.broker
    try:
        broker.register_worker("w1", {"pid": "1", "handoff": "1"})
        broker.redis.call("LPUSH", broker.keys.idle, "w1")
        task = b"job1 0 fn 3.11 3 i -\n" + b"x" * 40
        broker.submit("job1", [task], 1, meta={"created": "1"})
        held = list(broker.held_tasks("w1").values())
        assert held == [task] and worker._adopt(held) == [task]
        assert broker.wait_and_dequeue("w1", 0.1) is None, "the adopted task came again"
    finally:
        broker.close()


def test_a_take_brings_the_results_already_in_and_keeps_them_until_acknowledged(
        redis_server, monkeypatch):
    """A caller's take waits for one result and brings up to ``more`` others that are in by
    then, in the same round trip; all of them stay in the taken list until the next take
    acknowledges them (an answer lost on the way loses none)."""
    from pyworker import connection as resp
    broker = _broker(redis_server)
    r, k = broker.redis, broker.keys
    try:
        results = [f"job1 {i} ok w i -\n".encode() for i in range(4)]
        r.call("RPUSH", k.results("job1"), *results[:3])
        sent = []
        send = resp.Redis._send
        monkeypatch.setattr(resp.Redis, "_send", lambda s, c, b: (sent.append(1), send(s, c, b)))
        assert broker.pop_results("job1", 1.0, more=8) == results[:3]
        assert len(sent) == 1, "one round trip for the three"
        assert r.call("LRANGE", k.results_taken("job1"), 0, -1) == results[:3]
        r.call("RPUSH", k.results("job1"), results[3])
        assert broker.pop_results("job1", 1.0, ack=3) == [results[3]], "acknowledged, then taken"
        assert r.call("LRANGE", k.results_taken("job1"), 0, -1) == [results[3]]
        assert broker.pop_results("job1", 0.05, ack=1, more=8) == [], "nothing came"
        assert r.call("EXISTS", k.results_taken("job1"), k.results("job1")) == 0
    finally:
        broker.close()


# --- Redis error replies ---------------------------------------------------------------------

def _worker_logs(cluster) -> list[str]:
    out = []
    for i in range(len(cluster.workers)):
        with open(os.path.join(cluster._log_dir, f"worker-{i}.log"), errors="replace") as f:
            out.append(f.read())
    return out


def _answers_with(server, code: str) -> bool:
    """Waits (bounded) until redis-server answers PING with the error reply ``code``."""
    from pyworker import connection as resp
    probe = resp.Redis(server.url, password=server.password)

    def refused():
        try:
            probe.call("PING")
        except resp.ReplyError as exc:
            return str(exc).startswith(code)
        except resp.ConnectionLost:
            return False  # not listening yet
        return False  # not yet

    try:
        return wait_until(refused, 10, f"redis-server to answer {code}")
    finally:
        probe.close()


def _restart_loading_slowly(cluster, filler_keys=10_000, key_delay_us=150):
    """redis-server saves its exact state (SHUTDOWN SAVE) with ``filler_keys`` more keys, and
    starts again on the same port, socket and password, loading them slowly (its key-load-delay,
    and loading-process-events-interval-bytes so that it answers meanwhile, as a big data set
    does): until it has loaded, every command gets -LOADING."""
    from pyworker import connection as resp
    server = cluster.redis
    r = resp.Redis(server.url, password=server.password)
    for start in range(0, filler_keys, 5_000):
        r.call("EVAL", "for i = ARGV[1], ARGV[2] do redis.call('SET', 'filler:' .. i, i) end",
               0, start, start + 4_999)
    try:
        r.call("SHUTDOWN", "SAVE")
    except resp.ConnectionLost:
        pass  # it closes the connection as it exits
    r.close()
    server.proc.wait(10)
    server.proc = subprocess.Popen(
        [server.exe, os.path.join(server.dir, "redis.conf"), "--key-load-delay", str(key_delay_us),
         "--loading-process-events-interval-bytes", "1024"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_pmap_across_a_restart_that_loads_its_data_waits_for_it_and_workers_live_on(
        make_cluster):
    """Workers and caller meet -LOADING for seconds after the restart: they wait it out like an
    outage (before, the reply killed every worker loop and failed the pmap)."""
    cluster = make_cluster(2)
    got, loading_seen = [], []
    for value in pyworker.imap(lambda x: (time.sleep(0.2), x * 3)[1], range(16), chunksize=1,
                               timeout=90, progress=False, client=cluster.client):
        got.append(value)
        if len(got) == 3:
            _restart_loading_slowly(cluster)
            loading_seen.append(_answers_with(cluster.redis, "LOADING"))
    assert loading_seen == [True]
    assert got == [x * 3 for x in range(16)], "every item once, in order"
    assert all(p.poll() is None for p in cluster.workers), "a worker died"
    assert any("LOADING" in log for log in _worker_logs(cluster)), "no worker met LOADING"
    assert pyworker.pmap(abs, range(-5, 0), client=cluster.client, timeout=60) == [5, 4, 3, 2, 1]


def test_a_pmap_while_a_script_keeps_redis_busy_waits_for_it_and_workers_live_on(make_cluster):
    """Another client's Lua script runs for 2 s, over busy-reply-threshold: meanwhile every
    command of workers and caller gets -BUSY, which they wait out."""
    from pyworker import connection as resp
    cluster = make_cluster(2)
    server = cluster.redis
    r = cluster.client.broker.redis
    r.call("CONFIG", "SET", "busy-reply-threshold", 100)
    busy = threading.Thread(target=lambda: resp.Redis(server.url, password=server.password).call(
        "EVAL", "local t = redis.call('TIME') "
                "repeat local n = redis.call('TIME') until (n[1] - t[1]) * 1e6 + n[2] - t[2] > 2e6",
        0), daemon=True)
    got, busy_seen = [], []
    for value in pyworker.imap(lambda x: (time.sleep(0.1), -x)[1], range(30), chunksize=1,
                               timeout=90, progress=False, client=cluster.client):
        got.append(value)
        if len(got) == 3:
            busy.start()
            busy_seen.append(_answers_with(server, "BUSY"))
    busy.join(10)
    assert busy_seen == [True]
    assert got == [-x for x in range(30)]
    assert all(p.poll() is None for p in cluster.workers), "a worker died"
    assert any("BUSY" in log for log in _worker_logs(cluster)), "no worker met BUSY"


def test_a_full_redis_fails_pmap_in_one_line_naming_maxmemory_and_workers_live_on(
        make_cluster):
    cluster = make_cluster(2)
    r = cluster.client.broker.redis
    assert pyworker.pmap(abs, [-1, -2], client=cluster.client) == [1, 2]
    r.call("CONFIG", "SET", "maxmemory", 1)  # noeviction, the default: writes are refused
    try:
        # the workers' beats are refused too, and said so in one line
        wait_until(lambda: all("raise maxmemory" in log for log in _worker_logs(cluster)), 20,
                   "every worker to meet the refusal")
        with pytest.raises(pyworker.RedisError, match="OOM.*raise maxmemory") as info:
            pyworker.pmap(lambda x: x + 1, range(10), client=cluster.client, timeout=60)
        assert "\n" not in str(info.value)
        assert all(p.poll() is None for p in cluster.workers), "a worker died"
    finally:
        r.call("CONFIG", "SET", "maxmemory", 0)
    assert pyworker.pmap(lambda x: x + 2, range(10), client=cluster.client,
                         timeout=60) == list(range(2, 12))
    assert all(p.poll() is None for p in cluster.workers), "a worker died"


def test_a_read_only_replica_is_waited_out_and_misconf_names_the_setting(redis_server, tmp_path):
    """READONLY (a replica: a failover under way) is a retryable ConnectionError, which callers
    and workers wait out; MISCONF (Redis cannot save) a RedisError naming what to change."""
    from pyworker.config import Settings
    from pyworker.local import RedisServer
    from pyworker.queue import Broker
    os.makedirs(tmp_path / "replica")
    other = RedisServer(workdir=str(tmp_path / "replica")).start()
    broker = Broker(Settings(redis_url=other.url, redis_password=other.password, secret="test-secret-16-bytes"))
    try:
        broker.redis.call("CONFIG", "SET", "masterauth", redis_server.password)
        broker.redis.call("REPLICAOF", "127.0.0.1", redis_server.port)
        with pytest.raises(pyworker.ConnectionError, match="read-only replica") as info:
            broker.register_worker("w1", {"pid": "1"})
        assert info.value.retryable
        broker.redis.call("REPLICAOF", "NO", "ONE")
        broker.register_worker("w1", {"pid": "1"})  # a primary again: written
        # MISCONF: saving is configured, and the last save failed (its directory is gone)
        broker.redis.call("CONFIG", "SET", "save", "3600 1")
        shutil.rmtree(other.dir)
        broker.redis.call("BGSAVE")
        wait_until(lambda: b"rdb_last_bgsave_status:err" in broker.redis.call(
            "INFO", "persistence"), 10, "the background save to fail")
        with pytest.raises(pyworker.RedisError, match="MISCONF.*stop-writes-on-bgsave-error"):
            broker.register_worker("w2", {"pid": "1"})
    finally:
        broker.close()
        other.stop()


def test_a_reply_that_waiting_cannot_fix_never_ends_a_worker_loop(make_cluster):
    """Another program's value where pyworker keeps its idle stack: every idle worker's look
    for a task gets -WRONGTYPE. Each logs one line naming the cause and carries on."""
    cluster = make_cluster(2)
    r = cluster.client.broker.redis
    r.call("SET", cluster.client.broker.keys.idle, "not a list")
    try:
        wait_until(lambda: all("WRONGTYPE" in log and "PYWORKER_PREFIX" in log
                               for log in _worker_logs(cluster)), 20,
                   "every worker to meet the WRONGTYPE reply")
        assert all(p.poll() is None for p in cluster.workers), "a worker died"
    finally:
        r.call("DEL", cluster.client.broker.keys.idle)
    assert pyworker.pmap(abs, range(-5, 0), client=cluster.client, timeout=60) == [5, 4, 3, 2, 1]
    assert all(p.poll() is None for p in cluster.workers), "a worker died"


def test_a_submit_with_big_payloads_creates_the_job_with_its_fields_and_not_a_gone_one(
        redis_server):
    """The payloads go to the job's payload hash only: not into the job's own hash in place
    of its fields (a second copy of every big chunk), and a submit to a job that is gone does
    not bring it back."""
    from pyworker.config import Settings
    from pyworker.queue import JOB_GONE, Broker
    broker = Broker(Settings(redis_url=redis_server.url, redis_password=redis_server.password,
                             secret="test-secret-16-bytes"))
    try:
        broker.submit("job1", [b"t"], 0, meta={"created": "1", "caller": "here"},
                      payloads={0: b"p" * 1000})
        assert sorted(broker.redis.call("HKEYS", broker.keys.job("job1"))) == [b"caller",
                                                                              b"created"]
        assert broker.redis.call("HGET", broker.keys.payloads("job1"), 0) == b"p" * 1000
        broker.end_job("job1")
        assert broker.submit("job1", [b"t"], 0, payloads={1: b"q"}) == JOB_GONE
        assert broker.redis.call("EXISTS", broker.keys.job("job1")) == 0
    finally:
        broker.close()


def _calls(broker, command):
    info = broker.redis.call("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_the_reaper_looks_only_at_the_workers_due(redis_server):
    """A reap does not look at every registered worker (O(W) per reaper, O(W^2) in all): a
    newly registered worker is due at once and gets the time its lease ends; after that, a
    reap finds none due, and the one worker whose lease ended is reaped alone -- its task
    re-queued and its death counted."""
    broker = _broker(redis_server)
    try:
        ids = [f"w{i}" for i in range(200)]
        for wid in ids:
            broker.register_worker(wid, {"pid": "1"})
        assert broker.reap() == []
        pttl = _calls(broker, "pttl")
        assert broker.reap() == [], "nothing due"
        assert _calls(broker, "pttl") == pttl, "a reap with nothing due looks at no lease"
        # w7 runs a task and dies: its lease ends
        task = b"job1 0 fn 3.11 3 i -\n" + b"x" * 40
        broker.submit("job1", [task], 0, meta={"created": "1"})
        assert broker.dequeue("w7") == task
        broker.redis.call("DEL", broker.keys.heartbeat("w7"))
        broker.redis.call("ZADD", broker.keys.leases, 0, "w7")  # (its lease's end was due)
        assert broker.reap() == ["w7"]
        # its lease looked at, and its job's TTL (for the re-queued task): no other lease
        assert _calls(broker, "pttl") == pttl + 2, "the due worker alone was looked at"
        assert broker.redis.call("LRANGE", broker.keys.queue("job1"), 0, -1) == [task]
        assert broker.redis.call("HGET", broker.keys.attempts("job1"), "0") == b"1"
        assert broker.redis.call("SISMEMBER", broker.keys.workers, "w7") == 0
        assert broker.redis.call("ZSCORE", broker.keys.leases, "w7") is None
        assert broker.redis.call("ZCARD", broker.keys.leases) == 199
    finally:
        broker.close()


def test_one_worker_at_a_time_reaps(redis_server):
    broker = _broker(redis_server)
    try:
        broker.register_worker("a", {"pid": "1"})
        broker.register_worker("b", {"pid": "2"})
        assert broker.try_reap("a") == (2, [])
        assert broker.try_reap("b") is None, "a reaped within lease/2: b does not"
        assert 0 < broker.redis.call("PTTL", broker.keys.reaper) <= broker._lease_ms // 2
    finally:
        broker.close()


def test_a_beat_renews_a_lease_and_never_creates_one(redis_server):
    """Only a full registration creates a lease (and so puts the worker into the reaper's
    index): a beat of a worker whose lease ended says so and leaves no half registration."""
    broker = _broker(redis_server)
    try:
        broker.register_worker("a", {"pid": "1", "started": "1"})
        assert broker.renew_lease("a") is True
        assert broker.keep("a", ["job1 0"]) == (["job1 0"], False)  # (job1 does not exist)
        broker.reap(force_name="a")
        broker.redis.call("DEL", broker.keys.heartbeat("a"))
        assert broker.renew_lease("a") is False
        assert broker.keep("a") == ([], True)
        broker.heartbeat("a", 3, 3)  # the executor's beat
        assert broker.redis.call("EXISTS", broker.keys.heartbeat("a"), broker.keys.info("a")) == 0
        assert broker.redis.call("SISMEMBER", broker.keys.workers, "a") == 0
    finally:
        broker.close()


def test_worker_ids_are_unique_per_start():
    from pyworker import protocol
    a, b = protocol.worker_id("host-1"), protocol.worker_id("host-1")
    assert a != b and a.startswith("host-1.") and protocol.check_name("worker id", a) == a
