"""joblib's backend "pyworker" against real workers: joblib's contract for a backend (ordered
results, exceptions, n_jobs, return_as), scikit-learn's n_jobs=-1 on the workers with the same
scores as n_jobs=1, nested calls, big arrays sent once per call, and Ctrl-C."""
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import pyworker  # noqa: E402
from pyworker.errors import RemoteTraceback  # noqa: E402

from support import executors, redis_bytes_in, redis_keys, wait_until  # noqa: E402


def test_results_come_in_order_from_the_workers(cluster):
    def f(x):
        return os.getpid(), x * x

    with parallel_config(backend="pyworker"):
        out = Parallel(n_jobs=-1)(delayed(f)(x) for x in range(300))
    assert [v for _, v in out] == [x * x for x in range(300)]
    pids = {p for p, _ in out}
    assert pids <= set(executors(cluster)) and len(pids) == 2, pids


def test_n_jobs_minus_one_is_the_live_workers_and_one_runs_in_the_caller(cluster):
    with parallel_config(backend="pyworker"):
        assert joblib.effective_n_jobs(-1) == 2
        assert joblib.effective_n_jobs(5) == 5
        # -2 is "all but one" as in joblib, but never 1: that would run in the caller
        assert joblib.effective_n_jobs(-2) == 2
        assert joblib.effective_n_jobs() == 2  # the default under the backend: the cluster
        with pytest.raises(ValueError, match="n_jobs == 0"):
            joblib.effective_n_jobs(0)
        here = Parallel(n_jobs=1)(delayed(os.getpid)() for _ in range(3))
        there = Parallel()(delayed(os.getpid)() for _ in range(6))
    assert here == [os.getpid()] * 3
    assert set(there) <= set(executors(cluster)) and os.getpid() not in there


def test_the_backend_is_named_in_parallel_too(cluster):
    out = Parallel(backend="pyworker", n_jobs=2)(delayed(abs)(-x) for x in range(10))
    assert out == list(range(10))


def test_an_error_re_raises_with_the_remote_traceback_and_stops_the_rest(cluster):
    def f(x):
        if x == 7:
            raise KeyError(f"no {x}")
        time.sleep(0.01)
        return x

    before = set(redis_keys(cluster, "pyw:job:*"))  # (the shared cluster's other tests')
    with parallel_config(backend="pyworker"):
        with pytest.raises(KeyError, match="no 7") as info:
            Parallel(n_jobs=-1, batch_size=1)(delayed(f)(x) for x in range(200))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback) and "KeyError: 'no 7'" in str(cause)
    assert ", in f\n" in str(cause)  # the task's own frame, on the worker
    # the call's other tasks were cancelled: nothing of it is left in Redis
    wait_until(lambda: not set(redis_keys(cluster, "pyw:job:*")) - before, 10,
               "the job's keys to go")
    with parallel_config(backend="pyworker"):  # and the backend works at once afterwards
        assert Parallel()(delayed(abs)(x) for x in [-1, -2]) == [1, 2]


@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_return_as_generator(cluster, return_as):
    with parallel_config(backend="pyworker"):
        out = Parallel(n_jobs=-1, return_as=return_as)(
            delayed(lambda x: x * x)(x) for x in range(50))
        assert not isinstance(out, list)
        values = list(out)
    if return_as == "generator":
        assert values == [x * x for x in range(50)]
    else:
        assert sorted(values) == [x * x for x in range(50)]


def test_nested_joblib_calls_run_in_the_task_one_after_another(cluster):
    def inner(y):
        return os.getpid(), y

    def outer(x):
        # as a library does inside a task: joblib again, here with the pyworker backend asked for
        with parallel_config(backend="pyworker"):
            got = Parallel(n_jobs=-1)(delayed(inner)(x * 10 + y) for y in range(4))
        return os.getpid(), got

    with parallel_config(backend="pyworker"):
        out = Parallel(n_jobs=-1)(delayed(outer)(x) for x in range(6))
    for x, (pid, got) in enumerate(out):
        assert pid in executors(cluster)
        assert got == [(pid, x * 10 + y) for y in range(4)], "nested calls left the task"


