"""What a new kernel runs: pmap with no import and no set-up, and never a broken kernel."""
import os
import subprocess
import sys

from support import need


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
           "PYWORKER_SECRET": "test-secret-16-bytes"}
    out = _ipython("print(6 * 7); print(callable(pmap))", env)
    assert out.returncode == 0
    assert out.stdout.split() == ["42", "True"]
    lines = [line for line in out.stderr.splitlines() if "pyworker" in line]
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], out.stderr


def test_no_configuration_prints_what_to_do():
    out = _ipython("print('ok')", _clean_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok"
    assert "pyworker.connect(" in out.stderr


def test_a_real_jupyter_kernel_started_like_local_lab_has_pmap(cluster, tmp_path):
    """`pyworker local --lab` starts kernels with PYTHONSTARTUP pointing at this file."""
    import importlib.util
    need(importlib.util.find_spec("jupyter_client") and importlib.util.find_spec("ipykernel"),
         "jupyter_client and ipykernel are not installed (pip install '.[lab]')")
    from jupyter_client.manager import start_new_kernel

    from pyworker.startup import write_startup_file

    env = {**_clean_env(), **cluster.env, "PYTHONSTARTUP": write_startup_file(str(tmp_path))}
    km, kc = start_new_kernel(kernel_name="python3", env=env, startup_timeout=60)
    try:
        outputs = []
        reply = kc.execute_interactive(
            "print(pmap(lambda x: x * 2, range(4)))", timeout=60,
            output_hook=lambda msg: outputs.append(msg["content"].get("text", "")))
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "[0, 2, 4, 6]" in "".join(outputs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
