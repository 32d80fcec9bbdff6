"""Each backend: a context manager that starts N worker processes and yields a `map(fn, items)`.

Peers import their package inside the context manager, so a missing package is an ImportError
when the backend is entered (reported as "unavailable"), and the start-up figure includes the
import. Everything binds to 127.0.0.1; everything started here is stopped in a `finally`.
"""
import contextlib
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MAP_TIMEOUT_S = 300  # no single map in the workloads may take longer than this


def pool_chunksize(n_items, workers):
    """multiprocessing.Pool.map's default chunksize: about 4 chunks per worker."""
    chunksize, extra = divmod(n_items, workers * 4)
    return chunksize + 1 if extra else max(chunksize, 1)


@contextlib.contextmanager
def pyworker_local(workers):
    from pyworker import LocalCluster, pmap
    with LocalCluster(workers) as cluster:
        yield lambda fn, items: pmap(fn, items, progress=False, client=cluster.client)


@contextlib.contextmanager
def mp_pool(workers):
    pool = multiprocessing.get_context("fork").Pool(workers)
    try:
        yield pool.map
    finally:
        # Pool.terminate() joins its workers without a time limit, and here a worker sometimes
        # never got its SIGTERM (seen twice in a day: the run then hung until --timeout-s).
        import threading
        procs = list(pool._pool)
        timer = threading.Timer(10, lambda: [p.kill() for p in procs if p.exitcode is None])
        timer.start()
        try:
            pool.terminate()
        finally:
            timer.cancel()


@contextlib.contextmanager
def process_pool_executor(workers):
    from concurrent.futures import ProcessPoolExecutor
    # Executor.map defaults to chunksize=1 (one IPC round trip per item); we pass Pool.map's
    # default (len/(4*workers), rounded up) so both stdlib pools batch alike.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        def pmap(fn, items):
            items = list(items)
            return list(ex.map(fn, items, timeout=MAP_TIMEOUT_S,
                               chunksize=pool_chunksize(len(items), workers)))
        yield pmap


