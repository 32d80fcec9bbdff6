"""Which modules travel with a function by value: the caller's own (a notebook's helpers.py,
a folder of modules on a path the user added), never an installed package or the standard
library, which the workers import themselves.

A module is the caller's own when its file lies outside the standard library and every
site-packages folder and no installed distribution provides it (an editable install counts as
installed). Packages are judged, and shipped, by their top-level package."""
from __future__ import annotations

import functools
import importlib.metadata
import os
import site
import sys
import sysconfig
import threading
import time
import types

# Always on the workers (they run pyworker), whatever their files' location.
_NEVER = frozenset({"__main__", "pyworker", "cloudpickle"})
# The walk through what a function references stops after this many objects, and does not
# look into containers longer than this: a function's globals may hold big data.
MAX_OBJECTS = 20_000
MAX_CONTAINER = 256
_SCALARS = (str, bytes, bytearray, int, float, complex, bool, type(None), range, memoryview)

_lock = threading.Lock()
_roots: tuple[str, ...] | None = None
_distributed: frozenset | None = None
_verdicts: dict[tuple[str, str], bool] = {}  # (top-level name, its file) -> ships


def _install_roots() -> tuple[str, ...]:
    """The standard library's and every site-packages folder, resolved, each ending in a
    separator (so /x/lib does not contain /x/lib2)."""
    paths = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths().get(key))
    try:
        paths.update(site.getsitepackages())
    except AttributeError:  # old virtualenvs' site module
        pass
    paths.add(site.getusersitepackages())
    from .pip import target_dir  # what pyworker.pip_install() installs: the workers have it
    paths.add(target_dir())
    out = set()
    for p in paths:
        if p:
            out.add(os.path.join(os.path.realpath(p), ""))
    return tuple(sorted(out))


def _distribution_names() -> frozenset:
    """Top-level names that installed distributions declare (top_level.txt: setuptools, which
    also writes it for editable installs; reading it for every distribution takes ~10 ms,
    once per process, and only when a module outside the install folders turns up)."""
    names = set()
    for dist in importlib.metadata.distributions():
        try:
            text = dist.read_text("top_level.txt")
        except Exception:  # a broken distribution must not break pickling
            continue
        if text:
            names.update(line.strip() for line in text.splitlines() if line.strip())
    return frozenset(names)


def _module_files(module) -> list[str]:
    file = getattr(module, "__file__", None)
    if file:
        return [file]
    # a namespace package (a folder without __init__.py): its folders
    return [p for p in getattr(module, "__path__", None) or () if isinstance(p, str)]


def ships(name: str) -> bool:
    """Whether the top-level module ``name`` (imported in this process) is the caller's own."""
    global _roots, _distributed
    top = name.partition(".")[0]
    if top in _NEVER or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return False
    module = sys.modules.get(top)
    files = _module_files(module) if module is not None else []
    if not files:
        return False  # builtin, frozen or made in memory: nothing to judge it by
    if any(f.endswith((".so", ".pyd")) for f in files):
        return False  # a compiled extension: machine code cannot travel in a pickle
    key = (top, files[0])
    verdict = _verdicts.get(key)
    if verdict is not None:
        return verdict
    with _lock:
        if _roots is None:
            _roots = _install_roots()
        verdict = not any(os.path.realpath(f).startswith(_roots) for f in files)
        if verdict:
            if _distributed is None:
                _distributed = _distribution_names()
            verdict = top not in _distributed
        _verdicts[key] = verdict
    return verdict


