"""Whether the workers run what the caller runs: Python (major.minor), cloudpickle, pyworker and
its protocol, and the packages a job's function uses.

Each worker publishes its versions once, in its registration (Redis info hash: see protocol.py),
with a digest of them all (``env``). A caller reads them with the list of live workers that it
refreshes anyway (Client._workers, at most every 2 s: no round trip of its own), fetching each
distinct environment's package list once, and checks each function of a job against them when
the job starts: a Python, cloudpickle or protocol difference is a VersionMismatchError before any
item is sent; a package of another version (or missing) a VersionMismatchWarning, once per job
and package, naming the workers and the ``pyworker.pip_install(...)`` line that fixes it. A
worker that joins later says its digest in every ok result: a digest the job has not checked
is checked then.

Package versions come from the distributions' metadata folders (``<name>-<version>.dist-info``,
``.egg-info``) along sys.path, read by name (no file is opened: ~1 ms for a few hundred), the
first of each name as import finds it. Which distribution a top-level module belongs to: the
one of its own name, else the one whose RECORD (or top_level.txt) in the folder it was
imported from lists it (importlib.metadata.packages_distributions() reads every RECORD on the
path, ~100 ms: too slow for a first pmap). Everything is cached per process; forget() drops it
(after installing packages)."""
from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import warnings

from . import protocol, serialize
from ._version import __version__
from .errors import VersionMismatchError, VersionMismatchWarning

_NORMAL = re.compile(r"[-_.]+")
# Not packages whose version a job depends on through its function: checked apart (pyworker,
# cloudpickle), or the caller's own script.
_SKIP = frozenset({"__main__", "builtins", "pyworker", "cloudpickle"})
NAMED_MAX = 5  # workers named in a message; the others are counted
_CACHE_MAX = 4096

_lock = threading.Lock()


