"""The caller's own modules travel with its functions (pyworker/ship.py): workers started in
another folder, with another PYTHONPATH, run functions from modules only the caller has."""
import importlib
import json
import shutil
import sys
import uuid

import cloudpickle
import pytest

import pyworker
from pyworker import pmap, serialize, ship
from pyworker.client import Client
from pyworker.config import Settings

from support import need

HELPERS = """
import json
from {pkg}.text import shout
from {util} import twice

SCALE = 3

def clean(x):
    return twice(x) + SCALE

def as_json(x):
    return json.dumps({{"v": clean(x)}})

class Scaler:
    def __init__(self, k):
        self.k = k

    def scale(self, x):
        return twice(x) * self.k

class Point:
    def __init__(self, x):
        self.x = x

def loud(word):
    return shout(word)
"""
LOCKY = """
import threading
LOCK = threading.Lock()

def locked(x):
    with LOCK:
        return x
"""


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A notebook folder with helpers_<id>.py (which imports another module of the folder and
    a package of it), imported here as a notebook would: from a folder on sys.path."""
    folder = tmp_path_factory.mktemp("notebook")
    tag = uuid.uuid4().hex[:8]
    name, util, pkg = f"helpers_{tag}", f"util_{tag}", f"nbpkg_{tag}"
    (folder / f"{util}.py").write_text("def twice(x):\n    return 2 * x\n")
    (folder / pkg).mkdir()
    (folder / pkg / "__init__.py").write_text("")
    (folder / pkg / "text.py").write_text("def shout(w):\n    return w.upper() + '!'\n")
    (folder / f"{name}.py").write_text(HELPERS.format(pkg=pkg, util=util))
    (folder / f"locky_{tag}.py").write_text(LOCKY)
    (folder / f"nsdir_{tag}").mkdir()  # a folder of modules without __init__.py
    (folder / f"nsdir_{tag}" / "steps.py").write_text("def halve(x):\n    return x / 2\n")
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(name)
        yield module, (name, util, pkg)
    finally:
        sys.path.remove(str(folder))
        for mod in list(sys.modules):
            if mod.partition(".")[0] in (name, util, pkg, f"locky_{tag}", f"nsdir_{tag}"):
                del sys.modules[mod]


@pytest.fixture(scope="module")
def far_cluster(tmp_path_factory):
    """Workers in an empty folder with an empty PYTHONPATH: like worker pods, they have none of
    the caller's files."""
    need(shutil.which("redis-server"),
         "redis-server is not installed (apt-get install redis-server)")
    elsewhere = tmp_path_factory.mktemp("worker-home")
    with pyworker.LocalCluster(2, lease_s=2.0, worker_cwd=str(elsewhere),
                               worker_env={"PYTHONPATH": ""}) as cluster:
        yield cluster


# --- which modules ship ---------------------------------------------------------------------


def test_a_function_of_an_own_module_ships_it_and_the_own_modules_it_uses(own):
    module, (name, util, pkg) = own
    uses = tuple(sorted((name, util)))  # what clean's code names: not the package
    assert ship.modules_to_ship(module.clean) == uses
    # a lambda here names the module object, which travels whole (all its imports); this test
    # module is the caller's own too
    assert set(ship.modules_to_ship(lambda x: module.clean(x) + 1)) == {name, util, pkg,
                                                                         __name__}
    assert ship.modules_to_ship(module.Scaler(2).scale) == uses
    assert ship.modules_to_ship(module.loud) == tuple(sorted((name, pkg)))
    assert ship.modules_to_ship(module) == tuple(sorted((name, util, pkg)))


def test_installed_packages_the_standard_library_and_pyworker_never_ship():
    assert ship.modules_to_ship(json.dumps) == ()
    assert ship.modules_to_ship(lambda x: json.dumps(x)) == (__name__,)  # the lambda's own
    assert ship.modules_to_ship(pyworker.pmap) == ()  # an editable install here: still installed
    assert ship.modules_to_ship(cloudpickle.dumps) == ()
    assert not ship.ships("json") and not ship.ships("pytest") and not ship.ships("__main__")
    numpy = pytest.importorskip("numpy")
    assert ship.modules_to_ship(numpy.sqrt) == ()
    assert ship.modules_to_ship(lambda x: numpy.sqrt(x)) == (__name__,)


def test_an_installed_function_pickles_as_a_small_reference():
    blob = serialize.dumps_function(json.dumps, ship.modules_to_ship(json.dumps))
    assert len(blob) < 100 and b"json" in blob and b"dumps" in blob


def test_an_own_function_pickles_with_its_code_and_the_registry_is_left_as_it_was(own):
    module, names = own
    by_reference = serialize.dumps_function(module.clean)
    by_value = serialize.dumps_function(module.clean, ship.modules_to_ship(module.clean))
    assert len(by_value) > len(by_reference)
    assert b"co_" not in by_reference and b"SCALE" in by_value
    assert not set(names) & set(cloudpickle.list_registry_pickle_by_value())


