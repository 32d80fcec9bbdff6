"""pyworker: run ``pmap(fn, xs)`` on Redis-backed worker processes, locally or on Kubernetes.

The API's modules load on first use (PEP 562): a worker process or a healthcheck, which start
through this package, then pay only for what they use (about 25 ms less per start)."""
from importlib import import_module

from ._version import __version__
from .config import Settings
from .errors import (ConfigurationError, ConnectionError, JobLostError, PyworkerError,
                     RedisError, RemoteError, ScalingError, SerializationError, SignatureError,
                     VersionMismatchError, WorkerLostError)
# loaded now: its module has the same name, which would otherwise be found instead
from .status import status

_LAZY = {"pmap": "api", "imap": "api", "imap_unordered": "api", "Executor": "api",
         "connect": "api", "get_client": "api", "Client": "client", "LocalCluster": "local",
         "Pool": "pool", "scale": "scaling"}

__all__ = [
    "__version__", "pmap", "imap", "imap_unordered", "Executor", "Pool", "connect", "get_client",
    "status", "scale", "LocalCluster", "Client", "Settings", "PyworkerError", "ConfigurationError",
    "ConnectionError", "RedisError", "RemoteError", "SerializationError", "SignatureError",
    "VersionMismatchError", "WorkerLostError", "JobLostError", "ScalingError",
]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyworker' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


# --- joblib: the backend "pyworker" ---------------------------------------------------------------
# Registered as soon as joblib is imported (at once if it already is), without importing joblib
# here: a worker or a kernel that never uses joblib pays nothing, and joblib stays optional.

def _register_joblib():
    try:
        import joblib
        joblib.register_parallel_backend("pyworker", _joblib_backend)
    except Exception as exc:  # an incompatible joblib must not break `import joblib`
        import sys
        print(f"pyworker: joblib's backend 'pyworker' is not available ({type(exc).__name__}: "
              f"{exc})", file=sys.stderr)


def _joblib_backend(**kwargs):
    """joblib's factory for the backend: its module (and pyworker's API) load on first use."""
    from .joblib_backend import PyworkerBackend
    return PyworkerBackend(**kwargs)


class _JoblibHook:
    """A meta path finder that lets joblib's own loader run and then registers the backend. It
    stays until joblib has been imported: a find_spec("joblib") that only probes (as libraries
    do for optional dependencies) must not use it up."""

    def find_spec(self, name, path, target=None):
        import sys
        if name != "joblib":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _register_joblib()

        loader.exec_module = exec_module
        return spec


def _hook_joblib():
    import sys
    if "joblib" in sys.modules:
        _register_joblib()
    elif not any(isinstance(f, _JoblibHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _JoblibHook())


_hook_joblib()
