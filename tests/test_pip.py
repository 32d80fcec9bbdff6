"""pyworker.pip_install(): a wheel the test builds reaches the caller, live workers and workers
started later, from a find_links folder and from a PEP 503 index served here on 127.0.0.1;
running tasks are not interrupted; failures are reported per worker and never hang a caller.

pip never leaves this machine: every install here names --no-index or an index on 127.0.0.1,
and the guard env sends anything else to a closed port on 127.0.0.1."""
import base64
import functools
import hashlib
import http.server
import os
import signal
import sys
import threading
import time
import zipfile

import pytest

import pyworker
from pyworker import pip as pwpip
from support import wait_until

NAME = "mypkg"


def build_wheel(folder, version, name=NAME):
    """A pure-Python wheel, written by hand: enough metadata for pip to install it offline."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n".encode(),
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: pyworker-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": f"{name}\n".encode(),
    }

    def digest(data):
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{p},sha256={digest(d)},{len(d)}\n" for p, d in files.items())
    files[f"{dist}/RECORD"] = (record + f"{dist}/RECORD,,\n").encode()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return path


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    for version in ("1.0", "2.0"):
        build_wheel(folder, version)
    return str(folder)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def index(tmp_path, wheels):
    """A PEP 503 simple index of the wheels on 127.0.0.1; its URL (…/simple)."""
    root = tmp_path / "index"
    (root / "simple" / NAME).mkdir(parents=True)
    (root / "files").mkdir()
    links = []
    for whl in sorted(os.listdir(wheels)):
        data = open(os.path.join(wheels, whl), "rb").read()
        (root / "files" / whl).write_bytes(data)
        links.append(f'<a href="../../files/{whl}#sha256={hashlib.sha256(data).hexdigest()}">'
                     f'{whl}</a><br>')
    (root / "simple" / "index.html").write_text(f'<a href="{NAME}/">{NAME}</a>')
    (root / "simple" / NAME / "index.html").write_text("<html><body>" + "".join(links)
                                                       + "</body></html>")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    server.shutdown()
    server.server_close()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """pip cannot reach the internet (no config file; its default index a closed port on
    127.0.0.1), the caller's packages go to a folder of this test, and what a test imports and
    adds to sys.path goes away after it. Workers inherit the environment."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv(pwpip.TARGET_ENV, str(tmp_path / "caller-pip"))
    path = list(sys.path)
    yield tmp_path
    sys.path[:] = path
    for name in [m for m in sys.modules if m == NAME or m.startswith(NAME + ".")]:
        del sys.modules[name]


def start(make_cluster, tmp_path, n, shared=False):
    """A cluster of n workers, each with a pip target of its own (as pods have), or all
    sharing the caller's (shared: a LocalCluster on a laptop)."""
    cluster = make_cluster(0)
    for i in range(n):
        add(cluster, tmp_path, i, shared)
    cluster.wait_for_workers(n)
    return cluster


def add(cluster, tmp_path, i, shared=False):
    env = {} if shared else {pwpip.TARGET_ENV: str(tmp_path / f"worker-{i}-pip")}
    return cluster.add_worker(env=env)


def version(_):
    """Run in a task: (its executor's pid, mypkg's version there or None)."""
    import importlib
    import os
    importlib.invalidate_caches()
    try:
        import mypkg
    except ImportError:
        return os.getpid(), None
    return os.getpid(), mypkg.__version__


def infos(cluster):
    return {w: info for w, info in cluster.client.broker.live_worker_infos()}


# --- input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, says", [
    ("", "empty requirement"),
    ("--index-url=http://evil/", "not a requirement"),
    ("mypkg==1.0 other", "not a requirement pip understands"),
    ("mypkg\n-r x", "not a requirement"),
])
def test_bad_requirements_are_refused_with_a_clear_error(bad, says):
    with pytest.raises(ValueError, match=says):
        pyworker.pip_install(bad)


