"""The worker's guarantees, with real worker processes that get killed, stopped and lied to."""
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

import pyworker
from pyworker import WorkerLostError, protocol, serialize
from pyworker.errors import SignatureError, VersionMismatchError

from support import executors, redis_keys, shm_cluster, shm_files, wait_until


def _run_in_thread(fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _busy_workers(cluster):
    return [w for w in pyworker.status(cluster.client).alive if w.get("current")]


def _exited(pid) -> bool:
    """Whether a process has exited (gone, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _marking(tmp_path):
    """A task that leaves one file per run, so a test can count how often each item ran."""
    folder = str(tmp_path)

    def task(x):
        import os
        import time
        open(os.path.join(folder, f"{x}-{os.getpid()}-{time.monotonic_ns()}"), "w").close()
        time.sleep(0.4)
        return x * 10

    return task


def test_killed_worker_task_runs_again_elsewhere_nothing_lost_or_duplicated(make_cluster, tmp_path):
    cluster = make_cluster(3)
    task = _marking(tmp_path)
    t, box = _run_in_thread(pyworker.pmap, task, range(12), chunksize=1, client=cluster.client)
    # A worker is "current" from the moment it takes a task; kill one that is inside the task.
    first = wait_until(lambda: os.listdir(tmp_path), 20, "a worker to start running a task")[0]
    victim = int(first.split("-")[1])
    os.kill(victim, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "pmap did not finish after a worker was killed"
    assert "error" not in box, box.get("error")
    assert box["result"] == [x * 10 for x in range(12)]
    runs = [name.split("-") for name in os.listdir(tmp_path)]
    assert {int(x) for x, _, _ in runs} == set(range(12))
    rerun = [x for x, pid, _ in runs if int(pid) == victim]
    assert rerun, "the killed worker had started a task"
    assert sum(1 for x, _, _ in runs if x == rerun[-1]) >= 2, "the lost task ran again"


def test_killed_worker_shared_memory_task_runs_again_and_no_segment_is_left(make_cluster,
                                                                            tmp_path):
    import numpy as np
    folder = tmp_path / "shm"
    cluster, client = shm_cluster(make_cluster, folder, n=3)
    marks = tmp_path / "marks"
    marks.mkdir()
    mark = _marking(marks)
    arrays = [np.full(2**17, i, dtype=np.float64) for i in range(6)]  # 1 MiB each

    def task(a):
        return mark(int(a[0])) + a  # 10 * i + a

    t, box = _run_in_thread(pyworker.pmap, task, arrays, chunksize=1, client=client)
    first = wait_until(lambda: os.listdir(marks), 20, "a worker to start running a task")[0]
    assert [n for n in shm_files(folder) if ".t." in n], "the arrays went through shared memory"
    item, victim, _ = first.split("-")
    os.kill(int(victim), signal.SIGKILL)  # in the middle of item's task
    t.join(60)
    assert not t.is_alive(), "pmap did not finish after a worker was killed"
    assert "error" not in box, box.get("error")
    assert [float(o[0]) for o in box["result"]] == [11.0 * i for i in range(6)]
    runs = [name.split("-")[0] for name in os.listdir(marks)]
    assert runs.count(item) >= 2, "the killed worker's task ran again, from its segment"
    assert shm_files(folder) == []


def test_task_whose_workers_keep_dying_fails_naming_the_item(make_cluster):
    """The whole worker dies (its supervisor, the task's parent, is killed), not only the
    executor (tests/test_supervisor.py has those): its lease ends, and the task runs again
    elsewhere until it has cost more workers than the retry limit allows."""
    cluster = make_cluster(3, max_retries=1)

    def deadly(x):
        import os
        import signal
        if x == 3:
            os.kill(os.getppid(), signal.SIGKILL)
            os._exit(1)
        return x

    with pytest.raises(WorkerLostError, match=r"item #3 \(3\) was lost: the worker running it "
                                              r"died 2 times"):
        pyworker.pmap(deadly, range(6), chunksize=1, client=cluster.client)


def test_sigterm_finishes_the_current_task_then_exits_and_leaves_the_rest(make_cluster):
    cluster = make_cluster(2)
    t, box = _run_in_thread(pyworker.pmap, lambda x: (time.sleep(0.8), os.getpid())[1],
                            range(8), chunksize=1, client=cluster.client)
    busy = wait_until(lambda: _busy_workers(cluster), 20, "a worker to start a task")
    victim = next(p for p in cluster.workers if p.pid == int(busy[0]["pid"]))
    execs = {proc: pid for pid, (_, proc) in executors(cluster).items()}
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(10) == 0
    t.join(60)
    assert "error" not in box, box.get("error")
    pids = box["result"]
    assert len(pids) == 8
    assert pids.count(execs[victim]) >= 1, "the task it was running came back"
    assert pids.count(execs[victim]) <= 2  # it took nothing new after SIGTERM
    survivor = next(pid for proc, pid in execs.items() if proc is not victim)
    assert pids.count(survivor) >= 6


def test_a_stalled_worker_cannot_add_a_second_result(make_cluster):
    cluster = make_cluster(2)
    t, box = _run_in_thread(pyworker.pmap, lambda x: (time.sleep(0.3), x)[1], range(6),
                            chunksize=1, client=cluster.client)
    busy = wait_until(lambda: _busy_workers(cluster), 20, "a worker to start a task")
    victim = int(busy[0]["pid"])
    os.kill(victim, signal.SIGSTOP)  # past its lease: its task is re-run by the other worker
    try:
        t.join(60)
    finally:
        os.kill(victim, signal.SIGCONT)
    assert box.get("result") == list(range(6))


def test_a_task_longer_than_the_lease_keeps_its_worker_alive(make_cluster, tmp_path):
    """The supervisor renews the lease while the executor runs a 4 s task (pure Python):
    nobody reaps the worker during it, and each task runs once."""
    cluster = make_cluster(2)
    folder = str(tmp_path)

    def spin(x):
        import os
        import time
        open(os.path.join(folder, f"{x}-{os.getpid()}"), "w").close()
        end, n = time.monotonic() + 4.0, 0
        while time.monotonic() < end:
            n += 1
        return os.getpid()

    pids = pyworker.pmap(spin, range(2), chunksize=1, client=cluster.client, timeout=60)
    assert sorted(pids) == sorted(executors(cluster)), "one task on each worker"
    runs = sorted(os.listdir(tmp_path))
    assert len(runs) == 2, f"a task ran again (its worker's lease ended?): {runs}"
    assert len(pyworker.status(cluster.client).alive) == 2


def _queue_raw_task(cluster, jid, header, body):
    b = cluster.client.broker
    b.redis.pipeline([("HSET", b.keys.job(jid), "created", "0"),
                      ("PEXPIRE", b.keys.job(jid), 30000)])
    return b.submit(jid, [header + body], 1)


TASK = protocol.mac_context(protocol.KIND_TASK)


def _evil_payload(canary):
    class Evil:
        def __reduce__(self):
            return (open, (str(canary), "w"))
    return pickle.dumps((protocol.MODE_ONE, [Evil()]))


def _header(jid, sha="0" * 32, **kw):
    return protocol.task_header(jid, 0, sha, serialize.PYTHON_VERSION,
                                serialize.CLOUDPICKLE_VERSION, **kw)


def _log(cluster, i=0):
    return open(os.path.join(cluster.redis.dir, f"worker-{i}.log")).read()


def test_a_task_it_cannot_verify_is_given_back_without_unpickling(make_cluster, tmp_path):
    """Signed with another key: the worker neither runs nor fails it (the job's caller may
    have the right key and other workers too): it goes back to the queue, the worker says
    why, and takes no more of that job's tasks."""
    cluster = make_cluster(1)
    canary = tmp_path / "unpickled"
    payload = _evil_payload(canary)
    jid = "evil00000001"
    header = _header(jid, alive=int(time.time()) + 60)
    wrong = serialize.Signer("not-the-secret-16")
    task = header + wrong.sign(TASK, header, payload) + payload
    _queue_raw_task(cluster, jid, header, task[len(header):])
    b = cluster.client.broker
    wait_until(lambda: b.redis.call("SISMEMBER", b.keys.refused(jid), b"worker-0") == 1 or
               any(b.redis.call("SMEMBERS", b.keys.refused(jid))), 20, "the worker's refusal")
    assert b.redis.call("LRANGE", b.keys.queue(jid), 0, -1) == [task], "given back as it was"
    assert b.redis.call("LLEN", b.keys.results(jid)) == 0
    assert not canary.exists(), "the worker unpickled an unsigned message"
    assert "cannot verify the tasks of job evil00000001: signing key differs" in _log(cluster)
    st = pyworker.status(cluster.client)
    assert "signing key differs" in str(st)
    # It takes no more of them: the task is still queued a while later, and the worker is
    # still alive and runs other jobs' tasks.
    assert pyworker.pmap(abs, [-1, -2], client=cluster.client, timeout=30) == [1, 2]
    assert b.redis.call("LLEN", b.keys.queue(jid)) == 1


def test_a_worker_with_another_key_does_not_fail_everyones_jobs(make_cluster):
    cluster = make_cluster(2)
    cluster.add_worker(name="odd-one", env={"PYWORKER_SECRET": "another-secret-of-16"})
    cluster.wait_for_workers(3)
    got = pyworker.pmap(lambda x: x * 2, range(60), chunksize=1, client=cluster.client,
                        timeout=60)
    assert got == [x * 2 for x in range(60)]
    log = _log(cluster, 2)
    assert "signing key differs" in log, "the odd worker was given a task and refused it"
    odd = [w for w in pyworker.status(cluster.client).workers if w["name"] == "odd-one"]
    assert odd and odd[0].get("refused"), "status() shows which worker refused"
    assert "signing key differs" in str(pyworker.status(cluster.client))


def test_an_old_task_of_a_job_that_is_not_alive_is_not_run(make_cluster, tmp_path):
    """A signed task put back into Redis after its time (a replay) runs only if its job's
    signed 'alive' record, which the caller's keep-alive renews, says the job lives."""
    cluster = make_cluster(1)
    canary = tmp_path / "ran"
    signer = serialize.Signer(cluster.secret)
    b = cluster.client.broker

    def touch(path):
        open(path, "w").close()
        return 1

    sha = serialize.function_sha(serialize.dumps_function(touch))
    b.redis.call("SET", b.keys.fn(sha), signer.seal_blob(serialize.dumps_function(touch)))
    payload = pickle.dumps((protocol.MODE_ONE, [str(canary)]))
    jid = "old000000001"
    header = _header(jid, sha, alive=int(time.time()) - 3600)
    _queue_raw_task(cluster, jid, header, signer.sign(TASK, header, payload) + payload)
    wait_until(lambda: "the job is not alive" in _log(cluster), 20, "the worker's refusal")
    assert not canary.exists() and b.redis.call("LLEN", b.keys.results(jid)) == 0
    # A forged record (no valid signature) does not help; the caller's own does.
    until = int(time.time()) + 60
    b.redis.call("HSET", b.keys.job(jid), "alive", protocol.alive_record(until, "00" * 32))
    header2 = protocol.task_header(jid, 1, sha, serialize.PYTHON_VERSION,
                                   serialize.CLOUDPICKLE_VERSION, alive=int(time.time()) - 3600)
    b.submit(jid, [header2 + signer.sign(TASK, header2, payload) + payload], 1)
    wait_until(lambda: _log(cluster).count("the job is not alive") >= 2, 20, "a 2nd refusal")
    assert not canary.exists()
    b.redis.call("HSET", b.keys.job(jid), "alive",
                 protocol.alive_record(until, signer.alive_mac(jid, until)))
    header3 = protocol.task_header(jid, 2, sha, serialize.PYTHON_VERSION,
                                   serialize.CLOUDPICKLE_VERSION, alive=int(time.time()) - 3600)
    b.submit(jid, [header3 + signer.sign(TASK, header3, payload) + payload], 1)
    wait_until(canary.exists, 20, "the task of a job that is alive to run")


def test_a_signed_function_under_another_functions_name_is_refused(make_cluster, tmp_path):
    cluster = make_cluster(1)
    canary = tmp_path / "swapped"
    signer = serialize.Signer(cluster.secret)
    b = cluster.client.broker

    def swapped(x):
        open(canary, "w").close()

    real_sha = serialize.function_sha(serialize.dumps_function(abs))
    b.redis.call("SET", b.keys.fn(real_sha), signer.seal_blob(serialize.dumps_function(swapped)))
    payload = pickle.dumps((protocol.MODE_ONE, [-1]))
    jid = "swap00000001"
    header = _header(jid, real_sha, alive=int(time.time()) + 60)
    _queue_raw_task(cluster, jid, header, signer.sign(TASK, header, payload) + payload)
    (reply,) = wait_until(lambda: b.pop_results(jid, 0.5), 20, "the worker's rejection")
    assert b" rejected " in reply and b"is another function" in reply
    ctx = protocol.mac_context(protocol.KIND_RESULT, jid)
    signer.open(ctx, reply)  # the rejection is signed, for this job
    assert not canary.exists(), "the swapped function ran"


def test_caller_with_another_secret_gets_a_clear_error(make_cluster):
    cluster = make_cluster(1)
    settings = cluster.settings()
    settings.secret = "a-different-secret"
    client = pyworker.Client(settings)
    try:
        with pytest.raises(SignatureError, match="same PYWORKER_SECRET"):
            pyworker.pmap(abs, [1, 2], client=client, timeout=20)
    finally:
        client.close()


def test_worker_refuses_other_python_or_cloudpickle_versions(cluster, monkeypatch):
    monkeypatch.setattr(serialize, "PYTHON_VERSION", "3.99")
    with pytest.raises(VersionMismatchError) as info:
        pyworker.pmap(abs, [1], timeout=20)
    text = str(info.value)
    real = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert "Python 3.99" in text and f"Python {real}" in text
    assert serialize.CLOUDPICKLE_VERSION in text


def test_a_task_header_with_fields_appended_by_a_later_version_still_runs(cluster,
                                                                          monkeypatch):
    from pyworker import client as client_module
    original = protocol.task_header
    monkeypatch.setattr(client_module.protocol, "task_header",
                        lambda *a, **k: original(*a, **k)[:-1] + b" a-later-field\n")
    assert pyworker.pmap(abs, [-1, -2], chunksize=1, timeout=20) == [1, 2]


def test_a_task_header_this_worker_cannot_read_fails_the_call_saying_why(cluster, monkeypatch):
    """A caller with another pyworker version whose header the worker cannot read gets an
    answer (it used to wait for ever: the worker dropped the task)."""
    from pyworker import client as client_module
    original = protocol.task_header
    monkeypatch.setattr(client_module.protocol, "task_header",
                        lambda *a, **k: b" ".join(original(*a, **k).split(b" ")[:5]) + b"\n")
    with pytest.raises(VersionMismatchError, match="same pyworker version"):
        pyworker.pmap(abs, [-1], timeout=20)


def test_worker_with_wrong_password_says_so_in_one_line(redis_server):
    env = {**os.environ, "PYWORKER_REDIS_URL": redis_server.url,
           "PYWORKER_REDIS_PASSWORD": "wrong", "PYWORKER_SECRET": "test-secret-16-bytes"}
    proc = subprocess.run([sys.executable, "-m", "pyworker", "worker"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "refused the password" in lines[0] and "PYWORKER_REDIS_PASSWORD" in lines[0]


def test_worker_survives_a_redis_restart(make_cluster):
    cluster = make_cluster(1)
    assert pyworker.pmap(abs, [-1], client=cluster.client) == [1]
    server = cluster.redis
    server.proc.terminate()
    server.proc.wait(10)
    server.start()  # same port, same password, empty data
    # The worker re-registers with its next heartbeat and serves the next job.
    wait_until(lambda: cluster.client.live_workers(max_age_s=0) == 1, 20,
               "the worker to come back after the restart")
    assert pyworker.pmap(abs, [-2, -3], client=cluster.client, timeout=30) == [2, 3]
    # ... and registers again in full (a beat alone brings back only its lease): status() has
    # its host again, and it takes hand-offs again (handoff=1: no token and dequeue).
    r, keys = cluster.client.broker.redis, cluster.client.broker.keys
    name = r.call("SMEMBERS", keys.workers)[0].decode()
    wait_until(lambda: r.call("HGET", keys.info(name), "handoff") == b"1", 20,
               "the worker's full registration")
    info = r.call("HGETALL", keys.info(name))
    info = dict(zip(info[::2], info[1::2]))
    assert info[b"pid"] == str(cluster.workers[0].pid).encode() and info[b"host"], info
    assert "registered again" in open(os.path.join(server.dir, "worker-0.log")).read()


def test_function_travels_once_per_job_not_per_item(cluster):
    big = os.urandom(8 * 2**20)
    r = cluster.client.broker.redis

    def net_in():
        info = r.call("INFO", "stats").decode()
        return int(info.split("total_net_input_bytes:")[1].split()[0])

    before = net_in()
    assert pyworker.pmap(lambda x: len(big) + x, range(40), chunksize=1) == [
        len(big) + x for x in range(40)]
    sent = net_in() - before
    assert sent < 3 * len(big), f"{sent / 2**20:.0f} MiB sent for an 8 MiB closure"


def test_worker_started_before_redis_waits_for_it(tmp_path):
    """Pods start in any order: a worker whose Redis is not up yet retries instead of exiting."""
    from pyworker.local import RedisServer, free_port

    server = RedisServer(port=free_port())
    env = {**os.environ, "PYWORKER_REDIS_URL": server.url, "PYWORKER_REDIS_PASSWORD": server.password,
           "PYWORKER_SECRET": "test-secret-16-bytes", "PYWORKER_RECONNECT_S": "60"}
    log = open(tmp_path / "worker.log", "w+")
    worker = subprocess.Popen([sys.executable, "-m", "pyworker", "worker"], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "retrying" in (tmp_path / "worker.log").read_text(), 20,
                   "the worker to report that Redis is not up yet")
        assert worker.poll() is None, "the worker gave up instead of waiting for Redis"
        server.start()
        client = pyworker.Client(pyworker.Settings.from_env(
            environ={}, redis_url=server.url, redis_password=server.password, secret="test-secret-16-bytes"))
        try:
            assert pyworker.pmap(abs, [-5], client=client, timeout=30) == [5]
        finally:
            client.close()
    finally:
        worker.terminate()
        worker.wait(10)
        server.stop()


def test_status_counts_every_finished_item_within_a_heartbeat(make_cluster):
    # Workers count finished items with a result at most once a second, and the rest with their
    # next heartbeat: 60 one-item tasks in well under a second must all be counted anyway.
    cluster = make_cluster(1)
    assert pyworker.pmap(abs, range(60), chunksize=1, client=cluster.client) == list(range(60))

    def counted():
        st = pyworker.status(cluster.client)
        return int(st.alive[0]["done"]) == 60 and round(st.items_per_s * 60) == 60

    wait_until(counted, 5, "status() to count the 60 items")
    assert not _busy_workers(cluster), "an idle worker shows no current task"


def _held_counts(cluster, stop):
    """Sample how many tasks each worker holds (its active hash) until stop is set."""
    r, keys = cluster.client.broker.redis, cluster.client.broker.keys
    seen = []
    while not stop.is_set():
        names = [n.decode() for n in r.call("SMEMBERS", keys.workers)]
        seen.append(max([r.call("HLEN", keys.active(n)) for n in names] or [0]))
        time.sleep(0.01)
    return seen


def _pmap_sampling_held(cluster, fn, items):
    """pmap(fn, items) one item a chunk, and the most tasks any worker held meanwhile."""
    stop = threading.Event()
    t, box = _run_in_thread(_held_counts, cluster, stop)
    try:
        out = pyworker.pmap(fn, items, chunksize=1, client=cluster.client, timeout=60)
    finally:
        stop.set()
        t.join(10)
    return out, max(box["result"])


def test_a_worker_holds_the_next_quick_task_while_it_runs_one_and_no_more(make_cluster):
    cluster = make_cluster(1)
    out, held = _pmap_sampling_held(cluster, lambda x: (time.sleep(0.1), x)[1], range(10))
    assert out == list(range(10))
    assert held == 2, "it held the next task while running one, never more"


def test_a_worker_holds_nothing_ahead_of_a_slow_task(make_cluster):
    cluster = make_cluster(1)
    out, held = _pmap_sampling_held(cluster, lambda x: (time.sleep(1.1), x)[1], range(3))
    assert out == list(range(3)) and held == 1


def test_near_a_jobs_end_no_worker_holds_a_task_another_could_run(make_cluster):
    cluster = make_cluster(2)
    pids = pyworker.pmap(lambda x: (time.sleep(0.4), os.getpid())[1], range(4), chunksize=1,
                         client=cluster.client, timeout=60)
    assert sorted(pids.count(p) for p in set(pids)) == [2, 2], pids


def test_sigterm_gives_back_the_task_held_ahead_without_counting_a_death(make_cluster):
    cluster = make_cluster(1)
    r, keys = cluster.client.broker.redis, cluster.client.broker.keys
    t, box = _run_in_thread(pyworker.pmap, lambda x: (time.sleep(0.3), x, os.getpid())[1:],
                            range(8), chunksize=1, client=cluster.client)
    victim = cluster.workers[0]
    name = wait_until(lambda: [n.decode() for n in r.call("SMEMBERS", keys.workers)], 20,
                      "the worker to register")[0]
    wait_until(lambda: r.call("HLEN", keys.active(name)) == 2, 20,
               "the worker to hold a task ahead")
    victim.send_signal(signal.SIGTERM)
    assert victim.wait(10) == 0
    assert r.call("HLEN", keys.active(name)) == 0, "what it held went back to the queue"
    assert not redis_keys(cluster, "pyw:job:*:n"), "a worker that stops is no death"
    cluster.add_worker()
    t.join(60)
    assert "error" not in box, box.get("error")
    assert [x for x, _ in box["result"]] == list(range(8))
    assert {pid for _, pid in box["result"]} - {victim.pid}, "the rest ran on the new worker"


def test_the_most_recently_idle_worker_runs_the_next_call(make_cluster):
    """Sequential one-item calls go to the worker that has just run one (warm), not round the
    workers in turn."""
    cluster = make_cluster(3)
    pids = [pyworker.pmap(lambda x: os.getpid(), [i], client=cluster.client, timeout=30)[0]
            for i in range(20)]
    assert max(pids.count(p) for p in set(pids)) >= 15, pids


def test_an_idle_worker_that_died_delays_a_task_but_loses_nothing(make_cluster):
    """A task handed to an idle worker that has died (its lease still runs) waits in that
    worker's active hash, like a task it was running, until the lease ends: the reaper then
    re-queues it for another worker, and leaves nothing of the dead one to wake."""
    cluster = make_cluster(2, lease_s=3.0, replace_workers=False)
    r, keys = cluster.client.broker.redis, cluster.client.broker.keys
    # both executors up and idle (each joins the idle stack when it first looks for work)
    wait_until(lambda: r.call("LLEN", keys.idle) == 2, 10, "both workers to be idle")
    victim = pyworker.pmap(lambda x: os.getpid(), [0], client=cluster.client, timeout=30)[0]
    name, proc = executors(cluster)[victim]
    wait_until(lambda: r.call("LINDEX", keys.idle, 0) == name.encode(), 10,
               "the worker to go idle, on top of the stack")
    proc.kill()  # its lease still runs: the next task is handed to it (its executor dies too)
    proc.wait(10)
    wait_until(lambda: _exited(victim), 10, "its executor to die with it")  # (sockets closed)
    job = cluster.client.job()
    sha = job.add_function(lambda x: (x, os.getpid()))
    job.submit(0, sha, [(0, [7])])
    assert r.call("HLEN", keys.active(name)) == 1, "the task went to the dead worker"
    assert r.call("LLEN", keys.worker_wake(name)) == 1
    result = job.next_result(time.monotonic() + 20)
    job.close()
    assert result is not None and result.values[0][0] == 7 and result.values[0][1] != victim, \
        "the other worker ran it once the dead worker's lease ended"
    assert name not in cluster.client.broker.reap() and name.encode() not in \
        r.call("SMEMBERS", keys.workers), "the reaper unregistered the dead worker"
    assert name.encode() not in r.call("LRANGE", keys.idle, 0, -1)
    assert r.call("EXISTS", keys.worker_wake(name), keys.active(name)) == 0


def test_a_finish_whose_answer_is_lost_loses_and_repeats_nothing(make_cluster, tmp_path):
    """The connection drops after Redis ran a worker's finish and before its answer arrived:
    the result counts (its shared-memory segment too), what the finish took still runs, and
    nothing runs twice."""
    from support import ReplyDroppingProxy
    cluster = make_cluster(0)
    broker = cluster.client.broker
    sha = broker.redis.call("SCRIPT", "LOAD", broker._finish.source)  # every EVALSHA runs
    # the 1st finish waits for its answer; the 3rd is read after the task held ahead
    proxy = ReplyDroppingProxy(cluster.redis.port, sha, drop={1, 3})
    try:
        cluster.add_worker(env={"PYWORKER_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"})
        cluster.wait_for_workers(1)
        log = tmp_path / "ran.txt"

        def task(x):
            with open(log, "a") as f:
                f.write(f"{x}\n")
            return bytes([x]) * (300_000 if x % 2 else 10)  # odd items: shared memory

        out = pyworker.pmap(task, range(8), chunksize=1, client=cluster.client, timeout=60)
        assert out == [bytes([x]) * (300_000 if x % 2 else 10) for x in range(8)]
        assert proxy.dropped == 2, "the answers of two finishes were lost"
        assert sorted(int(x) for x in log.read_text().split()) == list(range(8)), \
            "every item ran exactly once"
    finally:
        proxy.close()


@pytest.mark.parametrize("way", ["handed", "dequeued"])
def test_a_task_whose_answer_is_lost_strands_nothing(make_cluster, tmp_path, way):
    """The connection drops after Redis gave a task to a worker and before the worker read
    it: handed over by the submit (the answer to the worker's BLPOP), or taken by the worker's
    dequeue after a token. The task is the worker's in Redis, so the worker must find it there
    and run it (no other worker ever would: its owner is alive), and only once (a handed task
    also waits in its wake list)."""
    from support import ReplyDroppingProxy
    cluster = make_cluster(0)
    broker = cluster.client.broker
    log = tmp_path / "ran.txt"

    def task(x):
        with open(log, "a") as f:
            f.write(f"{x}\n")
        return -x

    fn_sha = cluster.client.function_blob(task)[0].encode()
    marker = b"BLPOP" if way == "handed" else broker.redis.call(
        "SCRIPT", "LOAD", broker._dequeue.source)
    proxy = ReplyDroppingProxy(cluster.redis.port, marker, drop={1}, answer_marker=fn_sha)
    try:
        cluster.add_worker(env={"PYWORKER_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"})
        cluster.wait_for_workers(1)
        name = broker.redis.call("SMEMBERS", broker.keys.workers)[0]
        wait_until(lambda: broker.redis.call("LINDEX", broker.keys.idle, 0) == name, 10,
                   "the worker to go idle")
        if way == "dequeued":  # off the idle stack: the submit leaves a common token instead
            broker.redis.call("LREM", broker.keys.idle, 0, name)
        out = pyworker.pmap(task, range(6), chunksize=1, client=cluster.client, timeout=60)
        assert out == [-x for x in range(6)]
        assert proxy.dropped == 1, f"the answer that gave a task ({way}) was lost"
        assert sorted(int(x) for x in log.read_text().split()) == list(range(6)), \
            "every item ran exactly once"
        # a single dropped connection is retried at once, not after the outage pause
        worker_log = open(os.path.join(cluster.redis.dir, "worker-0.log")).read()
        assert "retrying at once" in worker_log, worker_log
        assert "retrying in 1 s" not in worker_log, worker_log
        assert broker.redis.call("EXISTS", broker.keys.worker_wake(name.decode())) == 0
    finally:
        proxy.close()


def _limited_client(cluster, mb, **kw):
    import dataclasses
    return pyworker.Client(dataclasses.replace(cluster.settings(), max_message_mb=mb, **kw))


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "redis"])
def test_a_result_over_the_message_limit_fails_its_item_on_every_transport(make_cluster,
                                                                          shared_memory):
    cluster = make_cluster(1, worker_env={"PYWORKER_MAX_MESSAGE_MB": "1"})
    client = _limited_client(cluster, 1, shared_memory=shared_memory)
    try:
        out = pyworker.pmap(lambda x: bytes(3 * 2**20) if x == 1 else x, range(4),
                            chunksize=4, return_exceptions=True, client=client, timeout=30)
    finally:
        client.close()
    assert out[0] == 0 and out[2:] == [2, 3]
    assert isinstance(out[1], pyworker.SerializationError)
    assert "item #1 (1) returned a result of 3.0 MiB pickled, over the limit of 1 MiB " \
           "(PYWORKER_MAX_MESSAGE_MB)" in str(out[1])
    assert all(p.poll() is None for p in cluster.workers)


def test_results_too_big_together_come_back_in_parts_and_none_is_lost(make_cluster):
    """20 results of 300 KiB in one chunk, under a 1 MiB limit: the worker stops the chunk
    when its results would pass the limit and sends what it has; the caller sends the rest
    again. Every value comes back, in order, and no item fails."""
    cluster = make_cluster(1, worker_env={"PYWORKER_MAX_MESSAGE_MB": "1"})
    client = _limited_client(cluster, 1)
    try:
        out = pyworker.pmap(lambda x: bytes([x]) * (300 * 1024), range(20), chunksize=20,
                            client=client, timeout=60)
    finally:
        client.close()
    assert [(len(v), v[0]) for v in out] == [(300 * 1024, x) for x in range(20)]


def test_what_a_task_prints_reaches_the_caller_while_it_runs(make_cluster, tmp_path, capsys):
    """The task prints, logs a warning, then waits at a gate that the test opens only once
    the caller has shown that print: it arrives while the task runs, before its result, and
    in order with what the task prints later."""
    cluster = make_cluster(1)
    gate = str(tmp_path / "gate")

    def task(x):
        import logging
        import os
        import time
        print("started", x)
        logging.getLogger("usercode").warning("a warning from %s", x)
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("finished", x)
        return x

    t, box = _run_in_thread(pyworker.pmap, task, [7], client=cluster.client, timeout=90)
    seen = []

    def shown():
        seen.append(capsys.readouterr().out)
        return "started 7" in "".join(seen)

    try:
        wait_until(shown, 20, "the task's first print, in the caller, while the task runs")
        assert t.is_alive()
    finally:
        open(gate, "w").close()
    t.join(60)
    out = "".join(seen) + capsys.readouterr().out
    assert box.get("result") == [7], box
    assert "WARNING:usercode:a warning from 7" in out
    assert out.index("started 7") < out.index("finished 7"), out


def test_what_a_task_prints_is_capped(make_cluster, capsys):
    cluster = make_cluster(1)
    assert pyworker.pmap(lambda x: print("y" * (3 << 20)) or x, [1], client=cluster.client,
                         timeout=60) == [1]
    out = capsys.readouterr().out
    assert "bytes dropped (a task prints at most 1048576 bytes)" in out
    assert out.count("y") <= (1 << 20) + 100


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shared-memory", "redis"])
def test_a_300_mb_result_fails_its_item_under_the_default_limit(make_cluster, shared_memory):
    """The issue's case as users meet it: the default limit (256 MiB) on both sides."""
    import dataclasses
    cluster = make_cluster(1)
    client = pyworker.Client(dataclasses.replace(cluster.settings(),
                                                 shared_memory=shared_memory))
    try:
        out = pyworker.pmap(lambda x: bytes(300 * 2**20) if x == 1 else x, [0, 1, 2],
                            chunksize=3, return_exceptions=True, client=client, timeout=120)
        assert out[0] == 0 and out[2] == 2
        assert isinstance(out[1], pyworker.SerializationError), out[1]
        assert "item #1 (1) returned a result of 300.0 MiB pickled, over the limit of 256 MiB" \
            in str(out[1])
        assert pyworker.pmap(abs, [-5], client=client, timeout=20) == [5]
    finally:
        client.close()
    assert all(p.poll() is None for p in cluster.workers)
