"""What a new IPython kernel runs: register the backend from the environment and put pmap, imap,
imap_unordered and executor into the user's namespace — no import, no set-up (the .Rprofile idea).

Wire it with ``c.InteractiveShellApp.extensions = ["pyworker.startup"]`` or
``%load_ext pyworker.startup``. It never breaks a kernel: problems become one printed line."""
from __future__ import annotations

import sys


def _probe() -> str:
    from .client import Client
    from .config import Settings
    from .errors import ConfigurationError, PyworkerError

    try:
        probe = Client(Settings.from_env(connect_timeout_s=2.0))
    except ConfigurationError:
        return ("pyworker: no Redis configured yet (PYWORKER_REDIS_URL, PYWORKER_SECRET); "
                "call pyworker.connect(url=..., password=..., secret=...) before pmap")
    try:
        probe.ping()
        n = probe.live_workers()
        return (f"pyworker: {n} worker(s) on Redis at {probe.broker.where}; "
                "pmap, imap and executor are ready")
    except PyworkerError as exc:
        return f"pyworker: {exc} — the kernel works; pmap will try again when called"
    finally:
        probe.close()


def install(namespace: dict | None = None, announce: bool = True) -> None:
    try:
        from . import api
        from .status import status

        if namespace is None:
            namespace = sys.modules["__main__"].__dict__
        message = _probe()
        namespace.update(pmap=api.pmap, imap=api.imap, imap_unordered=api.imap_unordered,
                         executor=api.Executor(), pyworker_status=status)
    except Exception as exc:  # a broken pyworker must never break the kernel
        message = f"pyworker: not loaded ({type(exc).__name__}: {exc})"
    if announce:
        print(message, file=sys.stderr)


def load_ipython_extension(ipython) -> None:
    install(ipython.user_ns)


def write_startup_file(folder: str) -> str:
    """A PYTHONSTARTUP file that installs pyworker into every IPython kernel started with it
    (kernels run PYTHONSTARTUP in the user's namespace); for `pyworker local --lab`."""
    import os
    path = os.path.join(folder, "pyworker_startup.py")
    with open(path, "w") as f:
        f.write("import pyworker.startup as _pw\n_pw.install(globals())\ndel _pw\n")
    return path
