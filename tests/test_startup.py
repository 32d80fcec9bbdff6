"""What a new kernel runs: pmap with no import and no set-up, and never a broken kernel."""
import os
import subprocess
import sys

from conftest import need


def _ipython(code, env):
    import importlib.util
    need(importlib.util.find_spec("IPython"), "IPython is not installed")
    return subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--quick", "--ext", "pyworker.startup",
         "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("PYWORKER_")}


def test_new_ipython_has_pmap_imap_and_executor_with_no_import(cluster):
    code = ("print(pmap(lambda x: x + 1, range(3)));"
            "print(list(imap(abs, [-1, -2])));"
            "print(executor.submit(pow, 2, 8).result(timeout=30))")
    out = _ipython(code, {**_clean_env(), **cluster.env})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[1,", "2,", "3]", "[1,", "2]", "256"]
    assert "2 worker(s) on Redis at" in out.stderr


def test_unreachable_redis_prints_one_line_and_the_kernel_still_works():
    from pyworker.local import free_port
    env = {**_clean_env(), "PYWORKER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "PYWORKER_SECRET": "s"}
    out = _ipython("print(6 * 7); print(callable(pmap))", env)
    assert out.returncode == 0
    assert out.stdout.split() == ["42", "True"]
    lines = [line for line in out.stderr.splitlines() if "pyworker" in line]
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], out.stderr


def test_no_configuration_prints_what_to_do():
    out = _ipython("print('ok')", _clean_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok"
    assert "pyworker.connect(" in out.stderr
