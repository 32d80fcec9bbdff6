"""The caller's side of a job when Redis loses it: restarted without persistence, flushed, or its
keys evicted. pmap/imap resubmit what had not come back; an Executor fails its pending futures
with a clear error. And worker groups (Client.for_group, group= of pmap/imap/Executor/Pool):
tasks go only to their group's workers. Real redis-server, real workers."""
import time

import pytest
from support import wait_until

import pyworker
from pyworker import JobLostError


def restart_empty(cluster):
    """Stop redis-server and start a new, empty one on the same port with the same password."""
    server = cluster.redis
    server.proc.terminate()
    server.proc.wait(10)
    server.start()


# A lambda, not a def: the workers cannot import this test module, so the function must travel
# by value.
slow_square = lambda x: (time.sleep(0.2), x * x)[1]  # noqa: E731


def test_imap_resubmits_what_redis_lost(make_cluster, capsys):
    cluster = make_cluster(2)
    got = []
    for value in pyworker.imap(slow_square, range(30), chunksize=1, timeout=90, progress=False,
                               client=cluster.client):
        got.append(value)
        if len(got) == 5:
            restart_empty(cluster)  # the job's queue, leases and results vanish with it
    assert got == [x * x for x in range(30)], "every item exactly once, in order"
    err = capsys.readouterr().err
    assert "lost job" in err and "resubmitting" in err, err


def test_pmap_after_flushall_completes(make_cluster, capsys):
    cluster = make_cluster(2)
    r = cluster.client.broker.redis
    got = []
    for value in pyworker.imap(slow_square, range(20), chunksize=2, timeout=90, progress=False,
                               client=cluster.client):
        got.append(value)
        if len(got) == 4:
            r.call("FLUSHALL")
    assert got == [x * x for x in range(20)]
    assert "lost job" in capsys.readouterr().err


def test_executor_fails_pending_futures_when_redis_loses_the_job(make_cluster):
    cluster = make_cluster(1)
    with pyworker.Executor(client=cluster.client) as ex:
        first = ex.submit(slow_square, 3)
        assert first.result(timeout=30) == 9
        pending = [ex.submit(time.sleep, 5) for _ in range(3)]
        cluster.client.broker.redis.call("FLUSHALL")
        for f in pending:
            with pytest.raises(JobLostError, match="lost"):
                f.result(timeout=30)
        # The executor is still usable: the next submit starts a new job.
        assert ex.submit(slow_square, 4).result(timeout=30) == 16
        results = ex.map(time.sleep, [0, 0, 5, 5], chunksize=2)  # so are maps, alike
        assert next(results) is None
        cluster.client.broker.redis.call("FLUSHALL")
        with pytest.raises(JobLostError, match="items #2-3 of a map was lost"):
            list(results)