def test_bad_locations_are_refused_and_credentials_never_shown():
    with pytest.raises(ValueError, match="index_url=.*expected an http"):
        pyworker.pip_install("mypkg", index_url="ftp://host/simple")
    with pytest.raises(ValueError, match="extra_index_url"):
        pyworker.pip_install("mypkg", extra_index_url="--trusted-host=x")
    with pytest.raises(ValueError) as err:
        pyworker.pip_install("mypkg", index_url="https://bob:s3cret@host/ simple")
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="at least one requirement"):
        pyworker.pip_install()
    with pytest.raises(TypeError, match="a requirement is a string"):
        pyworker.pip_install(3)
    spec = pwpip.Spec.make(("mypkg==1.0",), index_url="https://bob:s3cret@host/simple",
                           extra_index_url=["https://tok@other/simple"], find_links="wheels")
    assert "s3cret" not in str(spec) and "tok@" not in str(spec) and "***@host" in str(spec)
    assert spec.find_links == [os.path.abspath("wheels")]
    assert pwpip.mask("Looking in https://u:p@h/x and http://t@h") == \
        "Looking in https://***@h/x and http://***@h"


# --- installs -----------------------------------------------------------------------------------


def test_find_links_reaches_the_caller_live_workers_and_a_worker_started_later(
        make_cluster, offline, wheels):
    cluster = start(make_cluster, offline, 2)
    client = cluster.client
    assert all(v is None for _, v in pyworker.pmap(version, range(4), client=client))

    summary = pyworker.pip_install("mypkg==1.0", find_links=wheels, no_index=True, timeout=120)

    assert summary.ok, str(summary)
    assert [w.state for w in summary.workers] == ["ok", "ok"]
    assert all(w.installed == "mypkg-1.0" for w in summary.workers)
    assert "ok on 2 of 2 worker(s)" in str(summary) and "<table>" in summary._repr_html_()
    import mypkg  # in the caller too
    assert mypkg.__version__ == "1.0"
    assert mypkg.__file__.startswith(str(offline / "caller-pip"))
    # each worker installed into its own folder (as pods do), not the caller's
    for i in range(2):
        assert os.path.isdir(offline / f"worker-{i}-pip" / NAME)
    assert {v for _, v in pyworker.pmap(version, range(8), client=client)} == {"1.0"}
    text = str(pyworker.status(client))
    assert text.count("extra packages: mypkg==1.0") == 2, text
    assert "mypkg==1.0" in pyworker.status(client)._repr_html_()

    # A worker that starts later installs it before its first task: with the others stopped,
    # tasks queued before it starts run there, and every one of them finds the package.
    for p in cluster.workers[:2]:
        p.send_signal(signal.SIGTERM)
        p.wait(20)
    wait_until(lambda: not infos(cluster), 20, "the first two workers to stop")
    with pyworker.Executor(client) as ex:
        futures = [ex.submit(version, i) for i in range(4)]
        proc = add(cluster, offline, 2)
        got = [f.result(timeout=60) for f in futures]
    assert {v for _, v in got} == {"1.0"}
    (info,) = infos(cluster).values()
    assert info["pid"] == str(proc.pid) and info["pip_gen"] == str(summary.generation)
    assert os.path.isdir(offline / "worker-2-pip" / NAME)


def test_a_local_index_and_an_upgrade_seen_by_tasks_after_the_second_install(
        make_cluster, offline, index, capsys):
    cluster = start(make_cluster, offline, 2)
    client = cluster.client
    url = index.replace("http://", "http://bob:s3cret@")  # credentials: never shown

    first = pyworker.pip_install("mypkg==1.0", index_url=url, timeout=120)
    assert first.ok, str(first)
    before = pyworker.pmap(version, range(8), client=client)
    assert {v for _, v in before} == {"1.0"}
    import mypkg
    assert mypkg.__version__ == "1.0"

    second = pyworker.pip_install("mypkg==2.0", index_url=url, timeout=120)
    assert second.ok, str(second)
    assert {w.installed for w in second.workers} == {"mypkg-2.0"}
    after = pyworker.pmap(version, range(8), client=client)
    assert {v for _, v in after} == {"2.0"}
    # every executor that had imported 1.0 was replaced by a fresh one
    assert not {p for p, _ in before} & {p for p, _ in after}
    assert second.generation == first.generation + 1
    text = str(pyworker.status(client))
    assert text.count("extra packages: mypkg==2.0") == 2 and "mypkg==1.0" not in text, text

    out = capsys.readouterr()
    assert "mypkg had been imported in this process before: restart it" in out.err
    shown = str(first) + str(second) + out.out + out.err
    for i in range(2):
        shown += open(cluster._worker_log(i)).read()
    assert "s3cret" not in shown and "bob:" not in shown
    assert "***@127.0.0.1" in str(second)


