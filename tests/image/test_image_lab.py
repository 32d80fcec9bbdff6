"""JupyterLab in the image: token auth, and a kernel that has pmap and runs it on 2 workers."""
import json

import pytest

from imagelib import BUILD_TIMEOUT_S, Kernel, container_logs, docker, http

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 240)


def test_lab_api_needs_the_token(lab):
    base, token = lab["base_url"], lab["token"]
    status, body = http("GET", f"{base}/api", token)
    assert status == 200 and "version" in body
    # /api itself only tells the server version; everything under it needs the token
    for path in ("/api/status", "/api/kernels", "/api/contents"):
        assert http("GET", f"{base}{path}")[0] == 403, path
        assert http("GET", f"{base}{path}", "wrong-token")[0] == 403, path
        assert http("GET", f"{base}{path}", token)[0] == 200, path
    assert http("GET", f"{base}/lab?token={token}")[0] == 200


def test_lab_neither_fetches_news_nor_checks_for_updates(lab):
    """No outside calls from the Lab: the settings say so (no opt-in toast either) and the server
    runs with the news feed and the PyPI update check switched off."""
    base, token = lab["base_url"], lab["token"]
    status, body = http("GET", f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification", token)
    assert status == 200, body
    # overrides.json becomes the schema's defaults
    defaults = {k: v.get("default") for k, v in body["schema"]["properties"].items()}
    assert defaults["fetchNews"] == "false" and defaults["checkForUpdates"] is False, defaults
    cmdline = docker("exec", lab["name"], "bash", "-c", "tr '\\0' ' ' </proc/1/cmdline").stdout
    assert "--LabApp.news_url=None" in cmdline and "NeverCheckForUpdate" in cmdline, cmdline


def test_lab_token_not_on_the_command_line(lab):
    r = docker("exec", lab["name"], "bash", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
    assert lab["token"] not in r.stdout


def test_lab_container_is_uid_1000_under_tini(lab):
    top = docker("exec", lab["name"], "bash", "-c",
                 'id -u; tr "\\0" " " </proc/1/cmdline').stdout.splitlines()
    assert top[0] == "1000"
    assert top[1].startswith("/usr/bin/tini -g -- jupyter lab")


@pytest.fixture
def kernel(lab):
    k = Kernel(lab["base_url"], lab["token"])
    yield k
    k.close()


def test_new_kernel_has_pmap_without_import(kernel):
    out = kernel.execute(
        "import json\n"
        "names = [n for n in ('pmap', 'imap', 'executor') if n in globals()]\n"
        "print(json.dumps({'names': names,\n"
        "                  'module': pmap.__module__,\n"
        "                  'loaded': sorted(get_ipython().extension_manager.loaded)}))\n")
    assert out["status"] == "ok", out
    info = json.loads(out["stdout"].strip().splitlines()[-1])
    assert info["names"] == ["pmap", "imap", "executor"]
    assert info["module"].startswith("pyworker")
    assert "pyworker.startup" in info["loaded"]  # loaded by /opt/venv/etc/ipython config


def test_pmap_in_kernel_runs_on_the_workers(kernel, workers):
    out = kernel.execute(
        "import json, socket\n"
        "squares = pmap(lambda x: x * x, range(40), timeout=60)\n"
        "hosts = sorted(set(pmap(lambda _: socket.gethostname(), range(40), chunksize=1,\n"
        "                        timeout=60)))\n"
        "print(json.dumps({'squares': squares, 'hosts': hosts, 'me': socket.gethostname()}))\n",
        timeout_s=150)
    logs = "\n".join(f"--- {w} ({container_state(w)}):\n{container_logs(w, 30)}" for w in workers)
    assert out["status"] == "ok", f"{out}\n{logs}"
    result = json.loads(out["stdout"].strip().splitlines()[-1])
    assert result["squares"] == [x * x for x in range(40)]
    # the work ran in the worker containers, not in the kernel
    assert result["hosts"] and set(result["hosts"]) <= set(workers), result
    assert result["me"] not in result["hosts"]


def container_state(name):
    return docker("inspect", "--format", "{{.State.Status}} exit={{.State.ExitCode}}", name,
                  check=False).stdout.strip()
