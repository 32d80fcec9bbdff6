"""Workers that survive user code: a task that exits, crashes, holds the GIL, leaks or hangs
fails its own item, and the same worker processes go on to run the next call correctly."""
import os
import signal
import threading
import time

import pytest

import pyworker
from pyworker import WorkerLostError
from pyworker.errors import TaskExitError, TaskTimeoutError

from support import wait_until


def _alive(cluster):
    return [p.poll() is None for p in cluster.workers]


def _executors(cluster) -> set[int]:
    """The executor pids the workers registered (status info 'executor')."""
    return {int(w["executor"]) for w in pyworker.status(cluster.client).alive if w.get("executor")}


def _pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_exit_crash_and_odd_exceptions_fail_their_item_and_no_worker(make_cluster, capsys):
    def _bad(x):
        import ctypes
        import os
        import sys
        if x == 1:
            sys.exit(3)
        if x == 2:
            os._exit(7)
        if x == 3:
            ctypes.string_at(0)  # SIGSEGV
        if x == 4:
            class Weird(Exception):
                def __str__(self):
                    raise RuntimeError("no str for you")
            raise Weird()
        if x == 5:
            sys.stdout.write(b"raw bytes\xff\n")
            sys.stdout.buffer.write(b"more bytes\n")
        if x == 6:
            raise KeyboardInterrupt("from the task")
        if x == 7:
            os.chdir("/")
            import signal
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return x * 10

    cluster = make_cluster(2, max_retries=1)
    supervisors = [p.pid for p in cluster.workers]
    out = pyworker.pmap(_bad, range(12), return_exceptions=True, client=cluster.client,
                        timeout=60)
    assert [out[i] for i in (0, 5, 7, 8, 9, 10, 11)] == [0, 50, 70, 80, 90, 100, 110]
    assert isinstance(out[1], TaskExitError) and "item #1 (1) raised SystemExit(3)" in str(out[1])
    assert isinstance(out[6], TaskExitError) and "KeyboardInterrupt" in str(out[6])
    assert isinstance(out[2], WorkerLostError)
    assert "item #2 (2) killed the executor" in str(out[2]) and "exited with code 7" in str(out[2])
    assert isinstance(out[3], WorkerLostError) and "SIGSEGV" in str(out[3])
    assert "Weird" in type(out[4]).__name__ or "Weird" in str(out[4])
    assert "raw bytes" in capsys.readouterr().out
    # the same worker processes, alive, and the next calls are correct
    assert [p.pid for p in cluster.workers] == supervisors and all(_alive(cluster))
    assert pyworker.pmap(abs, range(-20, 0), client=cluster.client, timeout=20) == \
        list(range(20, 0, -1))
    # what item 7 changed in its executor does not reach the next task
    cwds = pyworker.pmap(lambda _: os.getcwd(), range(8), chunksize=1, client=cluster.client,
                         timeout=20)
    assert set(cwds) == {os.getcwd()}
    assert len(pyworker.status(cluster.client).alive) == 2


def test_a_poisoned_item_uses_no_neighbours_retries(make_cluster):
    """One chunk of 8 items, one of which kills its executor every time: only that item
    fails; the others in its chunk come back."""
    cluster = make_cluster(1, max_retries=2)

    def poison(x):
        import os
        if x == 5:
            os._exit(1)
        return -x

    out = pyworker.pmap(poison, range(8), chunksize=8, return_exceptions=True,
                        client=cluster.client, timeout=60)
    assert [v for i, v in enumerate(out) if i != 5] == [0, -1, -2, -3, -4, -6, -7]
    assert isinstance(out[5], WorkerLostError) and "3 times" in str(out[5])
    with pytest.raises(WorkerLostError, match=r"item #5 \(5\) killed the executor"):
        pyworker.pmap(poison, range(8), chunksize=8, client=cluster.client, timeout=60)
    assert all(_alive(cluster))


