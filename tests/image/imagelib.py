"""Helpers for the image tests: docker CLI calls with time bounds and throwaway names; the
Jupyter client (REST, kernel messages over websocket) is jupyterlib's, offered here too."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from jupyterlib import Kernel, http  # noqa: F401 - tests/image and tests/e2e use them from here

REPO = Path(__file__).resolve().parents[2]
IMG = os.environ.get("IMG", "pyworker/pyworker:dev")
REDIS_IMG = os.environ.get("REDIS_IMG", "pyworker/redis:dev")
BASE_IMG = os.environ.get("BASE_IMG", "pyworker/base:bookworm-slim")
# Everything the tests create carries this label (and a pyworker-test- name prefix).
TEST_LABEL = "io.pyworker.test=image"
# From an empty ~/.cache the build takes ~5 min on 2 cores; with cached base and wheels ~1-2 min.
BUILD_TIMEOUT_S = float(os.environ.get("PYWORKER_IMAGE_BUILD_TIMEOUT_S", "1800"))
DOCKER_TIMEOUT_S = 120


def docker_available() -> tuple[bool, str]:
    if not shutil.which("docker"):
        return False, "docker CLI not found: run `bash ci/setup-image.sh`"
    try:
        r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False, "docker info timed out"
    if r.returncode != 0:
        return False, "no Docker engine answers: run `bash ci/start-dockerd.sh`"
    return True, r.stdout.strip()


def docker(*args, check=True, timeout=DOCKER_TIMEOUT_S, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                       input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return r


def unique(kind: str) -> str:
    return f"pyworker-test-{kind}-{uuid.uuid4().hex[:8]}"


def remove_container(name: str) -> None:
    docker("rm", "-f", "-v", name, check=False, timeout=60)


def container_logs(name: str, tail: int = 60) -> str:
    r = docker("logs", "--tail", str(tail), name, check=False, timeout=30)
    return (r.stdout + r.stderr).strip()


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.3, on_fail=None):
    """Poll predicate() until it returns something truthy; fail after timeout_s with context."""
    deadline = time.monotonic() + timeout_s
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last error
            last_exc = exc
        time.sleep(interval_s)
    extra = on_fail() if on_fail else ""
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}"
                         f" (last error: {last_exc!r})\n{extra}")
