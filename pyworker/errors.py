"""Exceptions that users see."""
from __future__ import annotations

import builtins


class PyworkerError(Exception):
    """Base class of pyworker's own errors."""


class ConfigurationError(PyworkerError):
    """No or wrong settings: the message says which variable or argument to set."""


class ConnectionError(PyworkerError, builtins.ConnectionError):  # noqa: A001
    """Redis cannot be reached or refused the password; one line, no socket stack.

    It subclasses the builtin ConnectionError (an OSError), so ``except ConnectionError`` and
    ``except OSError`` catch it whether or not they mean pyworker's.
    ``retryable`` is true when waiting may help (Redis not up yet), false for a wrong password."""

    def __init__(self, message, retryable=True):
        super().__init__(message)
        self.retryable = retryable


class RedisError(PyworkerError):
    """Redis refused a command for a reason that waiting does not fix (OOM: maxmemory reached;
    MISCONF: it cannot save ...); one line that names the Redis setting to change. Replies that
    waiting fixes (LOADING, BUSY, READONLY, TRYAGAIN, MASTERDOWN) are a retryable
    ConnectionError instead, waited out like an outage (PYWORKER_RECONNECT_S)."""


class SerializationError(PyworkerError, TypeError):
    """A function, item or result cannot be pickled, or is over the size limit."""


class SignatureError(PyworkerError):
    """A message was not signed with our secret; it was not unpickled."""


class VersionMismatchError(PyworkerError):
    """Caller and worker run different Python minor or cloudpickle versions."""


class WorkerLostError(PyworkerError):
    """The workers running an item died more times than the retry limit allows, or the item
    killed the executor process running it that often (it exited, crashed, was OOM-killed)."""


class TaskExitError(PyworkerError):
    """An item's task raised SystemExit, KeyboardInterrupt or GeneratorExit (``sys.exit()``,
    ``argparse`` ...): that item failed; the worker went on. The original is ``__cause__``."""


class TaskTimeoutError(PyworkerError, TimeoutError):
    """An item ran longer than its ``task_timeout`` and was stopped."""


class JobLostError(PyworkerError):
    """Redis no longer has the job (restarted without persistence, flushed, or evicted its keys).
    pmap and imap resubmit what had not come back; an Executor's pending futures get this."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text; set as ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class RemoteError(PyworkerError):
    """A task raised an exception that could not be sent back as itself.

    ``type_name``, ``message`` and ``traceback`` describe it; ``index`` and ``item`` say where."""

    def __init__(self, type_name, message, traceback, index=None, item=None, worker=None):
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.index = index
        self.item = item
        self.worker = worker
        super().__init__(f"{type_name}: {message}")

    def __str__(self):
        where = f" (item #{self.index}" + (f" on worker {self.worker}" if self.worker else "") + ")"
        return f"{self.type_name}: {self.message}{where if self.index is not None else ''}\n\n" \
               f"Remote traceback:\n{self.traceback}"


class ScalingError(PyworkerError):
    """pyworker.scale() cannot set the number of workers here: not in a release's Lab, scaling
    turned off (lab.allowScaling), or the Kubernetes API refused; the message says which."""
