"""A job with no live worker waits for workers to start (as an autoscaler starts them on queued
work), says so, and is bounded by its timeout: real Redis, a worker started late."""
import threading

import pytest

from pyworker import Executor, pmap

from support import wait_until


def _queued(cluster) -> int:
    return cluster.client.broker.metrics()["queued"]


def test_pmap_waits_for_a_worker_started_late(make_cluster, capsys):
    cluster = make_cluster(0)
    box = {}

    def run():
        try:
            box["out"] = pmap(lambda x: x * x, range(30), timeout=120, progress=True)
        except BaseException as exc:  # reported below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Sized for workers yet to come, not for one: every item its own task, all queued at once
    # (an autoscaler sees 30 tasks and starts up to 30 workers, each of which gets work).
    wait_until(lambda: _queued(cluster) == 30, 30, "the job's 30 tasks queued")
    seen = []
    wait_until(lambda: seen.append(capsys.readouterr().err) or
               "pmap (waiting for workers to start)" in "".join(seen), 30,
               "the progress bar saying it waits for workers")
    text = "".join(seen)
    assert "no worker is live" in text and "waits for workers to start" in text
    assert "up to timeout=120 s" in text
    assert thread.is_alive() and "error" not in box  # no warn-and-give-up
    cluster.add_worker()
    thread.join(90)
    assert not thread.is_alive(), "pmap did not finish once a worker started"
    assert "error" not in box, box.get("error")
    assert box["out"] == [x * x for x in range(30)]


def test_pmap_with_no_worker_is_bounded_by_its_timeout(make_cluster):
    make_cluster(0)
    with pytest.raises(TimeoutError, match=r"0 of 3 items done; the job was cancelled: no worker "
                                           r"was live .* meanwhile"):
        pmap(lambda x: x, range(3), timeout=2)


def test_executor_waits_for_a_worker_started_late(make_cluster, capsys):
    cluster = make_cluster(0)
    with Executor() as ex:
        future = ex.submit(pow, 2, 10)
        assert "waits for workers to start" in capsys.readouterr().err
        wait_until(lambda: _queued(cluster) == 1, 30, "the call queued")
        assert not future.done()
        cluster.add_worker()
        assert future.result(timeout=90) == 1024


def test_window_widens_when_workers_come(make_cluster, tmp_path):
    """A job that started on 1 worker gets the workers that start later busy too (an
    autoscaler, pyworker.scale): its window of tasks in Redis grows with them, even while no
    result comes (every task held at a gate)."""
    cluster = make_cluster(1)
    gate = tmp_path / "go"

    def held(x, gate=str(gate)):
        import os
        import time
        end = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < end:
            time.sleep(0.01)
        return x

    box = {}
    thread = threading.Thread(target=lambda: box.update(out=pmap(held, range(400), chunksize=1,
                                                                 timeout=120)), daemon=True)
    thread.start()
    metrics = cluster.client.broker.metrics
    wait_until(lambda: metrics()["busy"] == 1, 30, "the worker busy")
    first = metrics()
    assert first["queued"] + first["running"] == 9  # the window for 1 worker: max(4 x 1, 8) + 1
    for _ in range(3):
        cluster.add_worker()
    seen = []
    wait_until(lambda: seen.append(metrics()) or seen[-1]["queued"] + seen[-1]["running"] == 17,
               30, f"the window widened to 17 tasks for 4 workers (saw {seen[-1:]})")
    wait_until(lambda: metrics()["busy"] == 4, 30, "4 workers busy")
    gate.touch()
    thread.join(90)
    assert box.get("out") == list(range(400))
