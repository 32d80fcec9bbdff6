"""The `pyworker` command line, run as a real subprocess."""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

import pyworker

from support import need, wait_until

PYWORKER = [sys.executable, "-m", "pyworker"]


def test_version():
    out = subprocess.run([*PYWORKER, "--version"], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == f"pyworker {pyworker.__version__}"


def test_health_follows_the_heartbeat_file(tmp_path):
    hb = tmp_path / "hb"
    run = lambda: subprocess.run([*PYWORKER, "health", "--file", str(hb), "--max-age", "5"],  # noqa
                                 capture_output=True, text=True, timeout=30)
    assert run().returncode == 1
    hb.write_text("now")
    assert run().returncode == 0
    old = time.time() - 60
    os.utime(hb, (old, old))
    res = run()
    # (60 s, and the seconds the command took to start on a loaded machine)
    assert res.returncode == 1 and re.search(r"last heartbeat 6\d s ago", res.stderr), res.stderr


def test_worker_touches_its_heartbeat_file(make_cluster, tmp_path):
    hb = tmp_path / "hb"
    cluster = make_cluster(0)
    proc = cluster.add_worker(env={"PYWORKER_HEARTBEAT_FILE": str(hb)})
    wait_until(hb.exists, 20, "the heartbeat file")
    first = hb.stat().st_mtime
    wait_until(lambda: hb.stat().st_mtime > first, 5, "the next heartbeat")
    res = subprocess.run([*PYWORKER, "health", "--file", str(hb)], capture_output=True, timeout=30)
    assert res.returncode == 0 and proc.poll() is None


def test_status_command(cluster):
    out = subprocess.run([*PYWORKER, "status"], env={**os.environ, **cluster.env},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "2 worker(s) alive" in out.stdout


def test_status_without_configuration_says_what_to_set():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYWORKER_")}
    out = subprocess.run([*PYWORKER, "status"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "PYWORKER_REDIS_URL" in out.stderr
    assert "Traceback" not in out.stderr


def _start_local(args, timeout_s=90):
    proc = subprocess.Popen([*PYWORKER, "local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C" in line:
            return proc, "".join(lines)
    proc.kill()
    pytest.fail("pyworker local did not come up:\n" + "".join(lines))


def test_local_prints_how_to_connect_and_stops_everything_on_ctrl_c():
    proc, out = _start_local(["--workers", "2"])
    env = dict(re.findall(r"export (PYWORKER_\w+)=(\S+)", out))
    assert set(env) == {"PYWORKER_REDIS_URL", "PYWORKER_REDIS_PASSWORD", "PYWORKER_SECRET"}
    script = "from pyworker import pmap; print(pmap(lambda x: x * 3, range(4)))"
    res = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60)
    assert res.stdout.strip() == "[0, 3, 6, 9]", res.stderr
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    from pyworker import connection as resp
    with pytest.raises(OSError):  # Redis is gone with it
        resp.Redis(env["PYWORKER_REDIS_URL"], password=env["PYWORKER_REDIS_PASSWORD"],
                   connect_timeout=1).call("PING")


def test_local_replaces_a_worker_that_dies_and_keeps_running():
    """A worker killed (a segfault past the executor, the OOM killer) does not take Redis, the
    other workers or JupyterLab down with it: pyworker local starts another and goes on."""
    import pyworker
    proc, out = _start_local(["--workers", "2"])
    try:
        env = dict(re.findall(r"export (PYWORKER_\w+)=(\S+)", out))
        client = pyworker.Client(pyworker.Settings.from_env(environ=env))
        before = {int(w["pid"]) for w in pyworker.status(client).alive}
        assert len(before) == 2
        os.kill(min(before), signal.SIGKILL)

        def replaced():
            now = {int(w["pid"]) for w in pyworker.status(client).alive}
            return len(now - before) == 1 and max(before) in now

        wait_until(replaced, 30, "a new worker in place of the killed one")
        assert proc.poll() is None, "pyworker local stopped"
        assert pyworker.pmap(lambda x: -x, range(3), client=client, timeout=30) == [0, -1, -2]
        client.close()
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0
    assert "exited with signal 9; starting another" in rest, rest


def test_local_lab_serves_jupyterlab_with_a_token():
    import importlib.util
    need(importlib.util.find_spec("jupyterlab"), "jupyterlab is not installed (pip install "
                                                  "'.[lab]')")
    proc, out = _start_local(["--workers", "1", "--lab"])
    try:
        url = re.search(r"Open JupyterLab: (http://127\.0\.0\.1:\d+)/lab\?token=(\S+)", out)
        assert url, out
        base, token = url.groups()
        with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=10) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/api/status", timeout=10)
        assert info.value.code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_local_lab_without_jupyterlab_says_what_to_install(tmp_path):
    """A Python where pyworker and its dependencies are importable and JupyterLab is not (no
    site-packages: `-S`; pyworker, cloudpickle and tqdm through PYTHONPATH), with a `jupyter`
    command on PATH all the same: one line says what to install, before Redis or a worker starts."""
    import importlib.util
    shim = tmp_path / "site"
    shim.mkdir()
    for name in ("pyworker", "cloudpickle", "tqdm"):
        spec = importlib.util.find_spec(name)
        (shim / name).symlink_to(os.path.dirname(spec.origin))
    probe = subprocess.run([sys.executable, "-S", "-c", "import jupyterlab"], timeout=30,
                           env={**os.environ, "PYTHONPATH": str(shim)}, capture_output=True)
    assert probe.returncode != 0, "jupyterlab is importable without site-packages"
    jupyter = tmp_path / "bin" / "jupyter"  # a `jupyter` of another Python on PATH
    jupyter.parent.mkdir()
    jupyter.write_text("#!/bin/sh\nexit 0\n")
    jupyter.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(shim),
           "PATH": f"{jupyter.parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-S", "-m", "pyworker", "local", "--workers", "1",
                          "--lab"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stdout == ""  # nothing started: no "starting Redis" line
    assert res.stderr.count("\n") == 1 and "pip install 'pyworker[lab]'" in res.stderr, res.stderr
    assert time.monotonic() - t0 < 20


def test_a_worker_or_healthcheck_start_imports_nothing_of_the_callers_side():
    """Workers and healthchecks start through the package: its API modules (and ssl, urllib,
    html) load only when used, so that every pod and local worker starts sooner."""
    code = ("import sys, pyworker.cli, pyworker.worker; "
            "print(' '.join(m for m in ('pyworker.api', 'pyworker.client', 'pyworker.local') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"imported at a worker's start: {r.stdout}"
    # ...and the package still offers everything on first use
    code = ("import pyworker; from pyworker import *; "
            "print(pmap.__module__, LocalCluster.__module__, Client.__module__, status.__module__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["pyworker.api", "pyworker.local", "pyworker.client",
                                "pyworker.status"], r.stderr