def normalize(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return _NORMAL.sub("-", name).lower()


def _scan(path) -> dict[str, tuple[str, str]]:
    """Normalized distribution name -> (version, folder), the first of each name along path."""
    found: dict[str, tuple[str, str]] = {}
    for entry in path:
        folder = entry or "."
        try:
            names = os.listdir(folder)
        except OSError:  # gone, or a zip file
            continue
        for name in names:
            if name.endswith(".dist-info"):
                dist, _, version = name[:-10].rpartition("-")
            elif name.endswith(".egg-info"):
                dist, _, version = name[:-9].partition("-")
                version = version.partition("-")[0]  # "<name>-<version>-py3.11.egg-info"
            else:
                continue
            if not dist or not version:
                continue
            found.setdefault(normalize(dist), (version, folder))
    return found


class Env:
    """One process's versions: what a worker publishes, what a caller compares."""
    __slots__ = ("python", "cloudpickle", "pyworker", "protocol", "packages", "digest")

    def __init__(self, python: str, cloudpickle: str, pyworker: str, protocol_version: str,
                 packages: dict[str, str] | None, digest: str = ""):
        self.python = python
        self.cloudpickle = cloudpickle
        self.pyworker = pyworker  # '': a worker from before version checks
        self.protocol = protocol_version
        self.packages = packages  # None: not known
        self.digest = digest

    @staticmethod
    def packages_text(packages: dict[str, str]) -> str:
        return " ".join(f"{name}=={version}" for name, version in sorted(packages.items()))

    @staticmethod
    def parse_packages(text: str) -> dict[str, str]:
        out = {}
        for item in text.split():
            name, sep, version = item.partition("==")
            if sep:
                out[name] = version
        return out

    def info(self) -> dict[str, str]:
        """The fields a worker registers (protocol.py: P:worker:<id>:info)."""
        return {"python": self.python, "cloudpickle": self.cloudpickle,
                "pyworker": self.pyworker, "protocol": self.protocol, "env": self.digest,
                "packages": self.packages_text(self.packages or {})}

    def describe(self) -> str:
        text = f"Python {self.python} with cloudpickle {self.cloudpickle}"
        if self.pyworker:
            text += f", pyworker {self.pyworker} (protocol {self.protocol})"
        return text


_local: Env | None = None
_dists: dict[str, tuple[str, str] | None] = {}  # top-level module -> (distribution, version)
_folders: dict[str, dict[str, tuple[str, str] | None]] = {}  # folder -> its modules' dists
_scanned: dict[str, tuple[str, str]] | None = None


def local() -> Env:
    """This process's versions (cached: forget() after installing packages)."""
    global _local, _scanned
    env = _local
    if env is None:
        with _lock:
            if _local is None:
                _scanned = _scan(sys.path)
                packages = {name: v for name, (v, _) in _scanned.items()}
                head = (f"{serialize.PYTHON_VERSION} {serialize.CLOUDPICKLE_VERSION} "
                        f"{__version__} {protocol.PROTOCOL_VERSION}\n")
                digest = hashlib.sha256(
                    (head + Env.packages_text(packages)).encode()).hexdigest()[:16]
                _local = Env(serialize.PYTHON_VERSION, serialize.CLOUDPICKLE_VERSION,
                             __version__, str(protocol.PROTOCOL_VERSION), packages, digest)
            env = _local
    return env


def forget():
    """Read versions again at the next use (packages were installed or removed)."""
    global _local, _scanned
    with _lock:
        _local, _scanned = None, None
        _dists.clear()
        _folders.clear()


def _folder_index(folder: str) -> dict[str, tuple[str, str] | None]:
    """Top-level module -> (distribution, version) for the distributions installed in folder,
    from their RECORD (egg-info: top_level.txt); None for a name two distributions claim."""
    index: dict[str, tuple[str, str] | None] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return index
    for name in names:
        if name.endswith(".dist-info"):
            dist, _, version = name[:-10].rpartition("-")
            listing, by_record = os.path.join(folder, name, "RECORD"), True
        elif name.endswith(".egg-info"):
            dist, _, version = name[:-9].partition("-")
            version = version.partition("-")[0]
            listing, by_record = os.path.join(folder, name, "top_level.txt"), False
        else:
            continue
        try:
            with open(listing, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        tops = set()
        for line in lines:
            top = line.split(",", 1)[0].split("/", 1)[0] if by_record else line.strip()
            if not top or top.startswith("..") or top.endswith((".dist-info", ".data")) \
                    or top in ("__pycache__", "bin"):
                continue
            tops.add(top.split(".", 1)[0])  # a module file: six.py, _x.cpython-311-...so
        owner = (normalize(dist), version)
        for top in tops:
            index[top] = owner if index.get(top, owner) == owner else None
    return index


def distribution_of(top: str) -> tuple[str, str] | None:
    """(distribution, version) that provides the imported top-level module ``top``; None for
    one that no distribution provides (the caller's own, a namespace package)."""
    if top in _dists:
        return _dists[top]
    local()
    module = sys.modules.get(top)
    file = getattr(module, "__file__", None) if module is not None else None
    found = None
    if isinstance(file, str):
        name = normalize(top)
        scanned = _scanned or {}
        if name in scanned:
            found = (name, scanned[name][0])
        else:
            parent = os.path.dirname(os.path.abspath(file))
            if os.path.basename(file).startswith("__init__."):
                parent = os.path.dirname(parent)  # a package: the folder holding it
            with _lock:
                index = _folders.get(parent)
                if index is None:
                    index = _folders[parent] = _folder_index(parent)
            found = index.get(top)
    if len(_dists) > _CACHE_MAX:
        _dists.clear()
    _dists[top] = found
    return found


def function_packages(fn, shipped: bool = True) -> tuple[tuple[str, str, str], ...]:
    """(module, distribution, version) of each installed package that fn references (its
    module, its globals, closure and defaults, through the caller's own shipped modules: the
    walk of ship.py). ``shipped``: modules shipped by value are not packages of the workers."""
    from . import ship  # (callers only: workers need not import importlib.metadata)
    used: set[str] = set()
    try:
        ship.modules_to_ship(fn, used)
    except Exception:  # a strange object must not stop the job; it just goes unchecked
        return ()
    out = []
    for top in sorted(used):
        if top in _SKIP or top in sys.stdlib_module_names or top in sys.builtin_module_names:
            continue
        if shipped and ship.ships(top):
            continue
        dist = distribution_of(top)
        if dist is not None:
            out.append((top, *dist))
    return tuple(out)


def _names(ids, total: int, one: str, many: str) -> str:
    """Who, for messages: 'worker a (1 of 3 live) <one>', 'workers a, b (2 of 3 live) <many>'."""
    ids = sorted(ids)
    shown = ", ".join(ids[:NAMED_MAX])
    if len(ids) > NAMED_MAX:
        shown += f" and {len(ids) - NAMED_MAX} more"
    word = "worker" if len(ids) == 1 else "workers"
    return f"{word} {shown} ({len(ids)} of {total} live) {one if len(ids) == 1 else many}"


def _stacklevel() -> int:
    """The stack level of the first frame outside pyworker (the user's pmap call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn is level 1
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1
    return level


def fatal(env: Env) -> bool:
    """Whether a worker of env cannot run this caller's tasks at all."""
    return (env.python != serialize.PYTHON_VERSION
            or env.cloudpickle != serialize.CLOUDPICKLE_VERSION
            or bool(env.protocol) and env.protocol != str(protocol.PROTOCOL_VERSION))


def mismatch_error(groups, total: int, sent: bool = False) -> VersionMismatchError:
    """The error for workers that cannot run this caller's tasks (groups: (Env, ids))."""
    mine = Env(serialize.PYTHON_VERSION, serialize.CLOUDPICKLE_VERSION, __version__,
               str(protocol.PROTOCOL_VERSION), None)
    parts, fixes = [], []
    for env, ids in groups:
        parts.append(f"{_names(ids, total, 'runs', 'run')} {env.describe()}")
        if env.protocol and env.protocol != mine.protocol:
            fixes.append(f"the same pyworker on both sides (in the notebook: %pip install "
                         f"pyworker=={env.pyworker}, then restart the kernel; or the workers' "
                         f"image of pyworker {__version__})")
        if env.python != mine.python:
            fixes.append(f"the same Python minor version (a kernel of Python {env.python}, or "
                         f"a worker image of Python {mine.python})")
        if env.cloudpickle != mine.cloudpickle:
            fixes.append(f"the same cloudpickle (in the notebook: %pip install "
                         f"cloudpickle=={env.cloudpickle}, then restart the kernel)")
    return VersionMismatchError(
        "the workers cannot run this caller's tasks: " + "; ".join(parts)
        + f"; this caller runs {mine.describe()}. "
        + ("The job was cancelled. " if sent else "Nothing of the job was sent. ") + "Use "
        + "; ".join(dict.fromkeys(fixes)) + " -- or stop those workers")


class Checker:
    """A client's version checks: the environments its workers published, and per function
    (by its pickle's sha) what differs on each. Cheap when nothing differs: a job of a function
    already found fine against the same list of workers costs one dictionary look-up."""

    def __init__(self, shipped: bool = True):
        self.shipped = shipped
        self.envs: dict[str, Env] = {}  # env key -> Env
        self._packages: dict[str, tuple] = {}  # fn sha -> function_packages
        self._diffs: dict[tuple[str, str], tuple] = {}  # (fn sha, env key) -> differences
        # fn sha -> the workers' groups (the very dict, which a refresh replaces) against
        # which it was found to have nothing to say: the next job of it costs a look-up
        self._clean: dict[str, dict] = {}

    def known(self) -> list[str]:
        return [k for k, env in self.envs.items() if env.packages is not None]

    def group(self, rows) -> dict[str, tuple[Env, list[str]]]:
        """Live workers (queue.Broker.live_worker_rows) by environment: key -> (Env, ids)."""
        if len(self.envs) > 256:
            self.envs.clear()
        groups: dict[str, tuple[Env, list[str]]] = {}
        for wid, _shm, digest, py, cp, pw, proto, packages in rows:
            key = digest or f"?{py}/{cp}/{pw}/{proto}"  # a worker from before version checks
            env = self.envs.get(key)
            if env is None or env.packages is None and packages:
                env = self.envs[key] = Env(py, cp, pw, proto, Env.parse_packages(packages)
                                           if digest and packages else None, key)
            entry = groups.get(key)
            if entry is None:
                groups[key] = (env, [wid])
            else:
                entry[1].append(wid)
        return groups

    def check(self, job, sha: str, fn, groups) -> None:
        """A job's new function against the live workers' environments: raises
        VersionMismatchError for those that cannot run it; warns for packages."""
        if not groups or self._clean.get(sha) is groups:
            return
        total = sum(len(ids) for _, ids in groups.values())
        bad = [(env, ids) for env, ids in groups.values() if fatal(env)]
        if bad:
            raise mismatch_error(bad, total)
        packages = self._packages.get(sha)
        if packages is None:
            packages = function_packages(fn, self.shipped)
            if len(self._packages) > _CACHE_MAX:
                self._packages.clear()
            self._packages[sha] = packages
        if not self._warn(job, sha, packages, groups.items(), total):
            if len(self._clean) > _CACHE_MAX:
                self._clean.clear()
            self._clean[sha] = groups

    def late(self, job, key: str, groups) -> None:
        """A worker whose environment the job did not check returned a result: check it (its
        versions from ``groups``, refreshed by the caller; gone: nothing to say)."""
        entry = groups.get(key)
        if entry is None:
            return
        total = sum(len(ids) for _, ids in groups.values())
        for sha, fn in list(job._functions.items()):
            packages = self._packages.get(sha)
            if packages is None:
                packages = self._packages[sha] = function_packages(fn, self.shipped)
            self._warn(job, sha, packages, [(key, entry)], total)

    def _differences(self, sha, packages, key, env) -> tuple:
        """(distribution, module, caller's version, worker's version or None) for each package
        of the function that differs in env."""
        diffs = self._diffs.get((sha, key))
        if diffs is None:
            diffs = ()
            if env.packages is not None:
                diffs = tuple((dist, top, mine, env.packages.get(dist))
                              for top, dist, mine in packages
                              if env.packages.get(dist) != mine)
            if len(self._diffs) > _CACHE_MAX:
                self._diffs.clear()
            self._diffs[(sha, key)] = diffs
        return diffs

    def _warn(self, job, sha, packages, entries, total) -> bool:
        """Warn (once per job) about each package that differs; whether any differs."""
        by_dist: dict[tuple[str, str, str], dict] = {}  # (dist, module, mine) -> theirs -> ids
        for key, (env, ids) in entries:
            for dist, top, mine, theirs in self._differences(sha, packages, key, env):
                by_dist.setdefault((dist, top, mine), {}).setdefault(theirs, []).extend(ids)
            if env.pyworker and env.pyworker != __version__:
                by_dist.setdefault(("pyworker", "pyworker", __version__), {}).setdefault(
                    env.pyworker, []).extend(ids)
        if not by_dist:
            return False
        for (dist, top, mine), theirs in by_dist.items():
            if dist in job._warned:
                continue
            job._warned.add(dist)
            sides = "; ".join(
                _names(ids, total, "has", "have") + f" {version}" if version
                else _names(ids, total, "does not have it", "do not have it")
                for version, ids in sorted(theirs.items(), key=lambda kv: kv[0] or ""))
            if dist == "pyworker":
                text = (f"this caller runs pyworker {mine}; {sides}. They speak the same "
                        f"protocol, so the job runs; to match them, use the same version on "
                        f"both sides")
            else:
                uses = f"{top} (distribution {dist})" if normalize(top) != dist else dist
                text = (f"the function uses {uses}: this caller has {dist} {mine}; {sides}. "
                        f"Results may differ, or tasks fail. To install this caller's version "
                        f"on the workers: pyworker.pip_install(\"{dist}=={mine}\")")
            warnings.warn(text, VersionMismatchWarning, stacklevel=_stacklevel())
        return True
