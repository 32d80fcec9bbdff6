"""pyworker: run ``pmap(fn, xs)`` on Redis-backed worker processes, locally or on Kubernetes."""
from ._version import __version__
from .api import Executor, connect, get_client, imap, imap_unordered, pmap
from .client import Client
from .config import Settings
from .errors import (ConfigurationError, ConnectionError, JobLostError, PyworkerError,
                     RemoteError, SerializationError, SignatureError, VersionMismatchError,
                     WorkerLostError)
from .local import LocalCluster
from .status import status

__all__ = [
    "__version__", "pmap", "imap", "imap_unordered", "Executor", "connect", "get_client",
    "status", "LocalCluster", "Client", "Settings", "PyworkerError", "ConfigurationError",
    "ConnectionError", "RemoteError", "SerializationError", "SignatureError",
    "VersionMismatchError", "WorkerLostError", "JobLostError",
]