@contextlib.contextmanager
def process_pool_executor_default(workers):
    """ProcessPoolExecutor as most code calls it: `map(fn, items)`, its default chunksize of 1
    (the setting behind the core issue's reference figure for it)."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        yield lambda fn, items: list(ex.map(fn, items, timeout=MAP_TIMEOUT_S))


@contextlib.contextmanager
def joblib_loky(workers):
    from joblib import Parallel, delayed
    from joblib.externals.loky import get_reusable_executor
    try:
        # Entering Parallel keeps one set of loky workers for every call (batch_size="auto",
        # and joblib's default memmapping of arrays over 1 MB: joblib as people use it).
        with Parallel(n_jobs=workers, backend="loky", timeout=MAP_TIMEOUT_S) as parallel:
            yield lambda fn, items: parallel(delayed(fn)(x) for x in items)
    finally:
        get_reusable_executor(max_workers=workers).shutdown(wait=True, kill_workers=True)


@contextlib.contextmanager
def dask_distributed(workers):
    import warnings
    from dask.distributed import Client, LocalCluster
    warnings.filterwarnings("ignore", module="distributed")  # W4's "large graph" advice
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        def pmap(fn, items):
            # pure=False: every call is a new task (no result reuse between calls or repeats).
            futures = client.map(fn, list(items), pure=False)
            return client.gather(futures)
        yield pmap


@contextlib.contextmanager
def ray_local(workers):
    # Offline and loopback only: no usage-stats upload; on Linux Ray swaps 127.0.0.1 for the
    # routable address unless "cluster mode" is off, and then binds every server to 127.0.0.1.
    # Token auth with a token in the environment, so nothing is written to ~/.ray.
    # One token per process: Ray caches its config, and a second cluster must see the same.
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
                      RAY_AUTH_MODE="token",
                      # a busy 2-core machine starts Ray's agents slowly
                      RAY_agent_register_timeout_ms="120000", RAY_raylet_start_wait_time_s="120",
                      RAY_worker_register_timeout_seconds="120")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray
    temp_dir = tempfile.mkdtemp(prefix="bench-ray-")
    try:
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level=logging.ERROR, _temp_dir=temp_dir,
                 object_store_memory=1 << 30, configure_logging=True)
        remote = {}

        def pmap(fn, items):
            if fn not in remote:
                remote[fn] = ray.remote(num_cpus=1)(fn)
            refs = [remote[fn].remote(x) for x in items]
            return ray.get(refs, timeout=MAP_TIMEOUT_S)
        yield pmap
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ipyparallel_local(workers):
    import ipyparallel as ipp
    profile_dir = tempfile.mkdtemp(prefix="bench-ipp-")
    cluster = ipp.Cluster(n=workers, controller_ip="127.0.0.1", profile_dir=profile_dir,
                          log_level=logging.ERROR, engine_timeout=120, shutdown_atexit=True)
    try:
        client = cluster.start_and_connect_sync(activate=False)
        client.wait_for_engines(workers, timeout=120)
        view = client.load_balanced_view()

        def pmap(fn, items):
            items = list(items)
            # Load-balanced (like Pool, work goes to whoever is free), Pool's default chunking.
            result = view.map(fn, items, block=False,
                              chunksize=pool_chunksize(len(items), workers))
            return result.get(timeout=MAP_TIMEOUT_S)  # what map_sync does, with a time limit
        yield pmap
        client.close()
    finally:
        cluster.stop_cluster_sync()
        shutil.rmtree(profile_dir, ignore_errors=True)


@contextlib.contextmanager
def python_rq(workers):
    import redis
    import rq
    from pyworker.local import RedisServer, _wait
    server = RedisServer().start()
    procs = []
    try:
        url = f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        env = {**os.environ, "RQ_REDIS_URL": url}  # the password stays out of argv
        queue_name = "bench"
        # rq's default Worker forks a "work horse" per job: ~5 jobs/s per worker on this
        # (busy) 2-core machine, so W1 alone would take over an hour. SimpleWorker is rq's
        # worker that runs jobs in its own process; BENCH_RQ_WORKER_CLASS=rq.Worker for the
        # forking one.
        worker_class = os.environ.get("BENCH_RQ_WORKER_CLASS", "rq.worker.SimpleWorker")
        for _ in range(workers):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rq.cli", "worker", "--quiet", "--logging_level", "ERROR",
                 "--worker-class", worker_class, queue_name], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        conn = redis.Redis.from_url(url, socket_timeout=30)
        _wait(lambda: len(rq.Worker.all(connection=conn)) >= workers, 60, f"{workers} rq workers")
        queue = rq.Queue(queue_name, connection=conn)

        def pmap(fn, items):
            deadline = time.monotonic() + MAP_TIMEOUT_S
            jobs = queue.enqueue_many([rq.Queue.prepare_data(fn, args=(x,), result_ttl=600)
                                       for x in items])
            out = []
            for job in jobs:
                result = None
                while result is None and time.monotonic() < deadline:
                    # blocks on the job's result stream (XREAD BLOCK), 2 s at a time: redis-py
                    # 8 reads with a 5 s socket timeout
                    result = job.latest_result(timeout=2)
                if result is None:
                    raise TimeoutError(f"rq job {job.id} has no result after {MAP_TIMEOUT_S} s")
                if result.type != result.Type.SUCCESSFUL:
                    raise RuntimeError(f"rq job {job.id} failed: {result.exc_string}")
                out.append(result.return_value)
            return out
        yield pmap
        conn.close()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        server.stop()


BACKENDS = {
    "pyworker": pyworker_local,
    "multiprocessing.Pool": mp_pool,
    "ProcessPoolExecutor": process_pool_executor,
    "ProcessPoolExecutor-chunksize1": process_pool_executor_default,
    "joblib/loky": joblib_loky,
    "dask.distributed": dask_distributed,
    "ray": ray_local,
    "ipyparallel": ipyparallel_local,
    "rq": python_rq,
}
