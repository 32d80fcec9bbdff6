"""Each backend: a context manager that starts N worker processes and yields a `map`."""
import contextlib
import multiprocessing


@contextlib.contextmanager
def pyworker_local(workers):
    from pyworker import LocalCluster, pmap
    with LocalCluster(workers) as cluster:
        yield lambda fn, items: pmap(fn, items, progress=False, client=cluster.client)


@contextlib.contextmanager
def mp_pool(workers):
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield pool.map


BACKENDS = {
    "pyworker": pyworker_local,
    "multiprocessing.Pool": mp_pool,
}