def test_notebook_functions_and_classes_reach_the_workers(cluster):
    class Scaler:  # defined here, as in a notebook cell: pickled by value
        def __init__(self, k):
            self.k = k

        def __call__(self, x):
            return self.k * x

    with parallel_config(backend="pyworker"):
        assert Parallel()(delayed(Scaler(3))(x) for x in range(5)) == [0, 3, 6, 9, 12]


def test_a_big_array_passed_to_every_task_travels_once_per_call(make_cluster):
    """GridSearchCV passes the same X to every fit: through Redis (no shared memory) it must
    not be sent once per task. It goes with the first batch, then once as the function that
    later batches run with."""
    np = pytest.importorskip("numpy")
    cluster = make_cluster(2)
    client = pyworker.Client(dataclasses.replace(cluster.settings(), shared_memory=False))
    X = np.arange(2**20, dtype=np.float64)  # 8 MiB
    tasks = 24

    def total(a, i):
        return float(a[i::tasks].sum())

    expected = [float(X[i::tasks].sum()) for i in range(tasks)]
    try:
        sent = {}
        for max_nbytes in ("1M", None):  # None: joblib's switch for "never memmap"; here too
            before = redis_bytes_in(cluster)
            with parallel_config(backend="pyworker", client=client):
                out = Parallel(n_jobs=2, batch_size=1, max_nbytes=max_nbytes)(
                    delayed(total)(X, i) for i in range(tasks))
            sent[max_nbytes] = redis_bytes_in(cluster) - before
            assert out == expected
    finally:
        client.close()
    assert sent[None] > tasks * X.nbytes * 0.9, sent  # once per task
    assert sent["1M"] < 3 * X.nbytes, sent  # twice: with the first batch, and as the function


def test_grid_search_sends_its_x_twice_not_once_per_fit(make_cluster):
    """The same through scikit-learn: GridSearchCV's 20 fits share one 5 MiB X."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("sklearn")
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV
    cluster = make_cluster(2)
    client = pyworker.Client(dataclasses.replace(cluster.settings(), shared_memory=False))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40_000, 16))
    y = X @ rng.normal(size=16)  # 320 kB: under max_nbytes, it goes with every batch
    sent, found = {}, {}
    try:
        for max_nbytes in ("1M", None):
            before = redis_bytes_in(cluster)
            with parallel_config(backend="pyworker", client=client, max_nbytes=max_nbytes):
                search = GridSearchCV(Ridge(), {"alpha": [0.1, 1, 10, 100]}, cv=5, n_jobs=-1)
                found[max_nbytes] = search.fit(X, y).cv_results_["mean_test_score"].tolist()
            sent[max_nbytes] = (redis_bytes_in(cluster) - before) / X.nbytes
    finally:
        client.close()
    assert found["1M"] == found[None]
    # Without sharing X goes with every batch of fits: joblib's auto-batching makes them fewer
    # than the 20 fits when fits are quick (X went 14 to 22 times in runs seen here).
    assert sent[None] > 8, sent
    assert sent["1M"] < 6, sent  # X twice, y (1/16 of X) with each fit

def test_scikit_learn_cross_val_score_and_grid_search_on_the_workers(cluster, tmp_path):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_iris
    from sklearn.model_selection import GridSearchCV, cross_val_score
    from sklearn.svm import SVC

    folder = str(tmp_path)

    class PidSVC(SVC):  # an SVC that notes which process fitted it
        def fit(self, X, y, **kw):
            with open(os.path.join(folder, str(os.getpid())), "a") as f:
                f.write("fit\n")
            return super().fit(X, y, **kw)

    X, y = load_iris(return_X_y=True)
    grid = {"C": [0.1, 1.0, 10.0], "gamma": [0.01, 0.1, 1.0]}

    seq_scores = cross_val_score(PidSVC(), X, y, cv=5, n_jobs=1)
    seq_grid = GridSearchCV(PidSVC(), grid, cv=5, n_jobs=1).fit(X, y)
    assert os.listdir(folder) == [str(os.getpid())]
    os.remove(os.path.join(folder, str(os.getpid())))

    with parallel_config(backend="pyworker"):
        par_scores = cross_val_score(PidSVC(), X, y, cv=5, n_jobs=-1)
        par_grid = GridSearchCV(PidSVC(), grid, cv=5, n_jobs=-1).fit(X, y)

    assert list(par_scores) == list(seq_scores)
    assert par_grid.best_params_ == seq_grid.best_params_
    for key in ("mean_test_score", "std_test_score", "rank_test_score"):
        assert list(par_grid.cv_results_[key]) == list(seq_grid.cv_results_[key]), key
    fitted_in = {int(name): open(os.path.join(folder, name)).read().count("fit")
                 for name in os.listdir(folder)}
    workers = set(executors(cluster))
    # every cross-validation fit (5 + 45) ran on a worker; GridSearchCV's refit runs here
    assert set(fitted_in) - {os.getpid()} <= workers and len(set(fitted_in) & workers) == 2
    assert sum(n for pid, n in fitted_in.items() if pid in workers) == 5 + 45
    assert fitted_in.get(os.getpid()) == 1


def test_importing_pyworker_registers_the_backend_when_joblib_comes(cluster):
    """In a fresh process, in either order, after a probe for joblib (find_spec, as libraries
    look for optional dependencies), and in a kernel set up by pyworker.startup (no import of
    pyworker by the user): parallel_config(backend="pyworker") just works."""
    scripts = {
        "pyworker first": "import pyworker, sys\nassert 'joblib' not in sys.modules\n"
                          "import joblib\n",
        "joblib first": "import joblib, pyworker\n",
        "probed first": "import importlib.util, pyworker\nimportlib.util.find_spec('joblib')\n"
                        "import joblib\n",
        "kernel start": "import pyworker.startup as s\ns.install({}, announce=False)\n"
                        "import sklearn.utils.parallel as joblib_user\nimport joblib\n",
    }
    check = textwrap.dedent("""
        import os
        with joblib.parallel_config(backend="pyworker"):
            pids = joblib.Parallel()(joblib.delayed(os.getpid)() for _ in range(4))
        print(sorted(set(pids)))
    """)
    for name, script in scripts.items():
        done = subprocess.run([sys.executable, "-c", script + check], capture_output=True,
                              text=True, timeout=60, env={**os.environ, **cluster.env})
        assert done.returncode == 0, (name, done.stderr)
        pids = set(eval(done.stdout.strip().splitlines()[-1]))
        assert pids and pids <= set(executors(cluster)), (name, done.stdout)


CTRL_C_CALLER = r"""
import time, joblib
import pyworker
print("started", flush=True)
with joblib.parallel_config(backend="pyworker"):
    joblib.Parallel(n_jobs=-1, batch_size=1)(joblib.delayed(time.sleep)(2.0) for _ in range(40))
