"""The pyworker and Redis images on their own: user, PID 1, commands, what is (not) inside."""
import re

import pytest

from imagelib import (BUILD_TIMEOUT_S, IMG, REDIS_IMG, REPO, TEST_LABEL, container_logs, docker,
                      remove_container, unique, wait_for)

# The first test builds the images in its set-up (session fixture).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 120)


def run(image, script, *args):
    return docker("run", "--rm", "--network", "none", *args, "--entrypoint", "/usr/bin/tini",
                  image, "--", "bash", "-ec", script, timeout=90)


def expected_version():
    text = (REPO / "pyworker" / "_version.py").read_text()
    return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)


def test_pyworker_version_runs_as_uid_1000_under_tini(images):
    # the image's own ENTRYPOINT (tini) and a command, as a pod's `args:` would run it
    r = docker("run", "--rm", "--network", "none", IMG, "bash", "-ec",
               'id -u; id -g; tr "\\0" " " </proc/1/cmdline; echo; pyworker --version', timeout=90)
    uid, gid, pid1, version = r.stdout.strip().splitlines()
    assert (uid, gid) == ("1000", "1000")
    assert pid1.split()[0] == "/usr/bin/tini", pid1
    assert version == f"pyworker {expected_version()}"


def test_pyworker_image_config(images):
    cfg = docker("image", "inspect", "--format",
                 "{{.Config.User}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}", IMG).stdout
    user, entrypoint, cmd = cfg.strip().split("|")
    assert user == "1000:1000"  # numeric: runAsNonRoot can verify it
    assert entrypoint == '["/usr/bin/tini","-g","--"]'
    assert '"jupyter","lab"' in cmd and "token" not in cmd.lower()


def test_home_is_writable_and_venv_is_not(images):
    r = docker("run", "--rm", "--network", "none", IMG, "bash", "-ec", """
        echo "$HOME"; touch ~/work/probe && echo home-ok
        test -w /opt/venv/lib && echo venv-writable || echo venv-read-only
        python -c 'import sys; print(sys.prefix)'
    """, timeout=90)
    assert r.stdout.split() == ["/home/jovyan", "home-ok", "venv-read-only", "/opt/venv"]


def test_kernel_config_loads_pyworker_startup(images):
    r = docker("run", "--rm", "--network", "none", IMG, "python", "-c", """
import os, sys
from IPython.paths import get_ipython_dir
from traitlets.config.loader import PyFileConfigLoader
path = os.path.join(sys.prefix, "etc", "ipython")
cfg = PyFileConfigLoader("ipython_kernel_config.py", path).load_config()
print(list(cfg.InteractiveShellApp.extensions))
import pyworker.startup as s; print(callable(s.load_ipython_extension))
""", timeout=90)
    assert r.stdout.split("\n")[:2] == ["['pyworker.startup']", "True"]


def test_locked_versions_installed(images):
    """The venv holds exactly the pins of image/requirements.lock (plus pyworker)."""
    lock = {}
    for line in (REPO / "image" / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    for required in ("jupyterlab", "redis", "hiredis", "cloudpickle", "tqdm", "ipywidgets", "numpy",
                     "joblib", "scikit-learn"):
        assert required in lock, f"{required} not pinned in image/requirements.lock"
    out = docker("run", "--rm", "--network", "none", IMG, "pip", "list", "--format", "freeze",
                 timeout=90).stdout
    installed = {n.lower().replace("_", "-"): v for n, v in
                 (line.split("==") for line in out.split() if "==" in line)}
    assert installed.pop("pyworker") == expected_version()
    assert installed == lock


def test_no_secrets_or_host_files_baked_in(images):
    r = run(IMG, r"""
        # as root, so that find sees everything
        ls /tmp /home/jovyan/work | grep -v ':$' | grep . || true
        find / -xdev \( -name '*.pem' -o -name '*.crt' -o -name 'pip.conf' -o -name '.netrc' \) \
            -not -path '/opt/venv/lib/*/site-packages/*' -not -path '/usr/share/*' -print
        env | grep -iE '^(pip_cert|pip_index|.*proxy|.*_token|.*secret|.*password)=' || true
    """, "--user", "0")
    assert r.stdout.strip() == "", f"unexpected files or settings in {IMG}:\n{r.stdout}"
    hist = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMG).stdout
    assert "PIP_CERT" not in hist and "ca.crt" not in hist


def test_redis_image(images):
    r = run(REDIS_IMG, """
        id -u; id -g; command -v redis-server redis-cli
        redis-server --version | grep -o 'v=[0-9.]*'
    """)
    uid, gid, server, cli, version = r.stdout.split()
    assert (uid, gid) == ("999", "999")
    assert server.endswith("/redis-server") and cli.endswith("/redis-cli")
    assert version.startswith("v=")
    cfg = docker("image", "inspect", "--format", "{{.Config.User}} {{json .Config.Entrypoint}}",
                 REDIS_IMG).stdout.strip()
    assert cfg == '999:999 ["/usr/bin/tini","--","redis-server"]'


def test_redis_runs_under_tini_with_password(images):
    """The image's own entrypoint, arguments for redis-server, as the chart runs it."""
    name = unique("redis-solo")
    docker("run", "-d", "--name", name, "--label", TEST_LABEL, "--network", "none", REDIS_IMG,
           "--requirepass", "pw", "--save", "")
    try:
        def cli(*args):
            return docker("exec", name, "redis-cli", *args, check=False, timeout=15).stdout.strip()

        wait_for(lambda: cli("-a", "pw", "--no-auth-warning", "ping") == "PONG", 30,
                 "redis to answer", on_fail=lambda: container_logs(name))
        assert "NOAUTH" in cli("ping")
        pid1 = docker("exec", name, "cat", "/proc/1/cmdline").stdout.split("\0")
        assert pid1[:3] == ["/usr/bin/tini", "--", "redis-server"], pid1
        assert docker("exec", name, "id", "-u").stdout.strip() == "999"
    finally:
        remove_container(name)