def test_a_task_holding_the_gil_past_the_lease_runs_once(make_cluster, tmp_path):
    """libc's sleep called through PyDLL keeps the GIL for 5 s; the lease is 2 s. The lease
    is renewed by the supervisor, another process: nobody declares the worker dead, the task
    runs once and returns its value."""
    cluster = make_cluster(2, lease_s=2.0, max_retries=1)
    folder = str(tmp_path)

    def hold(x):
        import ctypes
        import os
        open(os.path.join(folder, f"run-{x}-{os.getpid()}"), "w").close()
        ctypes.PyDLL(None).sleep(5)
        return x + 1

    assert pyworker.pmap(hold, [41], client=cluster.client, timeout=60) == [42]
    assert len(os.listdir(folder)) == 1, os.listdir(folder)
    assert all(_alive(cluster)) and len(pyworker.status(cluster.client).alive) == 2


def test_cancelling_stops_running_tasks(make_cluster, tmp_path):
    """A call that times out stops what its workers were running (three 40 s sleeps), and
    the next call does not wait behind them."""
    cluster = make_cluster(3)
    folder = str(tmp_path)

    def nap(x):
        import os
        import time
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(40)
        return x

    with pytest.raises(TimeoutError):
        pyworker.pmap(nap, range(3), chunksize=1, client=cluster.client, timeout=2)
    pids = [int(p) for p in os.listdir(folder)]
    assert pids
    wait_until(lambda: all(_pid_gone(p) for p in pids), 5, "the cancelled tasks to stop")
    assert pyworker.pmap(lambda x: x * 2, range(6), chunksize=1, client=cluster.client,
                         timeout=10) == [0, 2, 4, 6, 8, 10]
    assert all(_alive(cluster))


def test_leaving_an_imap_loop_stops_its_running_tasks(make_cluster, tmp_path):
    cluster = make_cluster(2)
    folder = str(tmp_path)

    def nap(x):
        import os
        import time
        if x:
            open(os.path.join(folder, str(os.getpid())), "w").close()
            time.sleep(40)
        return x

    for value in pyworker.imap(nap, range(3), chunksize=1, client=cluster.client):
        assert value == 0
        wait_until(lambda: len(os.listdir(folder)) == 2, 10, "both workers in a long task")
        break
    pids = [int(p) for p in os.listdir(folder)]
    wait_until(lambda: all(_pid_gone(p) for p in pids), 5, "the abandoned tasks to stop")
    assert pyworker.pmap(abs, [-1, -2], client=cluster.client, timeout=10) == [1, 2]


def test_task_timeout_stops_the_item_and_names_it(make_cluster):
    cluster = make_cluster(2)

    def nap(s):
        import time
        time.sleep(s)
        return s

    started = time.monotonic()
    out = pyworker.pmap(nap, [0.1, 30, 0.2, 0.1], chunksize=4, task_timeout=1,
                        return_exceptions=True, client=cluster.client, timeout=30)
    assert time.monotonic() - started < 15
    assert out[0] == 0.1 and out[2:] == [0.2, 0.1]
    assert isinstance(out[1], TaskTimeoutError) and isinstance(out[1], TimeoutError)
    assert "item #1 (30) ran longer than its task_timeout of 1 s" in str(out[1])
    with pytest.raises(ValueError, match="task_timeout"):
        pyworker.pmap(nap, [1], task_timeout=0, client=cluster.client)
    assert all(_alive(cluster))


def test_executor_is_replaced_after_max_tasks_per_child(make_cluster):
    cluster = make_cluster(1, worker_env={"PYWORKER_MAX_TASKS_PER_CHILD": "2"})
    pids = pyworker.pmap(lambda _: os.getpid(), range(6), chunksize=1, client=cluster.client,
                         timeout=30)
    assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3], pids
    assert cluster.workers[0].pid not in pids and all(_alive(cluster))


def test_executor_that_grew_past_max_memory_is_replaced_between_tasks(make_cluster):
    cluster = make_cluster(1, worker_env={"PYWORKER_MAX_MEMORY_MB": "200"})

    def grow(mb):
        import os
        import sys
        keep = sys.modules.setdefault("_leak", type(sys)("_leak"))
        keep.__dict__.setdefault("blocks", []).append(bytearray(mb * 2**20))
        return os.getpid()

    first = pyworker.pmap(grow, [1], client=cluster.client, timeout=30)[0]
    assert pyworker.pmap(grow, [1], client=cluster.client, timeout=30)[0] == first
    leaked = pyworker.pmap(grow, [300], client=cluster.client, timeout=30)[0]
    assert leaked == first  # the task that went past the limit ran to its end
    after = pyworker.pmap(grow, [1], client=cluster.client, timeout=30)[0]
    assert after != first, "the executor past its memory limit was not replaced"
    assert all(_alive(cluster))


