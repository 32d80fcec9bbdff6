"""The metrics exporter (`pyworker metrics`) against a real Redis and real workers: the numbers
while a job runs and after it, /scale, and 503 when Redis is gone."""
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from pyworker import Executor, protocol
from pyworker.local import free_port
from pyworker.metrics import Exporter, make_server

from support import wait_until


def _wait_for_file(path, fail=False, limit=60.0):  # pickled by value: workers cannot import tests
    import os
    import time
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.01)
    if fail:
        raise ValueError("failed on purpose")
    return "released"


@pytest.fixture
def exporter_url(make_cluster):
    """A private cluster (its counters start at zero) and an exporter serving it."""
    cluster = make_cluster(2)
    exporter = Exporter(cluster.settings(), timeout_s=3.0)
    server = make_server(exporter, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield cluster, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    exporter.close()


def get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def scrape(base) -> dict:
    """/metrics parsed: 'name{labels}' -> value."""
    status, ctype, body = get(base + "/metrics")
    assert status == 200, body
    assert ctype.startswith("text/plain; version=0.0.4")
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


G = '{group="default"}'


def test_numbers_during_a_job_and_after(exporter_url, tmp_path):
    cluster, base = exporter_url
    gate = tmp_path / "go"
    before = scrape(base)
    assert before[f"pyworker_workers{G}"] == 2
    assert before[f"pyworker_tasks_queued{G}"] == 0 and before[f"pyworker_workers_busy{G}"] == 0
    assert before[f"pyworker_tasks_done_total{G}"] == 0
    with Executor() as ex:
        futures = [ex.submit(_wait_for_file, str(gate), fail=(i == 5)) for i in range(6)]
        # Both workers hold a gated task; the other four wait in the queue.
        m = wait_until(lambda: (lambda m: m[f"pyworker_workers_busy{G}"] == 2 and m)(scrape(base)),
                       30, "both workers busy")
        assert m[f"pyworker_tasks_running{G}"] >= 2
        assert m[f"pyworker_tasks_queued{G}"] >= 1
        assert m[f"pyworker_tasks_queued{G}"] + m[f"pyworker_tasks_running{G}"] == 6
        status, ctype, body = get(base + "/scale")
        assert status == 200 and ctype == "application/json"
        figures = json.loads(body)
        assert set(figures) == {"tasks", "queued", "running", "workers", "busy"}
        assert figures["tasks"] == 6 == figures["queued"] + figures["running"]
        assert figures["workers"] == 2 and figures["busy"] == 2
        gate.touch()
        results = [f.exception(timeout=60) or f.result() for f in futures]
    assert results[:5] == ["released"] * 5 and isinstance(results[5], ValueError)
    # The counters come with the workers' beats (within a heartbeat interval of the last task).
    m = wait_until(lambda: (lambda m: m[f"pyworker_tasks_done_total{G}"]
                            + m[f"pyworker_tasks_failed_total{G}"] == 6 and m)(scrape(base)),
                   15, "6 tasks counted")
    assert m[f"pyworker_tasks_done_total{G}"] == 5 and m[f"pyworker_tasks_failed_total{G}"] == 1
    assert m[f"pyworker_items_done_total{G}"] == 5 and m[f"pyworker_items_failed_total{G}"] == 1
    assert m[f"pyworker_tasks_queued{G}"] == 0 and m[f"pyworker_tasks_running{G}"] == 0
    assert m[f"pyworker_workers_busy{G}"] == 0
    # the histogram: 6 tasks, the two first held at the gate for a while
    assert m['pyworker_task_duration_seconds_count{group="default"}'] == 6
    assert m['pyworker_task_duration_seconds_bucket{group="default",le="+Inf"}'] == 6
    assert m['pyworker_task_duration_seconds_sum{group="default"}'] > 0
    buckets = [m[f'pyworker_task_duration_seconds_bucket{{group="default",le="{b:g}"}}']
               for b in protocol.TASK_SECONDS_BUCKETS]
    assert buckets == sorted(buckets), "cumulative buckets"
    assert json.loads(get(base + "/scale")[2]) == {"tasks": 0, "queued": 0, "running": 0,
                                                   "workers": 2, "busy": 0}


def test_redis_down_answers_503_at_once(exporter_url):
    cluster, base = exporter_url
    assert get(base + "/healthz")[0] == 200
    cluster.redis.stop()
    started = time.monotonic()
    status, _, body = get(base + "/metrics")
    assert status == 503 and "Redis" in body and "pyworker metrics:" in body, body
    status, ctype, body = get(base + "/scale")
    assert status == 503 and ctype == "application/json" and "Redis" in json.loads(body)["error"]
    assert time.monotonic() - started < 10
    assert get(base + "/healthz")[0] == 200  # the server itself is fine
    assert get(base + "/nothing")[0] == 404


def test_redis_that_never_answers_is_bounded(make_cluster):
    """A Redis that accepts connections and says nothing (a hung server): 503 within the
    exporter's timeout, not a scrape that hangs."""
    import socket
    cluster = make_cluster(0)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    settings = cluster.settings()
    settings.redis_url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    settings.connect_timeout_s = 1.0
    exporter = Exporter(settings, timeout_s=1.0)
    server = make_server(exporter, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        status, _, body = get(f"http://127.0.0.1:{server.server_address[1]}/scale", timeout=30)
        assert status == 503, body
        assert time.monotonic() - started < 8
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def test_cli_serves_without_the_signing_key(make_cluster):
    cluster = make_cluster(1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWORKER_")}
    env.update({k: v for k, v in cluster.env.items() if k != "PYWORKER_SECRET"})
    proc = subprocess.Popen([sys.executable, "-m", "pyworker", "metrics", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers():
            assert proc.poll() is None, proc.stderr.read()
            try:
                return get(base + "/scale", timeout=2)
            except OSError:
                return None
        status, _, body = wait_until(answers, 30, "the exporter to answer")
        assert status == 200 and json.loads(body)["workers"] == 1
    finally:
        proc.terminate()
        assert proc.wait(15) == 0  # SIGTERM: a clean stop


def test_cli_without_redis_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWORKER_")}
    proc = subprocess.run([sys.executable, "-m", "pyworker", "metrics", "--port", "0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "PYWORKER_REDIS_URL" in proc.stderr and "PYWORKER_SECRET" not in proc.stderr
