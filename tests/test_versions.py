"""The version check (versions.py) with real workers whose environments really differ: a package
the test makes, installed (a dist-info folder on a PYTHONPATH) at 1.0 for the caller and at 2.0
on one worker; a worker whose cloudpickle reports another version (a copy of the real one); a
worker of another pyworker protocol (a copy of pyworker whose PROTOCOL_VERSION is 2)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest

import pyworker
from pyworker import protocol, serialize, versions
from support import redis_keys, wait_until

PKG, OTHER_DIST, OTHER_MOD = "pwvercheck", "pw-other-dist", "pwothermod"


def _install(folder, dist, version, module):
    """A distribution as pip leaves it: the module, and <dist>-<version>.dist-info with
    METADATA, RECORD and top_level.txt."""
    pkg = folder / module
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    (info / "RECORD").write_text(f"{module}/__init__.py,,\n{info.name}/METADATA,,\n"
                                 f"{info.name}/RECORD,,\n")


def _env_folder(tmp_path, name, version):
    folder = tmp_path / name
    _install(folder, PKG, version, PKG)
    _install(folder, OTHER_DIST, version, OTHER_MOD)
    return folder


# The caller: a process of its own (a notebook's kernel), its packages on its PYTHONPATH.
CALLER = textwrap.dedent('''
    import json, os, sys, time, warnings
    import pyworker, pwvercheck, pwothermod

    STARTED, GO = sys.argv[2], sys.argv[3]

    def uses(x):
        if GO:  # hold every task until the test says go
            open(STARTED, "a").close()
            deadline = time.time() + 60
            while not os.path.exists(GO) and time.time() < deadline:
                time.sleep(0.02)
        return pwvercheck.VERSION + "/" + pwothermod.VERSION

    out = []
    for _ in range(int(sys.argv[1])):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", pyworker.VersionMismatchWarning)
            values = pyworker.pmap(uses, range(8), chunksize=1, timeout=90)
        out.append({"values": sorted(set(values)),
                    "warnings": [str(w.message) for w in got
                                 if issubclass(w.category, pyworker.VersionMismatchWarning)],
                    "where": sorted({os.path.basename(w.filename) for w in got})})
    print(json.dumps(out))
''')


def _run_caller(cluster, tmp_path, folder, jobs=1, started="", go=""):
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(folder)}
    proc = subprocess.run([sys.executable, str(script), str(jobs), started, go], env=env,
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _live(cluster, n):
    wait_until(lambda: cluster.client.live_workers(max_age_s=0) >= n, 30, f"{n} live workers")
    return {w["id"]: w for w in pyworker.status(cluster.client).alive}


def _assert_named(message, odd_id, same_id):
    assert f"this caller has {PKG} 1.0" in message, message
    assert f"worker {odd_id} (1 of 2 live) has 2.0" in message, message
    assert same_id not in message, message
    assert f'pyworker.pip_install("{PKG}==1.0")' in message, message


def test_a_package_of_another_version_on_one_worker_is_named_with_its_fix(make_cluster,
                                                                         tmp_path):
    same, odd = _env_folder(tmp_path, "same", "1.0"), _env_folder(tmp_path, "odd", "2.0")
    cluster = make_cluster(0, worker_env={"PYTHONPATH": str(same)})
    cluster.add_worker("same")
    (same_id,) = _live(cluster, 1)
    # the same versions everywhere: no warning
    (job,) = _run_caller(cluster, tmp_path, same)
    assert job == {"values": ["1.0/1.0"], "warnings": [], "where": []}

    cluster.add_worker("odd", env={"PYTHONPATH": str(odd)})
    workers = _live(cluster, 2)
    (odd_id,) = set(workers) - {same_id}
    assert f"{PKG}==2.0" in workers[odd_id]["packages"].split()
    assert workers[odd_id]["env"] != workers[same_id]["env"]
    jobs = _run_caller(cluster, tmp_path, same, jobs=2)
    for job in jobs:  # once per job and package (each job says it again)
        ours, other = sorted(job["warnings"], key=lambda m: OTHER_MOD in m)
        _assert_named(ours, odd_id, same_id)
        # a module whose distribution has another name: found by its RECORD
        assert f"uses {OTHER_MOD} (distribution {OTHER_DIST})" in other, other
        assert f'pyworker.pip_install("{OTHER_DIST}==1.0")' in other, other
        assert job["where"] == ["caller.py"]  # attributed to the user's pmap call


def test_a_worker_that_joins_during_a_job_is_checked_by_its_first_result(make_cluster,
                                                                         tmp_path):
    same, odd = _env_folder(tmp_path, "same", "1.0"), _env_folder(tmp_path, "odd", "2.0")
    cluster = make_cluster(0, worker_env={"PYTHONPATH": str(same)})
    cluster.add_worker("same")
    (same_id,) = _live(cluster, 1)
    started, go = tmp_path / "started", tmp_path / "go"
    out = {}

    def caller():
        out["jobs"] = _run_caller(cluster, tmp_path, same, started=str(started), go=str(go))

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        # the job runs (its first task waits for go), checked against the first worker only
        wait_until(started.exists, 60, "the job's first task to start")
        cluster.add_worker("odd", env={"PYTHONPATH": str(odd)})
        (odd_id,) = set(_live(cluster, 2)) - {same_id}
        # it took a task of the queued ones as soon as it started
        wait_until(lambda: any(w.get("current") for w in
                               pyworker.status(cluster.client).alive if w["id"] == odd_id),
                   30, "the new worker to take a task")
    finally:
        go.touch()
        thread.join(120)
    (job,) = out["jobs"]
    assert "2.0/2.0" in job["values"]
    assert len(job["warnings"]) == 2, job  # once per package, not once per result
    _assert_named(next(m for m in job["warnings"] if OTHER_MOD not in m), odd_id, same_id)


def _altered_copy(source_dir, target, edits):
    """A copy of an installed package with some lines changed (each edit must apply)."""
    shutil.copytree(source_dir, target, ignore=shutil.ignore_patterns("__pycache__"))
    for relative, (old, new) in edits.items():
        path = target / relative
        text = path.read_text()
        assert old in text, (path, old)
        path.write_text(text.replace(old, new))


def _job_ran(marker):
    def fn(x):
        open(marker, "a").close()
        return x
    return fn


def test_a_worker_with_another_cloudpickle_fails_the_job_before_any_item_runs(make_cluster,
                                                                              tmp_path):
    import cloudpickle
    alt = tmp_path / "alt"
    _altered_copy(os.path.dirname(cloudpickle.__file__), alt / "cloudpickle",
                  {"__init__.py": (f'__version__ = "{cloudpickle.__version__}"',
                                   '__version__ = "9.9.9"')})
    cluster = make_cluster(1)
    cluster.add_worker("oldpickle", env={"PYTHONPATH": str(alt)})
    workers = _live(cluster, 2)
    (odd_id,) = [w for w, info in workers.items() if info["cloudpickle"] == "9.9.9"]
    marker = tmp_path / "ran"
    with pytest.raises(pyworker.VersionMismatchError) as info:
        pyworker.pmap(_job_ran(str(marker)), [1, 2, 3], client=cluster.client, timeout=30)
    text = str(info.value)
    assert f"worker {odd_id} (1 of 2 live) runs Python" in text, text
    assert "cloudpickle 9.9.9" in text and f"cloudpickle {cloudpickle.__version__}" in text
    assert "%pip install cloudpickle==9.9.9" in text and "Nothing of the job was sent" in text
    assert not marker.exists()
    assert redis_keys(cluster, f"{cluster.client.broker.keys.prefix}:job:*") == []


def _other_protocol(tmp_path):
    alt = tmp_path / "alt"
    _altered_copy(os.path.dirname(pyworker.__file__), alt / "pyworker", {
        "_version.py": (f'__version__ = "{pyworker.__version__}"', '__version__ = "9.9.9"'),
        "protocol.py": (f"PROTOCOL_VERSION = {protocol.PROTOCOL_VERSION}\n",
                        "PROTOCOL_VERSION = 2\n"),
    })
    return alt


def test_a_worker_of_another_protocol_is_a_version_error_not_a_key_error(make_cluster,
                                                                        tmp_path):
    # (another working directory: a worker's own folder comes first on its path)
    cluster = make_cluster(0, worker_cwd=str(tmp_path))
    cluster.add_worker("newer", env={"PYTHONPATH": str(_other_protocol(tmp_path))})
    (info,) = _live(cluster, 1).values()
    assert (info["pyworker"], info["protocol"]) == ("9.9.9", "2")  # it runs the copy
    with pytest.raises(pyworker.VersionMismatchError) as exc:
        pyworker.pmap(abs, [-1], client=cluster.client, timeout=30)
    text = str(exc.value)
    assert f"runs Python {serialize.PYTHON_VERSION}" in text
    assert "pyworker 9.9.9 (protocol 2)" in text, text
    assert f"pyworker {pyworker.__version__} (protocol {protocol.PROTOCOL_VERSION})" in text
    assert "%pip install pyworker==9.9.9" in text


def test_a_worker_of_another_pyworker_version_of_the_same_protocol_is_a_warning(make_cluster,
                                                                              tmp_path):
    alt = tmp_path / "alt"
    _altered_copy(os.path.dirname(pyworker.__file__), alt / "pyworker", {
        "_version.py": (f'__version__ = "{pyworker.__version__}"', '__version__ = "9.9.9"')})
    cluster = make_cluster(0, worker_cwd=str(tmp_path))
    cluster.add_worker("newer", env={"PYTHONPATH": str(alt)})
    (odd_id,) = _live(cluster, 1)
    for _ in range(2):  # each job says it
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", pyworker.VersionMismatchWarning)
            assert pyworker.pmap(abs, [-1, -2], client=cluster.client, timeout=30) == [1, 2]
        (warning,) = [str(w.message) for w in got]
        assert f"this caller runs pyworker {pyworker.__version__}; worker {odd_id} (1 of 1 " \
               "live) has 9.9.9" in warning, warning
        assert os.path.basename(got[0].filename) == "test_versions.py"


def test_a_worker_of_another_protocol_that_joins_a_waiting_job_is_a_version_error(
        make_cluster, tmp_path):
    """It cannot verify the job's tasks and gives them back (as a worker with another key
    would); the caller, whose every live worker refused, says why from their versions."""
    # (another working directory: a worker's own folder comes first on its path)
    cluster = make_cluster(0, worker_cwd=str(tmp_path))
    out = {}

    def caller():
        try:
            pyworker.pmap(abs, [-1, -2], client=cluster.client, timeout=60)
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=caller)
    thread.start()
    prefix = cluster.client.broker.keys.prefix
    wait_until(lambda: redis_keys(cluster, f"{prefix}:job:*:q"), 30, "the job's queue")
    cluster.add_worker("newer", env={"PYTHONPATH": str(_other_protocol(tmp_path))})
    thread.join(60)
    assert not thread.is_alive()
    error = out.get("error")
    assert isinstance(error, pyworker.VersionMismatchError), repr(error)
    assert "pyworker 9.9.9 (protocol 2)" in str(error) and "The job was cancelled" in str(error)
    log = open(cluster._worker_log(0)).read()
    assert (f"its caller runs pyworker {pyworker.__version__} (protocol "
            f"{protocol.PROTOCOL_VERSION}), this worker pyworker 9.9.9 (protocol 2)") in log, log


def test_versions_of_this_process_and_which_distribution_a_module_is_from(tmp_path,
                                                                         monkeypatch):
    folder = _env_folder(tmp_path, "here", "1.5")
    monkeypatch.syspath_prepend(str(folder))
    versions.forget()
    try:
        import pwothermod
        import pwvercheck
        env = versions.local()
        assert env.packages[PKG] == "1.5" and env.packages[OTHER_DIST] == "1.5"
        assert versions.distribution_of(PKG) == (PKG, "1.5")
        assert versions.distribution_of(OTHER_MOD) == (OTHER_DIST, "1.5")
        assert versions.distribution_of("json") is None

        def fn(x):
            return pwvercheck.VERSION, json.dumps(x)
        # the test module's own modules are shipped; json is the standard library's
        assert versions.function_packages(fn, shipped=False) == ((PKG, PKG, "1.5"),)
        closure = (lambda m: lambda x: m.VERSION)(pwothermod)
        assert versions.function_packages(closure, shipped=False) == (
            (OTHER_MOD, OTHER_DIST, "1.5"),)
        info = env.info()
        assert f"{PKG}==1.5" in info["packages"].split() and len(info["env"]) == 16
    finally:
        for name in (PKG, OTHER_MOD):
            sys.modules.pop(name, None)
        versions.forget()
