"""pyworker: run ``pmap(fn, xs)`` on Redis-backed worker processes, locally or on Kubernetes.

The API's modules load on first use (PEP 562): a worker process or a healthcheck, which start
through this package, then pay only for what they use (about 25 ms less per start)."""
from importlib import import_module

from ._version import __version__
from .config import Settings
from .errors import (ConfigurationError, ConnectionError, JobLostError, PyworkerError,
                     RedisError, RemoteError, SerializationError, SignatureError,
                     VersionMismatchError, WorkerLostError)
# loaded now: its module has the same name, which would otherwise be found instead
from .status import status

_LAZY = {"pmap": "api", "imap": "api", "imap_unordered": "api", "Executor": "api",
         "connect": "api", "get_client": "api", "Client": "client", "LocalCluster": "local"}

__all__ = [
    "__version__", "pmap", "imap", "imap_unordered", "Executor", "connect", "get_client",
    "status", "LocalCluster", "Client", "Settings", "PyworkerError", "ConfigurationError",
    "ConnectionError", "RedisError", "RemoteError", "SerializationError", "SignatureError",
    "VersionMismatchError", "WorkerLostError", "JobLostError",
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
