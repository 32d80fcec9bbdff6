"""pyworker.pip_install(): packages without rebuilding the image, in the caller and on every
worker, live or started later.

How it travels. The caller checks the requirements and installs them in its own process first:
a typo fails there, at once, with pip's own error, and reaches no worker. It then appends the
spec, signed (protocol 'pip': a spec makes workers run pip, so one that Redis alone could forge
must not count), to P:pip; the list's length is the generation. A worker's supervisor reads that
length in the round trip its beat makes anyway (queue.Broker.renew_lease, keep), so tasks pay
nothing for it. When it has grown, the supervisor asks its executor to stop after the task it
runs (SIGUSR1: a running task is never interrupted; tasks it took ahead wait in Redis, as its
own), runs pip for the new specs as a bounded subprocess while it goes on beating, then forks a
fresh executor, which imports the new versions. A worker that starts runs every spec before its
first executor takes a task. Each worker writes the outcome into its info hash (pip_* fields),
which pip_install() waits on and status() shows.

A worker where pip failed gives back the tasks of jobs created after the pip_install that
failed (they may need what is missing), as one with another signing key does (queue._GIVE_BACK),
until a later pip_install succeeds there; a caller with no worker left for its tasks gets
PipInstallError (client.Job._check_refusals) instead of waiting.

Packages go to PYWORKER_PIP_TARGET (the chart: a writable volume on every pod's PYTHONPATH),
else to ~/.local/share/pyworker/pip/<python version>, with ``pip install --target <it>
--upgrade``. Processes that share the folder (a LocalCluster's caller and workers) install one
at a time (a lock file in it), and a spec installed there already (a marker file) is not
installed again.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from . import protocol, versions
from .errors import PipInstallError, SignatureError

log = logging.getLogger("pyworker.pip")

TARGET_ENV = "PYWORKER_PIP_TARGET"
PIP_TIMEOUT_S = 600.0  # a big wheel (torch) over a slow link takes minutes
ERROR_LINES = 15  # of pip's output, what a failure reports
PROGRESS_AFTER_S = 3.0  # a wait longer than this prints where it stands, every PROGRESS_EVERY_S
PROGRESS_EVERY_S = 10.0
_MARKER = ".pyworker-pip.json"
_LOCK = ".pyworker-pip.lock"
_HEADER = b"pip 1\n"
_CONTEXT = protocol.mac_context(protocol.KIND_PIP)
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")


# --- input ------------------------------------------------------------------------------------


def mask(text: str) -> str:
    """Text with the user and password of every URL in it replaced: index URLs carry tokens."""
    return _USERINFO.sub(r"\1***@", text)


def _requirement_class():
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
        except ImportError:
            return None, None
    return Requirement, InvalidRequirement


_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")


def check_requirement(text) -> str:
    """A PEP 508 requirement ('pandas==2.2.3', 'mypkg[extra]>=1', 'mypkg @ https://.../x.whl');
    anything else (a pip option above all) is a clear ValueError."""
    how = ("write it as 'name', 'name==1.2.3', 'name[extra]>=1.0' or "
           "'name @ https://host/name-1.0-py3-none-any.whl'")
    if not isinstance(text, str):
        raise TypeError(f"a requirement is a string, not {type(text).__name__} ({text!r}): {how}")
    value = text.strip()
    if not value:
        raise ValueError(f"an empty requirement: {how}")
    if value.startswith("-") or any(c in value for c in "\r\n\0"):
        raise ValueError(f"{mask(text)!r} is not a requirement (pip options go to the keyword "
                         f"arguments index_url=, extra_index_url=, find_links=): {how}")
    requirement, invalid = _requirement_class()
    if requirement is not None:
        try:
            requirement(value)
        except invalid as exc:
            raise ValueError(f"{mask(text)!r} is not a requirement pip understands "
                             f"({mask(str(exc))}): {how}") from None
    elif not _NAME.match(value):
        raise ValueError(f"{mask(text)!r} is not a requirement pip understands: {how}")
    return value


def check_location(kind: str, value, folder_ok: bool = False) -> str:
    """An index URL (http, https, file), or for find_links also a folder (made absolute)."""
    what = "an http(s):// or file:// URL" + (", or a folder" if folder_ok else "")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{kind}={value!r}: expected {what}")
    v = value.strip()
    if v.startswith("-") or any(c.isspace() for c in v):
        raise ValueError(f"{kind}={mask(value)!r}: expected {what}, without spaces")
    try:
        parts = urlsplit(v)
    except ValueError as exc:
        raise ValueError(f"{kind}={mask(value)!r} is not a URL ({exc}): expected {what}") from None
    if parts.scheme in ("http", "https") and parts.hostname:
        return v
    if parts.scheme == "file":
        return v
    if folder_ok and not parts.scheme:
        return os.path.abspath(os.path.expanduser(v))
    raise ValueError(f"{kind}={mask(value)!r}: expected {what}")


def _listed(kind: str, value, folder_ok: bool = False) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    return [check_location(kind, os.fspath(v) if isinstance(v, os.PathLike) else v, folder_ok)
            for v in values]


# --- a spec -----------------------------------------------------------------------------------


@dataclass
class Spec:
    """One pip_install() call: what every worker runs pip with."""
    requirements: list[str]
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    no_index: bool = False
    timeout_s: float = PIP_TIMEOUT_S
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    at: float = field(default_factory=time.time)  # jobs created from then on may need it

    @classmethod
    def make(cls, requirements, index_url=None, extra_index_url=None, find_links=None,
             no_index=False, timeout=PIP_TIMEOUT_S) -> "Spec":
        if len(requirements) == 1 and isinstance(requirements[0], (list, tuple)):
            requirements = tuple(requirements[0])  # pip_install(["a", "b"]) too
        if not requirements:
            raise ValueError("pip_install() needs at least one requirement, e.g. "
                             "pyworker.pip_install('pandas==2.2.3')")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or not timeout > 0:
            raise ValueError(f"timeout={timeout!r}: expected a number of seconds above 0")
        return cls([check_requirement(r) for r in requirements],
                   check_location("index_url", index_url) if index_url is not None else None,
                   _listed("extra_index_url", extra_index_url),
                   _listed("find_links", find_links, folder_ok=True),
                   bool(no_index), float(timeout))

    def command(self, target: str) -> list[str]:
        cmd = [sys.executable, "-m", "pip", "install", "--target", target, "--upgrade",
               "--no-input", "--disable-pip-version-check", "--progress-bar", "off"]
        if self.no_index:
            cmd.append("--no-index")
        if self.index_url:
            cmd += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            cmd += ["--extra-index-url", url]
        for where in self.find_links:
            cmd += ["--find-links", where]
        return cmd + ["--", *self.requirements]

    def __str__(self):
        where = []
        if self.index_url:
            where.append(f"index {self.index_url}")
        where += [f"extra index {u}" for u in self.extra_index_urls]
        where += [f"find-links {f}" for f in self.find_links]
        if self.no_index:
            where.append("no index")
        return mask(" ".join(self.requirements) + (f" ({', '.join(where)})" if where else ""))

    def seal(self, signer) -> bytes:
        return signer.seal(_CONTEXT, _HEADER, json.dumps(asdict(self), sort_keys=True).encode())

    @classmethod
    def open(cls, signer, message: bytes) -> "Spec":
        """The spec in a message of P:pip; SignatureError if it is not signed with our key,
        ValueError if it is not a spec this version can read."""
        header, payload = signer.open(_CONTEXT, message)
        if header != _HEADER:
            raise ValueError(f"not a pip spec this pyworker version reads ({header[:40]!r})")
        data = json.loads(bytes(payload))
        names = {f for f in cls.__dataclass_fields__}
        spec = cls(**{k: v for k, v in data.items() if k in names})
        for r in spec.requirements:  # signed, so ours; checked again all the same
            check_requirement(r)
        return spec


# --- running pip ------------------------------------------------------------------------------


def target_dir() -> str:
    """Where extra packages go: PYWORKER_PIP_TARGET, else a folder of this user's per Python
    version (packages built for one Python do not import in another)."""
    target = os.environ.get(TARGET_ENV)
    if target:
        return os.path.abspath(os.path.expanduser(target))
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return os.path.join(base, "pyworker", "pip", f"{sys.version_info[0]}.{sys.version_info[1]}")


def ensure_on_path(target: str) -> None:
    """The target first on sys.path (if it is not on it already: the chart's PYTHONPATH puts it
    there), so that a package installed into it later imports. (A folder made after an import
    looked for it is found: invalidate_caches forgets the miss, Python 3.10 on.)"""
    if target not in sys.path:
        sys.path.insert(0, target)
    importlib.invalidate_caches()


class Outcome(NamedTuple):
    ok: bool
    installed: str  # what pip said it installed ("mypkg-2.0 other-1.1"), or "" when it failed
    error: str  # the end of pip's output, credentials masked, when it failed
    again: bool = False  # installed into this folder before (by another process sharing it)


def installed_packages(target: str) -> list[str]:
    """'name==version' of every distribution in the target folder: a worker's extra packages.
    (From the names of their metadata folders: a worker registers with this, and reading the
    metadata itself would cost every worker's start an import of importlib.metadata.)"""
    found = {}
    try:
        entries = os.listdir(target)
    except OSError:
        return []
    for entry in entries:
        if entry.endswith(".dist-info"):
            name, _, version = entry[:-len(".dist-info")].rpartition("-")
            if name and version:
                found[_normal(name)] = f"{name}=={version}"
    return [found[k] for k in sorted(found)]


def _read_marker(target: str) -> dict:
    try:
        with open(os.path.join(target, _MARKER)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_marker(target: str, data: dict) -> None:
    import tempfile
    path = os.path.join(target, _MARKER)
    try:
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".pyworker-pip-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("pyworker: could not write %s: %s", path, exc)


def _lock(target: str, deadline: float, tick):
    """The target's lock (flock), waited for until the deadline, calling tick meanwhile; an
    open file to close, or None without one (a read-only folder: pip fails on its own)."""
    import fcntl
    try:
        f = open(os.path.join(target, _LOCK), "a")
    except OSError:
        return None
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except OSError:
            if time.monotonic() >= deadline:
                f.close()
                raise TimeoutError(f"another process held {os.path.join(target, _LOCK)} "
                                   "(it installs into the same folder) for too long") from None
            if tick is not None:
                tick()
            time.sleep(0.1)


_SUCCESS = re.compile(r"^Successfully installed (.+)$", re.M)


def run_pip(spec: Spec, target: str, tick=None, poll_s: float = 0.2) -> Outcome:
    """``pip install --target target --upgrade`` of the spec, in a subprocess bounded by
    spec.timeout_s, output captured. ``tick()`` is called about every poll_s while it runs (a
    supervisor beats in it); an exception from it kills pip and goes up."""
    import subprocess  # (here: a worker that never installs does not pay for these at start)
    import tempfile
    deadline = time.monotonic() + spec.timeout_s
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as exc:
        return Outcome(False, "", f"cannot make the folder {target}: {exc} (set "
                                  f"{TARGET_ENV} to a writable folder)")
    try:
        lock = _lock(target, deadline, tick)
    except TimeoutError as exc:
        return Outcome(False, "", str(exc))
    try:
        done = _read_marker(target)
        if spec.id in done:
            return Outcome(True, done[spec.id], "", True)
        with tempfile.TemporaryFile() as out:
            env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            proc = subprocess.Popen(spec.command(target), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
            timed_out = False
            try:
                while True:
                    try:
                        proc.wait(timeout=max(0.0, min(poll_s, deadline - time.monotonic())))
                        break
                    except subprocess.TimeoutExpired:
                        if time.monotonic() >= deadline:
                            timed_out = True
                            break
                        if tick is not None:
                            tick()
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
        if proc.returncode == 0 and not timed_out:
            found = _SUCCESS.findall(text)
            installed = " ".join(found[-1].split()) if found else ""
            _drop_old_metadata(target, installed)
            done[spec.id] = installed
            _write_marker(target, done)
            return Outcome(True, installed, "")
        tail = "\n".join(text.rstrip().splitlines()[-ERROR_LINES:])
        if timed_out:
            tail = (f"pip did not finish within {spec.timeout_s:g} s (pip_install's timeout) "
                    f"and was stopped; the end of its output:\n{tail}")
        return Outcome(False, "", mask(tail) or f"pip exited with {proc.returncode}")
    finally:
        if lock is not None:
            lock.close()


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _drop_old_metadata(target: str, installed: str) -> None:
    """pip --target --upgrade replaces a package's folders but leaves the metadata of its old
    version beside the new one: that goes, so the folder says one version per package."""
    import shutil
    new = {}
    for item in installed.split():
        name, _, version = item.rpartition("-")
        new[_normal(name)] = version
    for entry in os.listdir(target):
        if not entry.endswith(".dist-info"):
            continue
        name, _, version = entry[:-len(".dist-info")].rpartition("-")
        if _normal(name) in new and version != new[_normal(name)]:
            shutil.rmtree(os.path.join(target, entry), ignore_errors=True)


def _stale_modules(target: str, installed: str) -> list[str]:
    """Of the distributions just installed ('name-version ...'), the top-level modules that
    this process had imported before: it goes on using the old ones."""
    from importlib import metadata
    names = {re.sub(r"[-_.]+", "-", item.rsplit("-", 1)[0]).lower()
             for item in installed.split()}
    stale = []
    try:
        for dist in metadata.distributions(path=[target]):
            if re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower() not in names:
                continue
            tops = (dist.read_text("top_level.txt") or "").split()
            if not tops:
                tops = {str(f).split("/", 1)[0].removesuffix(".py") for f in dist.files or ()
                        if not str(f).split("/", 1)[0].endswith((".dist-info", ".data"))}
            stale += [t for t in tops if t in sys.modules]
    except OSError:
        pass
    return sorted(set(stale))


# --- what pip_install returns -------------------------------------------------------------------


class WorkerInstall(NamedTuple):
    worker: str
    host: str
    state: str  # ok, failed, pending (not yet told), waiting (for its task to end), installing,
    # unsupported (a pyworker from before pip_install)
    installed: str  # what pip installed there ("mypkg-2.0"), when ok
    packages: str  # all its extra packages ("mypkg==2.0, other==1.1")
    error: str  # pip's error, when failed
    again: bool = False  # it was in the worker's folder already (a folder shared with another)


def _worker_row(wid: str, info: dict, gen: int) -> WorkerInstall:
    name, host = info.get("name") or wid, info.get("host", "")
    if "pip_gen" not in info:
        return WorkerInstall(name, host, "unsupported", "", "",
                             "this worker's pyworker is older than pip_install: upgrade it")
    applied = int(info.get("pip_gen") or 0)
    if applied >= gen:
        ok = info.get("pip_ok", "1") == "1"
        return WorkerInstall(name, host, "ok" if ok else "failed",
                             info.get("pip_installed", "") if ok else "",
                             info.get("pip_packages", ""), "" if ok else info.get("pip_error", ""),
                             info.get("pip_again") == "1")
    if int(info.get("pip_busy") or 0) >= gen:
        state = "installing"
    elif int(info.get("pip_want") or 0) >= gen:
        state = "waiting"  # for the task it runs to end
    else:
        state = "pending"  # not told yet (its next beat)
    return WorkerInstall(name, host, state, "", info.get("pip_packages", ""), "")


class PipSummary:
    """What pip_install() did, here and on each worker: printable, and a table in a notebook."""

    def __init__(self, spec: Spec, generation: int, local: Outcome | None,
                 workers: list[WorkerInstall], waited_s: float):
        self.requirements = str(spec)
        self.generation = generation
        self.local = local
        self.workers = workers
        self.waited_s = waited_s

    def _of(self, *states) -> list[WorkerInstall]:
        return [w for w in self.workers if w.state in states]

    @property
    def failed(self) -> list[WorkerInstall]:
        return self._of("failed", "unsupported")

    @property
    def pending(self) -> list[WorkerInstall]:
        return self._of("pending", "waiting", "installing")

    @property
    def ok(self) -> bool:
        return not self.failed and not self.pending and (self.local is None or self.local.ok)

    def headline(self) -> str:
        n, good = len(self.workers), len(self._of("ok"))
        here = "" if self.local is None else "installed in this process; "
        if not n:
            return (f"pip_install {self.requirements}: {here}no live workers now; workers that "
                    "start later install it before their first task")
        text = f"pip_install {self.requirements}: {here}ok on {good} of {n} worker(s)"
        if self.failed:
            text += (f"; FAILED on {len(self.failed)} (they take no tasks of jobs started from "
                     "now on, until a pip_install succeeds there)")
        if self.pending:
            text += (f"; {len(self.pending)} not done after {self.waited_s:.0f} s (busy with "
                     "a task: they install it before their next one)")
        return text

    def _rows(self):
        names = [w.worker for w in self.workers]
        for w in self.workers:
            shown = w.worker if names.count(w.worker) == 1 or not w.host else \
                f"{w.worker}@{w.host}"
            detail = w.installed if w.state == "ok" else ""
            if w.again:
                detail += " (installed there before: a folder it shares)"
            yield shown, w.state, detail if w.state != "failed" else "", w.error

    def __str__(self):
        lines = [self.headline()]
        for name, state, detail, error in self._rows():
            lines.append(f"  {name:<28} {state:<11} {detail}".rstrip())
            lines += [f"      {line}" for line in error.splitlines()]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self):
        from html import escape as e
        rows = "".join(
            f"<tr><td>{e(name)}</td><td>{e(state)}</td><td>{e(detail)}</td>"
            f"<td><pre style='margin:0'>{e(error)}</pre></td></tr>"
            for name, state, detail, error in self._rows())
        return (f"<div><b>pyworker</b> {e(self.headline())}<table><thead><tr><th>worker</th>"
                f"<th>state</th><th>installed</th><th>pip's error</th></tr></thead>"
                f"<tbody>{rows}</tbody></table></div>")


# --- the caller's side ------------------------------------------------------------------------


def pip_install(*requirements, index_url=None, extra_index_url=None, find_links=None,
                no_index=False, timeout=PIP_TIMEOUT_S, local=True, client=None) -> PipSummary:
    """Install packages here and on every worker, without rebuilding the image.

    ``requirements``: PEP 508 strings ('scikit-learn==1.5.2', 'mypkg'); pin versions, or
    workers that start later may get newer ones than these. ``index_url`` replaces pip's index
    (PyPI, or PIP_INDEX_URL), ``extra_index_url`` (one or a list) adds to it, ``find_links``
    (URLs or folders the workers also see) offers wheels, ``no_index`` uses find_links only.
    Credentials in URLs are never printed (but are kept in Redis, which workers read them from).

    Installs in this process first (``local=False``: on the workers only): a requirement pip
    cannot install raises PipInstallError with pip's error, and no worker is asked. Then every
    live worker installs it between tasks (a running task is never interrupted) and replaces
    the process that runs its tasks, so that new versions are imported; a worker that starts
    later installs it before its first task. Returns when every live worker is done, or after
    ``timeout`` seconds (which also bounds each pip run), with a per-worker summary. A worker
    where pip failed says why there, and takes no tasks of jobs started after this call until
    a later pip_install succeeds on it."""
    from . import config
    if config.IN_EXECUTOR:
        raise PipInstallError("pip_install() runs in the caller (the notebook), not inside a "
                              "task: call it before the pmap")
    spec = Spec.make(requirements, index_url, extra_index_url, find_links, no_index, timeout)
    if client is None:
        from .api import get_client
        client = get_client()
    outcome = None
    if local:
        target = target_dir()
        ensure_on_path(target)
        outcome = _with_progress(f"installing {spec} in this process",
                                 lambda tick: run_pip(spec, target, tick))
        if not outcome.ok:
            raise PipInstallError(f"pip could not install {spec} here (nothing was sent to the "
                                  f"workers):\n{outcome.error}")
        importlib.invalidate_caches()
        versions.forget()  # the version check compares what is installed now
        stale = _stale_modules(target, outcome.installed)
        if stale:
            print(f"pyworker.pip_install: {', '.join(stale)} had been imported in this process "
                  f"before: restart it (the kernel) to use what was just installed "
                  f"({outcome.installed}); workers use it from their next task",
                  file=sys.stderr, flush=True)
    gen = client.broker.push_pip_spec(spec.seal(client.signer))
    workers, waited = _wait_for_workers(client, gen, spec)
    client.forget_workers()  # their published packages changed: the next job reads them again
    summary = PipSummary(spec, gen, outcome, workers, waited)
    if summary.failed or summary.pending:
        print(f"pyworker: {summary.headline()}", file=sys.stderr, flush=True)
    return summary


def _with_progress(what: str, run):
    """run(tick), saying what it waits for when that takes longer than PROGRESS_AFTER_S."""
    start = time.monotonic()
    state = {"next": start + PROGRESS_AFTER_S}

    def tick():
        now = time.monotonic()
        if now >= state["next"]:
            state["next"] = now + PROGRESS_EVERY_S
            print(f"pyworker.pip_install: {what} ({now - start:.0f} s)", file=sys.stderr,
                  flush=True)

    return run(tick)


def _wait_for_workers(client, gen: int, spec: Spec) -> tuple[list[WorkerInstall], float]:
    """Every live worker's row once none is pending or installing any more, or at the timeout;
    workers that start meanwhile count too (they install before their first task)."""
    start = time.monotonic()
    deadline = start + spec.timeout_s
    next_print = start + PROGRESS_AFTER_S
    pause = 0.02
    while True:
        rows = [_worker_row(w, info, gen) for w, info in client.broker.live_worker_infos()]
        waiting = [r for r in rows if r.state in ("pending", "waiting", "installing")]
        now = time.monotonic()
        if not waiting or now >= deadline:
            return rows, now - start
        if now >= next_print:
            next_print = now + PROGRESS_EVERY_S
            done = len(rows) - len(waiting)
            busy = sum(r.state == "waiting" for r in waiting)
            print(f"pyworker.pip_install: {done} of {len(rows)} worker(s) done, "
                  f"{sum(r.state == 'installing' for r in waiting)} installing, {busy} waiting "
                  f"for their task to end ({now - start:.0f} s of at most "
                  f"{spec.timeout_s:g})", file=sys.stderr, flush=True)
        time.sleep(min(pause, max(0.0, deadline - now)))
        pause = min(pause * 1.5, 0.25)


def no_worker_error(client, live: int, pipless: int, refused: int) -> PipInstallError:
    """For a job whose tasks every live worker gave back, some because a pip_install failed
    there (client.Job._check_refusals)."""
    error, where = "", ""
    try:
        for wid, info in client.broker.live_worker_infos():
            if info.get("pip_ok") == "0" and info.get("pip_error"):
                error, where = info["pip_error"], info.get("name") or wid
                break
    except Exception:  # the message is what matters; pip's error is a bonus
        pass
    also = f" ({refused} could not verify them: their signing key differs)" if refused else ""
    said = f" pip's error on {where}:\n{error}\n" if error else " "
    return PipInstallError(
        f"none of the {live} live worker(s) can run this job's tasks: on {pipless} of them a "
        f"pyworker.pip_install() made before the job failed, so a package it needs may be "
        f"missing there, and they gave its tasks back{also}.{said}Fix the requirement and call "
        "pyworker.pip_install() again (once it succeeds there, they take tasks again), or start "
        "workers that have the package; pyworker.status() shows each worker's packages")


# --- a worker's side (supervisor.py) ------------------------------------------------------------


class WorkerPip:
    """What pip_install asked of this worker, and how it went. Its supervisor owns it: it runs
    no user code, so a fresh executor forked after an install imports the new versions."""

    def __init__(self, settings, broker, worker_id: str):
        self.settings = settings
        self.broker = broker
        self.id = worker_id
        self.target = target_dir()
        ensure_on_path(self.target)  # before any fork: every executor finds the packages
        self.applied = 0  # the generation (P:pip's length) run so far
        self.ok = True
        self.block_since: float | None = None  # jobs created from then on are given back
        self.error = ""
        self.installed = ""
        self.again = False
        self.busy = 0
        self._signer = None

    def due(self) -> bool:
        gen = self.broker.pip_generation
        if gen < self.applied:  # Redis lost the list (no persistence): it counts from 0 again
            self.applied = 0
        return gen > self.applied

    def info(self) -> dict:
        return {"pip_gen": self.applied, "pip_ok": "1" if self.ok else "0",
                "pip_error": self.error, "pip_installed": self.installed,
                "pip_packages": ", ".join(installed_packages(self.target)),
                "pip_busy": self.busy, "pip_want": 0, "pip_again": "1" if self.again else "0"}

    def apply(self, tick=None) -> bool:
        """Run pip for every spec after the last one run (before the first executor, or
        between two); tick() as run_pip's. Whether anything was run."""
        from . import serialize
        if self._signer is None:
            self._signer = serialize.Signer(self.settings.secret)
        messages = self.broker.pip_specs(self.applied)
        if not messages:
            self.broker.pip_generation = self.applied
            return False
        was_ok = self.ok
        for message in messages:
            gen = self.applied + 1
            self.busy = gen
            self.broker.set_worker_info(self.id, pip_busy=gen)
            try:
                spec = Spec.open(self._signer, message)
            except (SignatureError, ValueError, TypeError) as exc:
                # (not a spec this worker can trust: it runs nothing of it)
                outcome, at = Outcome(False, "", f"cannot use pip_install spec {gen}: {exc}"), \
                    time.time()
            else:
                log.info("worker %s: pip_install %s", self.id, spec)
                outcome, at = run_pip(spec, self.target, tick), spec.at
            self.applied = gen
            if outcome.ok:
                self.ok, self.block_since, self.error = True, None, ""
                self.installed, self.again = outcome.installed, outcome.again
                log.info("worker %s: pip_install done: %s", self.id,
                         outcome.installed or "nothing new")
            else:
                self.ok, self.error, self.installed, self.again = False, outcome.error, "", False
                if self.block_since is None:
                    self.block_since = at
                log.error("worker %s: pip_install failed; it takes no tasks of jobs started "
                          "after it until a pip_install succeeds here:\n%s", self.id,
                          outcome.error)
        self.busy = 0
        importlib.invalidate_caches()
        # The versions this worker publishes (versions.py) include its packages: read them
        # again, before the next executor is forked, so callers check against the new ones.
        versions.forget()
        fields = {**self.info(), **versions.local().info()}
        if self.ok and not was_ok:
            fields["handoff"] = "1"  # (a give-back turned hand-offs off: queue._GIVE_BACK)
        self.broker.set_worker_info(self.id, **fields)
        return True
