"""Helpers for the image tests: docker CLI calls with time bounds, throwaway names, and a small
Jupyter client (REST with urllib, kernel messages over the websocket channels API)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

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


# --- Jupyter ------------------------------------------------------------------------------------

# Only this host's test containers are contacted: no proxy from the environment may be used.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(method: str, url: str, token: str | None = None, body=None, timeout: float = 10.0):
    """Returns (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"token {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class Kernel:
    """One kernel started through the REST API, driven over /api/kernels/<id>/channels."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0):
        import websocket  # websocket-client; ci/setup-image.sh installs it

        status, body = http("POST", f"{base_url}/api/kernels", token, {"name": "python3"})
        assert status == 201, f"POST /api/kernels: {status} {body}"
        self.base_url, self.token, self.id = base_url, token, body["id"]
        ws_url = base_url.replace("http://", "ws://") + f"/api/kernels/{self.id}/channels"
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"{ws_url}?session_id={self.session}", timeout=timeout_s,
            header=[f"Authorization: token {token}"], suppress_origin=True,
            http_no_proxy=[urllib.parse.urlsplit(base_url).hostname])

    def execute(self, code: str, timeout_s: float = 90.0) -> dict:
        """Run code; returns {'status', 'stdout', 'stderr', 'error'} once the kernel is idle."""
        import websocket
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": self.session,
                       "username": "test", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        out = {"status": None, "stdout": "", "stderr": "", "error": None}
        idle = False
        deadline = time.monotonic() + timeout_s
        while not (idle and out["status"]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"kernel did not finish within {timeout_s:.0f}s: {out}")
            # Short reads: the server's websocket pings (every 30 s) would restart a long one.
            self.ws.settimeout(min(remaining, 2.0))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["header"]["msg_type"], msg["content"]
            if kind == "stream":
                out[content["name"]] += content["text"]
            elif kind == "error":
                out["error"] = f"{content['ename']}: {content['evalue']}\n" + "\n".join(
                    content.get("traceback", []))
            elif kind == "execute_reply":
                out["status"] = content["status"]
            elif kind == "status" and content["execution_state"] == "idle":
                idle = True
        return out

    def close(self):
        try:
            self.ws.close()
        finally:
            http("DELETE", f"{self.base_url}/api/kernels/{self.id}", self.token)