def test_an_own_module_that_cannot_be_pickled_is_left_to_the_workers_with_a_warning(own):
    module, (name, _, _) = own
    locky = importlib.import_module(name.replace("helpers_", "locky_"))
    with pytest.warns(RuntimeWarning, match=f"cannot send module.*{locky.__name__}.*lock"):
        blob = serialize.dumps_function(locky.locked, ship.modules_to_ship(locky.locked))
    assert blob == serialize.dumps_function(locky.locked)  # by reference, as before
    assert serialize.loads_function(blob)(4) == 4


def test_a_module_the_caller_registered_itself_stays_registered(own):
    module, (name, _, _) = own
    cloudpickle.register_pickle_by_value(module)
    try:
        serialize.dumps_function(module.clean, (name,))
        assert name in cloudpickle.list_registry_pickle_by_value()
    finally:
        cloudpickle.unregister_pickle_by_value(module)


# --- on workers that lack the modules -------------------------------------------------------


def test_a_module_of_a_folder_without_init_ships_and_runs(far_cluster, own):
    _, (name, _, _) = own
    folder = name.replace("helpers_", "nsdir_")
    steps = importlib.import_module(f"{folder}.steps")
    assert ship.modules_to_ship(steps.halve) == (folder,)
    assert pmap(steps.halve, [4, 6]) == [2.0, 3.0]


def test_workers_cannot_import_the_module_themselves(far_cluster, own):
    _, (name, _, _) = own
    assert pmap(lambda n: importlib.util.find_spec(n) is None, [name] * 4) == [True] * 4


def test_pmap_of_an_own_function_a_lambda_and_a_method_runs_on_the_workers(far_cluster, own):
    module, _ = own
    xs = list(range(20))
    assert pmap(module.clean, xs) == [2 * x + 3 for x in xs]
    assert pmap(lambda x: module.clean(x) + 1, xs) == [2 * x + 4 for x in xs]
    assert pmap(module.Scaler(5).scale, xs) == [10 * x for x in xs]
    assert pmap(module.as_json, [1]) == ['{"v": 5}']
    assert pmap(module.loud, ["hi"]) == ["HI!"]
    points = pmap(module.Point, [7])
    assert points[0].x == 7
    assert type(points[0]) is module.Point  # cloudpickle tracks the class it sent


def test_a_changed_global_of_an_own_module_reaches_the_workers(far_cluster, own):
    module, _ = own
    try:
        module.SCALE = 100  # what an edited cell or %autoreload does
        assert pmap(module.clean, [1]) == [102]
    finally:
        module.SCALE = 3
    assert pmap(module.clean, [1]) == [5]


def test_own_functions_are_pickled_again_only_when_their_modules_change(far_cluster, own,
                                                                        monkeypatch):
    module, (name, util, _) = own
    client = far_cluster.client
    client._by_reference.clear()  # earlier tests pickled these already
    monkeypatch.setattr(ship, "STAT_EVERY_S", 0.0)  # files looked at on every call
    calls = []
    real = serialize.dumps_function
    monkeypatch.setattr(serialize, "dumps_function",
                        lambda fn, *by_value: calls.append(fn) or real(fn, *by_value))
    for _ in range(3):
        assert pmap(json.dumps, [1]) == ["1"]
        assert pmap(module.clean, [1]) == [5]
    assert calls == [json.dumps, module.clean]
    # what %autoreload does when util's file is edited: the file changes, and the function
    # objects already imported get the new code in place
    util_module = sys.modules[util]
    path = util_module.__file__
    with open(path, "w") as f:
        f.write("def twice(x):\n    return 20 * x\n")
    stat = __import__("os").stat(path)
    __import__("os").utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh = {}
    exec(compile(open(path).read(), path, "exec"), fresh)
    original = util_module.twice.__code__
    util_module.twice.__code__ = fresh["twice"].__code__
    try:
        assert pmap(module.clean, [1]) == [23]
        assert calls == [json.dumps, module.clean, module.clean]
        assert module.clean in client._by_reference
    finally:
        util_module.twice.__code__ = original
        with open(path, "w") as f:
            f.write("def twice(x):\n    return 2 * x\n")


def test_with_ship_modules_off_the_workers_name_the_missing_module(far_cluster, own):
    module, (name, _, _) = own
    settings = Settings.from_env(environ={"PYWORKER_SHIP_MODULES": "false"},
                                 redis_url=far_cluster.redis.local_url,
                                 redis_password=far_cluster.redis.password,
                                 secret=far_cluster.secret)
    assert settings.ship_modules is False
    client = Client(settings)
    try:
        with pytest.raises(ModuleNotFoundError) as info:
            pmap(module.clean, [1, 2], client=client)
    finally:
        client.close()
    assert info.value.name == name
    assert name in str(info.value) and "PYWORKER_SHIP_MODULES" in str(info.value)
    assert "install it on the workers" in str(info.value)