def test_a_running_task_is_not_interrupted_its_worker_installs_after_it(
        make_cluster, offline, wheels, tmp_path):
    cluster = start(make_cluster, offline, 1)
    client = cluster.client
    started, gate = tmp_path / "started", tmp_path / "gate"

    def held(_):
        import os
        import time
        open(started, "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return version(None)

    with pyworker.Executor(client) as ex:
        future = ex.submit(held, 0)
        wait_until(started.exists, 30, "the task to start")
        got = {}
        thread = threading.Thread(target=lambda: got.setdefault("summary", pyworker.pip_install(
            "mypkg==1.0", find_links=wheels, no_index=True, local=False, timeout=120)))
        thread.start()
        # its supervisor knows, and waits for the task to end
        wait_until(lambda: all(i.get("pip_want") == "1" for i in infos(cluster).values()), 30,
                   "the worker to learn of the install")
        assert not future.done() and thread.is_alive()
        gate.touch()
        pid, seen = future.result(timeout=60)
        assert seen is None  # it ran to its end with what it had
        thread.join(120)
    summary = got["summary"]
    assert summary.ok and summary.local is None, str(summary)
    again = pyworker.pmap(version, range(2), client=client)
    assert {v for _, v in again} == {"1.0"} and pid not in {p for p, _ in again}


def test_a_failed_install_is_reported_per_worker_and_no_caller_hangs(
        make_cluster, offline, wheels):
    cluster = start(make_cluster, offline, 2)
    client = cluster.client
    gen = client.broker.pip_generation_now()
    older = pyworker.Executor(client)  # a job created before the install that fails
    assert older.submit(version, 0).result(timeout=30)[1] is None

    # In the caller first: nothing reaches the workers.
    with pytest.raises(pyworker.PipInstallError, match="No matching distribution") as err:
        pyworker.pip_install("nosuchpkg-zz", no_index=True, timeout=120)
    assert "nothing was sent to the workers" in str(err.value)
    assert client.broker.pip_generation_now() == gen

    # On the workers only: each says pip's error.
    summary = pyworker.pip_install("nosuchpkg-zz", no_index=True, local=False, timeout=120)
    assert not summary.ok
    assert [w.state for w in summary.workers] == ["failed", "failed"]
    assert all("No matching distribution found for nosuchpkg-zz" in w.error
               for w in summary.workers)
    assert "FAILED on 2" in str(summary) and "No matching distribution" in str(summary)
    assert "pip_install failed" in str(pyworker.status(client))

    # A job started now: every worker gives its tasks back; its caller is told, at once.
    t0 = time.monotonic()
    with pytest.raises(pyworker.PipInstallError, match="none of the 2 live worker") as err:
        pyworker.pmap(lambda x: x, range(4), client=client, timeout=60)
    assert time.monotonic() - t0 < 30
    assert "No matching distribution" in str(err.value)
    # a job created before the failed install needs nothing new: it still runs there
    assert older.submit(version, 1).result(timeout=30)[1] is None
    older.shutdown()

    # A later install that succeeds lets them take tasks again.
    fixed = pyworker.pip_install("mypkg==1.0", find_links=wheels, no_index=True, timeout=120)
    assert fixed.ok, str(fixed)
    assert {v for _, v in pyworker.pmap(version, range(4), client=client)} == {"1.0"}


def test_local_cluster_sharing_one_folder_installs_once(make_cluster, offline, wheels):
    cluster = start(make_cluster, offline, 2, shared=True)
    summary = pyworker.pip_install("mypkg==1.0", find_links=wheels, no_index=True, timeout=120)
    assert summary.ok and summary.local.ok and not summary.local.again, str(summary)
    assert {w.installed for w in summary.workers} == {"mypkg-1.0"}
    # pip ran once, in the caller: the workers found it there
    assert all(w.again for w in summary.workers) and "installed there before" in str(summary)
    assert {v for _, v in pyworker.pmap(version, range(4), client=cluster.client)} == {"1.0"}