def test_status_shows_each_workers_executor(make_cluster):
    cluster = make_cluster(2)
    execs = wait_until(lambda: len(_executors(cluster)) == 2 and _executors(cluster), 10,
                       "both workers to say which executor they run")
    assert not execs & {p.pid for p in cluster.workers}
    pids = set(pyworker.pmap(lambda _: os.getpid(), range(20), chunksize=1,
                             client=cluster.client, timeout=30))
    assert pids <= execs
    for pid in execs:  # ps and top tell an executor from its supervisor
        assert open(f"/proc/{pid}/comm").read().strip() == "pyworker-exec"
    for proc in cluster.workers:
        assert open(f"/proc/{proc.pid}/comm").read().strip() != "pyworker-exec"


def test_sigterm_mid_task_finishes_it_and_the_worker_leaves(make_cluster, tmp_path):
    cluster = make_cluster(1)
    folder = str(tmp_path)

    def slow(x):
        import os
        import time
        open(os.path.join(folder, "started"), "w").close()
        time.sleep(1.0)
        return x

    box = {}
    t = threading.Thread(target=lambda: box.update(r=pyworker.pmap(
        slow, [7], client=cluster.client, timeout=30)), daemon=True)
    t.start()
    wait_until(lambda: os.path.exists(os.path.join(folder, "started")), 10, "the task")
    cluster.workers[0].send_signal(signal.SIGTERM)
    assert cluster.workers[0].wait(15) == 0
    t.join(20)
    assert box.get("r") == [7]


def test_a_pmap_inside_a_task_runs_there_and_never_deadlocks(make_cluster, capsys):
    """Both workers run a task that itself calls pmap (as library code may): sent to the
    same two workers it would wait for ever; it runs in the task instead, and says so."""
    cluster = make_cluster(2)

    def outer(x):
        import os
        import pyworker
        inner = pyworker.pmap(lambda y: (y * y, os.getpid()), range(x))
        assert {pid for _, pid in inner} <= {os.getpid()}
        with pyworker.Executor() as ex:
            assert ex.submit(abs, -x).result() == x
        return [v for v, _ in inner]

    assert pyworker.pmap(outer, [3, 4], chunksize=1, client=cluster.client, timeout=30) == \
        [[0, 1, 4], [0, 1, 4, 9]]
    assert "inside a task runs in that task" in capsys.readouterr().out


def test_future_cancel_stops_a_running_call_and_no_other(make_cluster, tmp_path):
    cluster = make_cluster(2)
    folder = str(tmp_path)

    def nap(s, name):
        import os
        import time
        open(os.path.join(folder, f"{name}-{os.getpid()}"), "w").close()
        time.sleep(s)
        return name

    with pyworker.Executor(client=cluster.client) as ex:
        long = ex.submit(nap, 40, "long")
        short = ex.submit(nap, 2, "short")
        wait_until(lambda: len(os.listdir(folder)) == 2, 20, "both calls to run")
        pid = int(next(n for n in os.listdir(folder) if n.startswith("long-")).split("-")[1])
        assert long.cancel() is True and long.cancelled()
        wait_until(lambda: _pid_gone(pid), 5, "the cancelled call to stop on its worker")
        assert short.result(timeout=20) == "short"
        assert ex.submit(abs, -3).result(timeout=20) == 3
    assert all(_alive(cluster))