def test_a_result_whose_answer_is_lost_is_found_again(make_cluster):
    """The connection drops after Redis handed the caller a result and before the caller
    read it: the result stays in Redis until acknowledged, so the caller finds it there after
    reconnecting (before, the job waited for it for ever). Shared-memory results too."""
    import dataclasses

    from support import ReplyDroppingProxy
    # One worker and tasks slower than the caller: each answer brings one result (a take
    # brings along those already in, which would make fewer answers to drop).
    cluster = make_cluster(1)
    proxy = ReplyDroppingProxy(cluster.redis.port, b":r\r\n", drop={2, 4},
                               answer_marker=b" ok ")
    client = pyworker.Client(dataclasses.replace(
        cluster.settings(), redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    try:
        big = lambda x: (time.sleep(0.05), bytes([x]) * (300_000 if x % 2 else 10))[1]  # noqa: E731
        out = pyworker.pmap(big, range(8), chunksize=1, client=client, timeout=60)
        assert out == [big(x) for x in range(8)]
        assert proxy.dropped == 2, "two answers with a result in them were lost"
        # what was taken left Redis with the job (deleted with the client's next round trip;
        # the next job's own result is the one left)
        assert pyworker.pmap(abs, [-1], client=client, timeout=60) == [1]
        r = cluster.client.broker.redis
        assert [r.call("LLEN", k) for k in r.call("KEYS", "pyw:job:*:rt")] == [1]
    finally:
        client.close()
        proxy.close()


def test_results_taken_together_in_an_answer_that_is_lost_are_found_again(make_cluster):
    """A take brings every result that is in already (up to a limit); if that answer is
    lost, the caller finds all of them again after reconnecting, each exactly once."""
    import dataclasses
    import os

    from support import ReplyDroppingProxy, wait_until
    cluster = make_cluster(2)
    proxy = ReplyDroppingProxy(cluster.redis.port, b":r\r\n", drop={1}, answer_marker=b" ok ")
    client = pyworker.Client(dataclasses.replace(
        cluster.settings(), redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    try:
        job = client.job()
        sha = job.add_function(lambda x: (x, os.getpid()))
        chunks = job.submit(0, sha, [(i, [i]) for i in range(4)])  # no wait: no take in it
        r, keys = cluster.client.broker.redis, cluster.client.broker.keys
        wait_until(lambda: r.call("LLEN", keys.results(job.jid)) == 4, 20, "all four results")
        got = []
        for left in range(3, -1, -1):
            result = job.next_result(time.monotonic() + 20, more=left)
            assert result is not None, f"results missing after {got}"
            got.append((result.chunk, result.values[0][0]))
        job.close()
        assert proxy.dropped == 1, "the answer with the four results was lost"
        assert proxy.seen == 1, "one take brought all four (the rest came from the taken list)"
        assert sorted(got) == [(c, i) for c, i in zip(chunks, range(4))], got
    finally:
        client.close()
        proxy.close()


def test_a_submit_whose_answer_is_lost_is_sent_again(make_cluster, tmp_path, capsys):
    """The connection drops after Redis queued a batch (and handed the caller its first
    result) and before the caller read the answer: the caller sends the batch again instead of
    failing, and finds the result it had taken."""
    import dataclasses

    from support import ReplyDroppingProxy
    cluster = make_cluster(2)
    broker = cluster.client.broker
    proxy = ReplyDroppingProxy(cluster.redis.port, broker._submit.sha.encode(), drop={1},
                               answer_marker=b" ok ")
    client = pyworker.Client(dataclasses.replace(
        cluster.settings(), redis_url=f"redis://127.0.0.1:{proxy.port}/0"))
    try:
        out = pyworker.pmap(abs, range(-6, 0), chunksize=1, client=client, timeout=60)
        assert out == [6, 5, 4, 3, 2, 1]
        assert proxy.dropped == 1, "the answer to a submit, with a result in it, was lost"
        assert "sending again" in capsys.readouterr().err
    finally:
        client.close()
        proxy.close()


def test_a_big_result_whose_payload_answer_is_lost_is_read_again(make_cluster):
    """Without shared memory a big result's payload travels apart, in a hash; the connection
    drops while it comes back: the payload is still in Redis and read again (before, it was
    deleted in the same step, and the call failed)."""
    import dataclasses

    from support import ReplyDroppingProxy
    cluster = make_cluster(2)
    proxy = ReplyDroppingProxy(cluster.redis.port, b":rp\r\n", drop={1},
                               answer_marker=b"Z" * 64)
    client = pyworker.Client(dataclasses.replace(
        cluster.settings(), redis_url=f"redis://127.0.0.1:{proxy.port}/0",
        shared_memory=False))
    try:
        big = lambda x: b"Z" * 300_000 + bytes([x])  # noqa: E731
        out = pyworker.pmap(big, range(4), chunksize=1, client=client, timeout=60)
        assert out == [big(x) for x in range(4)]
        assert proxy.dropped == 1, "the answer with a result's payload was lost"
        # the payloads leave Redis with the client's next round trip, like the finished job
        assert pyworker.pmap(abs, [-1], client=client, timeout=60) == [1]
        assert not cluster.client.broker.redis.call("KEYS", "pyw:job:*:rp")
    finally:
        client.close()
        proxy.close()


def test_a_function_redis_lost_between_two_calls_is_uploaded_again(make_cluster):
    """FLUSHALL between two pmaps of the same function, and a new worker (whose cache does not
    have it): the second pmap's submit finds the function missing, uploads it and submits
    again, in the same call. A third call, with the function there, sends no blob."""
    from support import redis_bytes_in
    cluster = make_cluster(1)
    big = list(range(20_000))  # captured: the function's blob is big enough to see in traffic
    fn = lambda x: x + len(big)  # noqa: E731
    assert pyworker.pmap(fn, range(5), client=cluster.client) == [x + 20_000 for x in range(5)]
    cluster.client.broker.redis.call("FLUSHALL")
    old = cluster.workers[0]
    old.terminate()
    old.wait(10)
    cluster.add_worker()
    cluster.wait_for_workers(1)
    assert pyworker.pmap(fn, range(5), client=cluster.client,
                         timeout=60) == [x + 20_000 for x in range(5)]
    before = redis_bytes_in(cluster)
    assert pyworker.pmap(fn, range(5), client=cluster.client,
                         timeout=60) == [x + 20_000 for x in range(5)]
    assert redis_bytes_in(cluster) - before < 20_000, "the function was sent again"


def test_results_that_are_not_this_jobs_are_dropped_and_the_real_one_awaited(cluster, tmp_path,
                                                                            caplog):
    """Messages forged or moved by someone with Redis access but not the key: another job's
    signed result, a signature made for another kind of message, unsigned control replies
    ('lost', 'rejected', 'mismatch', 'resend') all claiming the chunk. Each is dropped with a
    warning, none fails the item or reaches the user, and the worker's real result counts."""
    import os
    from pyworker import protocol, serialize
    gate = str(tmp_path / "go")

    def wait_for_gate(x):
        import os
        import time
        end = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.01)
        return x * 10

    client = cluster.client
    signer = serialize.Signer(cluster.secret)
    job = client.job()
    (chunk,) = job.submit(protocol.MODE_ONE, job.add_function(wait_for_gate), [(0, [4])])
    body = serialize.dumps_data(([999], {}, {}))
    ok = protocol.result_header(chunk, protocol.STATUS_OK, "worker-0", protocol.INLINE)
    forged = [
        signer.seal(protocol.mac_context(protocol.KIND_RESULT, "another-job"), ok, body),
        signer.seal(protocol.mac_context(protocol.KIND_OUTPUT, job.jid), ok, body),
        signer.seal(protocol.mac_context(protocol.KIND_TASK), ok, body),
        protocol.result_header(chunk, protocol.STATUS_LOST, "worker-0", "3"),
        protocol.result_header(chunk, protocol.STATUS_REJECTED, "worker-0", "run evil.sh"),
        protocol.result_header(chunk, protocol.STATUS_MISMATCH, "worker-0", "run evil.sh"),
        protocol.result_header(chunk, protocol.STATUS_RESEND, "worker-0", "run evil.sh"),
    ]
    client.broker.redis.call("RPUSH", client.broker.keys.results(job.jid), *forged)
    try:
        with caplog.at_level("WARNING", logger="pyworker"):
            assert job.next_result(time.monotonic() + 3) is None, "a forged result was taken"
        dropped = [r for r in caplog.records if "dropped a" in r.getMessage()]
        assert len(dropped) == len(forged), [r.getMessage() for r in caplog.records]
        assert "Nothing of it was unpickled" in dropped[0].getMessage()
        open(gate, "w").close()
        result = job.next_result(time.monotonic() + 30)
        assert result is not None and result.status == "ok" and result.values == [40]
    finally:
        if not os.path.exists(gate):
            open(gate, "w").close()
        job.close()


# --- worker groups --------------------------------------------------------------------------------

def _group_of(_):
    import os
    return os.environ.get("PYWORKER_GROUP", "default"), os.getpid()


def test_group_tasks_run_only_on_that_groups_workers(make_cluster):
    cluster = make_cluster(2)  # two workers of the default group
    for _ in range(2):
        cluster.add_worker(env={"PYWORKER_GROUP": "gpu"})
    c = cluster.client
    wait_until(lambda: c.for_group("gpu").live_workers(max_age_s=0) == 2, 30, "2 gpu workers")
    on_gpu = pyworker.pmap(_group_of, range(40), chunksize=1, timeout=60, progress=False,
                           client=c, group="gpu")
    assert {g for g, _ in on_gpu} == {"gpu"}
    assert len({pid for _, pid in on_gpu}) >= 1
    plain = pyworker.pmap(_group_of, range(40), chunksize=1, timeout=60, progress=False, client=c)
    assert {g for g, _ in plain} == {"default"}, "the default group's tasks stay on its workers"
    with pyworker.Executor(client=c, group="gpu") as ex:
        assert ex.submit(_group_of, 0).result(timeout=60)[0] == "gpu"
    with pyworker.Pool(client=c, group="gpu") as pool:
        assert {g for g, _ in pool.map(_group_of, range(6))} == {"gpu"}
    assert {g for g, _ in pyworker.imap_unordered(_group_of, range(6), timeout=60, progress=False,
                                                  client=c, group="gpu")} == {"gpu"}
    # status() shows every group and which worker is in which
    st = pyworker.status(c)
    assert st.groups == ["default", "gpu"]
    assert sorted(w.get("group") for w in st.alive) == ["default", "default", "gpu", "gpu"]
    assert "gpu: 2" in str(st) and "default: 2" in str(st)


def test_a_group_without_workers_waits_for_one_to_start(make_cluster):
    import threading
    cluster = make_cluster(1)
    c = cluster.client
    out = {}

    def call():
        out["values"] = pyworker.pmap(_group_of, range(8), chunksize=1, timeout=120,
                                      progress=False, client=c, group="late")
    t = threading.Thread(target=call, daemon=True)
    t.start()
    # The job is queued in its group while no worker of the group is alive ...
    late = c.for_group("late")
    wait_until(lambda: late.broker.snapshot()["jobs"], 30, "the late group's job to be queued")
    assert "values" not in out
    # ... and the default group's worker does not take it.
    assert pyworker.pmap(_group_of, [1], timeout=60, progress=False, client=c)[0][0] == "default"
    cluster.add_worker(env={"PYWORKER_GROUP": "late"})
    t.join(90)
    assert not t.is_alive(), "the job ends once a worker of its group started"
    assert [g for g, _ in out["values"]] == ["late"] * 8


def test_group_names_are_checked(make_cluster):
    from pyworker.config import Settings
    with pytest.raises(pyworker.ConfigurationError, match="not a worker group name"):
        Settings.from_env({"PYWORKER_GROUP": "GPU nodes"})
    cluster = make_cluster(0)
    with pytest.raises(ValueError, match="not a worker group name"):
        pyworker.pmap(_group_of, [1], client=cluster.client, group="Big_GPU")
    assert cluster.client.for_group("default") is cluster.client
    assert cluster.client.for_group("gpu") is cluster.client.for_group("gpu")