def _code_names(code, out: set):
    out.update(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_names(const, out)


def modules_to_ship(obj, used: set | None = None) -> tuple[str, ...]:
    """The top-level names of the caller's own modules that ``obj`` (a function, a method, a
    callable object) needs: its own module and those of the functions, classes and modules it
    references through its globals, closure, defaults and attributes, transitively through
    the caller's own code (an installed package's code is not looked into: it is pickled by
    reference and the workers import it). ``used``, if given, gets the top-level names of
    every module the walk met (installed ones too: versions.py checks theirs)."""
    found: set[str] = set()
    met = used if used is not None else set()
    seen: set[int] = set()
    stack = [obj]
    budget = MAX_OBJECTS
    while stack and budget > 0:
        o = stack.pop()
        if isinstance(o, _SCALARS) or id(o) in seen:
            continue
        seen.add(id(o))
        budget -= 1
        if isinstance(o, types.ModuleType):
            met.add(o.__name__.partition(".")[0])
            if ships(o.__name__):
                found.add(o.__name__.partition(".")[0])
                # shipped, it is pickled with all its globals (from-imports of other modules
                # of the caller's included)
                stack.extend(_shallow(vars(o).values()))
        elif isinstance(o, types.FunctionType):
            module = getattr(o, "__module__", None) or "__main__"
            met.add(module.partition(".")[0])
            own = ships(module)
            if own:
                found.add(module.partition(".")[0])
            if o.__closure__:
                for cell in o.__closure__:
                    try:
                        stack.append(cell.cell_contents)
                    except ValueError:  # an empty cell
                        pass
            stack.extend(o.__defaults__ or ())
            stack.extend((o.__kwdefaults__ or {}).values())
            # An installed module's top-level function is pickled by reference: its globals
            # are the workers' own. Anything else (the caller's code, __main__, lambdas and
            # closures, which are pickled by value) takes the globals it names along.
            if own or module == "__main__" or "<" in o.__qualname__:
                names: set = set()
                _code_names(o.__code__, names)
                g = o.__globals__
                stack.extend(g[n] for n in names if n in g)
        elif isinstance(o, types.MethodType):
            stack.append(o.__func__)
            stack.append(o.__self__)
        elif isinstance(o, functools.partial):
            stack.append(o.func)
            stack.extend(o.args)
            stack.extend(o.keywords.values())
        elif isinstance(o, type):
            if isinstance(o.__module__, str):
                met.add(o.__module__.partition(".")[0])
            if ships(o.__module__):
                found.add(o.__module__.partition(".")[0])
                for value in vars(o).values():
                    if isinstance(value, (staticmethod, classmethod)):
                        value = value.__func__
                    elif isinstance(value, property):
                        stack.extend(f for f in (value.fget, value.fset, value.fdel) if f)
                        continue
                    if isinstance(value, (types.FunctionType, type)):
                        stack.append(value)
                stack.extend(o.__bases__)
        elif isinstance(o, (list, tuple, set, frozenset)):
            if len(o) <= MAX_CONTAINER:
                stack.extend(o)
        elif isinstance(o, dict):
            if len(o) <= MAX_CONTAINER:
                stack.extend(o.values())
        else:
            # an instance: its class, and what it holds (a Pool call's runner holds the
            # function; a callable object of the caller's holds its settings)
            stack.append(type(o))
            module = getattr(o, "__module__", None)  # a C function's (numpy's ufuncs: a type's)
            if isinstance(module, str):
                met.add(module.partition(".")[0])
            attrs = getattr(o, "__dict__", None)
            if isinstance(attrs, dict) and len(attrs) <= MAX_CONTAINER:
                stack.extend(attrs.values())
    return tuple(sorted(found))


def _shallow(values):
    """A shipped module's globals worth looking into: code and modules, not data."""
    return [v for v in values
            if isinstance(v, (types.FunctionType, type, types.ModuleType, functools.partial))]


def module_files(names) -> tuple[str, ...]:
    """The files of every imported module under the top-level ``names``: what a function
    pickled with them by value goes stale with."""
    if not names:
        return ()
    tops = set(names)
    files = []
    for mod_name, module in list(sys.modules.items()):
        if mod_name.partition(".")[0] in tops and module is not None:
            file = getattr(module, "__file__", None)
            if file:
                files.append(file)
    return tuple(sorted(files))


# A cached pickle's module files are looked at (os.stat) at most this often: a call of a
# function of the caller's module then costs ~1 µs, not a stat per file; an edit is seen by
# the first call after it that comes this much later (a person edits slower than that).
STAT_EVERY_S = 0.25


class Freshness:
    """Whether a by-value pickle of a function (with its modules' ``files``) is still current:
    its files' modification times, the code object it runs (%autoreload swaps it in place) and
    the objects its own code's global names are bound to (a constant of the module set again
    from the notebook). Not seen: a global changed in place, or one that only the functions it
    calls use."""
    __slots__ = ("files", "times", "code", "bound", "next_stat")

    def __init__(self, files, fn):
        self.files = tuple(files)
        self.times = self._times()
        self.next_stat = time.monotonic() + STAT_EVERY_S
        self.code, self.bound = self._code(fn)

    def _times(self) -> tuple:
        times = []
        for file in self.files:
            try:
                times.append(os.stat(file).st_mtime_ns)
            except OSError:
                times.append(None)
        return tuple(times)

    @staticmethod
    def _code(fn):
        code = getattr(fn, "__code__", None)
        if code is None:
            return None, ()
        g = fn.__globals__
        return code, tuple(g.get(n) for n in code.co_names)

    def current(self, fn) -> bool:
        code, bound = self._code(fn)
        # by identity, not ==, which an array would answer with an array
        if code is not self.code or len(bound) != len(self.bound) or not all(
                a is b for a, b in zip(bound, self.bound)):
            return False
        now = time.monotonic()
        if now >= self.next_stat:
            self.next_stat = now + STAT_EVERY_S
            return self._times() == self.times
        return True