"""


def test_ctrl_c_cancels_the_call_on_the_workers(make_cluster):
    cluster = make_cluster(2)
    caller = subprocess.Popen([sys.executable, "-c", CTRL_C_CALLER],
                              env={**os.environ, **cluster.env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert caller.stdout.readline().strip() == "started"
        wait_until(lambda: len([w for w in pyworker.status(cluster.client).alive
                                if w.get("current")]) == 2, 30, "both workers to start a task")
        caller.send_signal(signal.SIGINT)
        sent = time.monotonic()
        caller.wait(10)
        assert time.monotonic() - sent < 5.0, "the caller did not get control back soon"
        assert "KeyboardInterrupt" in caller.stderr.read()
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
    # the queued batches left Redis and the running ones were stopped, well before their 2 s
    wait_until(lambda: not redis_keys(cluster, "pyw:job:*"), 3, "the call's keys to go")
    wait_until(lambda: not [w for w in pyworker.status(cluster.client).alive
                            if w.get("current")], 3, "the workers to stop their tasks")
    done = sum(int(w["done"]) for w in pyworker.status(cluster.client).alive)
    assert done <= 4, done


# A lambda: the workers cannot import this test module (joblib's batches are not shipped).
_group_here = lambda _: __import__("os").environ.get("PYWORKER_GROUP", "default")  # noqa: E731


def test_group_in_parallel_config_sends_tasks_to_that_group(make_cluster):
    from joblib import Parallel, delayed, parallel_config
    from support import wait_until
    cluster = make_cluster(1)
    cluster.add_worker(env={"PYWORKER_GROUP": "gpu"})
    wait_until(lambda: cluster.client.for_group("gpu").live_workers(max_age_s=0) == 1, 30,
               "the gpu worker")
    with parallel_config(backend="pyworker", group="gpu", client=cluster.client):
        got = Parallel(n_jobs=-1)(delayed(_group_here)(i) for i in range(10))
    assert set(got) == {"gpu"}
