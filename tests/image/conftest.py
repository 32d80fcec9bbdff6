"""Session fixtures for the image tests: build the images once (ci/build-image.sh skips an image
whose inputs did not change), then an internal test network (nothing on it reaches beyond it)
with our Redis (password on), two worker containers and a JupyterLab container.

Every container and network is removed by a finalizer (PYWORKER_KEEP_CONTAINERS=1 keeps them for
debugging; they carry the label io.pyworker.test=image). PYWORKER_IMAGE_BUILD=0 tests the images
as they are, without building. Missing docker skips, or fails under PYWORKER_REQUIRE_ALL=1."""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from imagelib import (BASE_IMG, BUILD_TIMEOUT_S, IMG, REDIS_IMG, REPO, TEST_LABEL, container_logs,
                      docker, docker_available, http, remove_container, unique, wait_for)

KEEP = os.environ.get("PYWORKER_KEEP_CONTAINERS") == "1"
N_WORKERS = 2


def _cleanup(request, fn, *args):
    if not KEEP:
        request.addfinalizer(lambda: fn(*args))


@pytest.fixture(scope="session")
def docker_engine(need_fn):
    ok, detail = docker_available()
    need_fn(ok, detail)
    return detail


@pytest.fixture(scope="session")
def images(docker_engine, request):
    """Build (or reuse, when built from the same inputs) the pyworker and Redis images."""
    if os.environ.get("PYWORKER_IMAGE_BUILD", "1") != "0":
        env = dict(os.environ, IMG=IMG, REDIS_IMG=REDIS_IMG, BASE_IMG=BASE_IMG)
        capman = request.config.pluginmanager.getplugin("capturemanager")
        start = time.monotonic()
        with capman.global_and_fixture_disabled():  # show the build's progress live
            print(f"\n[tests/image] building images (ci/build-image.sh all, at most "
                  f"{BUILD_TIMEOUT_S:.0f}s)", file=sys.stderr, flush=True)
            r = subprocess.run(["bash", str(REPO / "ci" / "build-image.sh"), "all"], env=env,
                               cwd=REPO, timeout=BUILD_TIMEOUT_S)
            print(f"[tests/image] images ready in {time.monotonic() - start:.0f}s",
                  file=sys.stderr, flush=True)
        assert r.returncode == 0, "ci/build-image.sh all failed (its output is above)"
    for name in (IMG, REDIS_IMG):
        assert docker("image", "inspect", name, check=False).returncode == 0, f"{name} missing"
    return {"pyworker": IMG, "redis": REDIS_IMG}


@pytest.fixture(scope="session")
def network(images, request):
    """A user-defined bridge network; containers find each other by name on it. Internal:
    nothing on it can reach beyond it (this host still reaches its containers' addresses)."""
    name = unique("net")
    docker("network", "create", "--internal", "--label", TEST_LABEL, name)
    _cleanup(request, docker, "network", "rm", name)  # runs after the containers' finalizers
    return name


def run_container(request, name, *args, image, command=()):
    """docker run -d with our label; removed at the end of the session."""
    _cleanup(request, remove_container, name)
    docker("run", "-d", "--name", name, "--label", TEST_LABEL, *args, image, *command)
    return name


@pytest.fixture(scope="session")
def redis_server(network, request):
    """Our Redis image on the test network, password required."""
    password = secrets.token_hex(16)
    # The image's ENTRYPOINT is tini -- redis-server: the command is redis-server's arguments.
    name = run_container(request, unique("redis"), "--network", network, image=REDIS_IMG,
                         command=["--bind", "0.0.0.0", "--requirepass", password, "--save", ""])

    def pong():
        r = docker("exec", "-e", f"REDISCLI_AUTH={password}", name, "redis-cli", "ping",
                   check=False, timeout=15)
        return r.stdout.strip() == "PONG"

    wait_for(pong, 30, f"{name} to answer PING", on_fail=lambda: container_logs(name))
    return {"name": name, "password": password, "url": f"redis://{name}:6379/0"}


@pytest.fixture(scope="session")
def pyworker_env(redis_server):
    """The PYWORKER_* settings that the chart gives workers and JupyterLab."""
    return {"PYWORKER_REDIS_URL": redis_server["url"],
            "PYWORKER_REDIS_PASSWORD": redis_server["password"],
            "PYWORKER_SECRET": secrets.token_hex(32)}


def env_args(env: dict) -> list[str]:
    return [a for k, v in env.items() for a in ("-e", f"{k}={v}")]


@pytest.fixture(scope="session")
def workers(network, redis_server, pyworker_env, request):
    """N_WORKERS containers running `pyworker worker` (hostname = container name)."""
    names = []
    for _ in range(N_WORKERS):
        name = unique("worker")
        run_container(request, name, "--network", network, "--hostname", name,
                      *env_args({**pyworker_env, "PYWORKER_WORKER_NAME": name}),
                      image=IMG, command=["pyworker", "worker"])
        names.append(name)
    return names


@pytest.fixture(scope="session")
def lab(network, workers, pyworker_env, request):
    """JupyterLab (the image's default command) with its token from JUPYTER_TOKEN, reached at
    its address on the internal test network (an internal network publishes no ports).
    Returns base_url, token and the container name."""
    token = secrets.token_hex(24)
    name = run_container(request, unique("lab"), "--network", network, "--hostname", "lab",
                         *env_args({**pyworker_env, "JUPYTER_TOKEN": token}), image=IMG)
    address = '{{(index .NetworkSettings.Networks "%s").IPAddress}}' % network
    ip = docker("inspect", "-f", address, name).stdout.strip()
    assert ip, f"{name} has no address on {network}"
    base_url = f"http://{ip}:8888"
    wait_for(lambda: http("GET", f"{base_url}/api", token, timeout=3)[0] == 200, 60,
             "JupyterLab to answer /api", on_fail=lambda: container_logs(name))
    return {"base_url": base_url, "token": token, "name": name}