def test_executor_shutdown_cancel_futures_stops_running_calls(make_cluster, tmp_path):
    cluster = make_cluster(2)
    folder = str(tmp_path)

    def nap(s):
        import os
        import time
        open(os.path.join(folder, str(os.getpid())), "w").close()
        time.sleep(s)

    ex = pyworker.Executor(client=cluster.client)
    futures = [ex.submit(nap, 40) for _ in range(4)]
    wait_until(lambda: len(os.listdir(folder)) == 2, 20, "two calls to run")
    pids = [int(n) for n in os.listdir(folder)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    wait_until(lambda: all(_pid_gone(p) for p in pids), 5, "the running calls to stop")
    assert pyworker.pmap(abs, [-1, -2], client=cluster.client, timeout=20) == [1, 2]
    assert all(_alive(cluster))


def test_two_workers_with_the_same_name_are_two_workers(make_cluster, tmp_path):
    """Two workers that report the same name (two --network host containers: same host name,
    both pid 1) register under ids of their own: the second one's start takes nothing of the
    first's, both run the job, status() shows the name, and killing one re-queues its tasks
    alone."""
    from support import executors
    cluster = make_cluster(0, replace_workers=False)
    r, keys = cluster.client.broker.redis, cluster.client.broker.keys
    log = tmp_path / "runs"

    def slow(x):
        import os
        import time
        with open(log, "a") as f:
            f.write(f"{x} {os.getpid()}\n")
        time.sleep(2.0)
        return x

    first = cluster.add_worker(name="twin")
    cluster.wait_for_workers(1)
    t, box = _run(pyworker.pmap, slow, range(6), chunksize=1, client=cluster.client, timeout=120)
    ids = lambda: sorted(n.decode() for n in r.call("SMEMBERS", keys.workers))  # noqa: E731
    (a,) = ids()
    wait_until(lambda: r.call("HLEN", keys.active(a)) >= 1, 20, "the first twin to run a task")
    held_by_a = set(_fields(r.call("HKEYS", keys.active(a))))
    second = cluster.add_worker(name="twin")
    cluster.wait_for_workers(2)
    (b,) = [i for i in ids() if i != a]
    assert a.startswith("twin.") and b.startswith("twin."), (a, b)
    assert sorted(w["name"] for w in pyworker.status(cluster.client).alive) == ["twin", "twin"]
    assert held_by_a <= set(_fields(r.call("HKEYS", keys.active(a)))), \
        "the second twin's start took nothing from the first"
    wait_until(lambda: r.call("HLEN", keys.active(b)) >= 1, 20, "the second twin to run a task")
    pids = executors(cluster)
    b_pid = next(pid for pid, (wid, _) in pids.items() if wid == b)
    a_pid = next(pid for pid, (wid, _) in pids.items() if wid == a)
    second.kill()  # (its executor dies with it)
    second.wait(10)
    t.join(120)
    assert "error" not in box, box.get("error")
    assert box["result"] == list(range(6)), "the job completed on the first twin"
    runs = [line.split() for line in log.read_text().splitlines()]
    ran_on = {}
    for x, pid in runs:
        ran_on.setdefault(int(x), []).append(int(pid))
    assert {pid for x in ran_on for pid in ran_on[x]} <= {a_pid, b_pid}, runs
    assert any(b_pid in p for p in ran_on.values()), "both twins ran tasks"
    again = {x for x, p in ran_on.items() if len(p) > 1}
    assert all(ran_on[x][0] == b_pid for x in again), \
        f"only the killed twin's tasks ran again: {ran_on}"
    assert all(len(p) == 1 for p in ran_on.values() if p[0] == a_pid), ran_on
    assert first.poll() is None, "the first twin still runs"
    assert b not in ids(), "the killed twin was reaped"


def _fields(raw):
    return [f.decode() for f in raw]


def _run(fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def test_a_stopping_worker_wakes_its_idle_executor(make_cluster):
    """An idle executor waits in Redis for long (up to worker.IDLE_WAIT_MAX_S; here 20 s from
    the start); SIGTERM to its worker still stops it at once: the supervisor wakes it."""
    cluster = make_cluster(1, worker_env={"PYWORKER_IDLE_WAIT_S": "20"})
    r = cluster.client.broker.redis
    proc = cluster.workers[0]

    def blocked():
        clients = r.call("CLIENT", "LIST").decode()
        return "cmd=blpop" in clients

    wait_until(blocked, 20, "the executor to wait in BLPOP")
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - t < 5, "it stopped without waiting out its 20 s wait"
