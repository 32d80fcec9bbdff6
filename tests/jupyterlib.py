"""A small Jupyter client for the tests: REST calls with urllib, and a kernel driven over the
websocket channels API (websocket-client, of the `test` extra). Used by tests/image, tests/e2e
(through imagelib) and tests/test_make_demo.py."""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

# Only this host (loopback, test containers) is contacted: no proxy from the environment may be used.
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

    def __init__(self, base_url: str, token: str, timeout_s: float = 60.0, path: str | None = None):
        """path: the folder (relative to the server's root) the kernel runs in, as for a
        notebook there ("" for the root); None: the server's own working directory."""
        import websocket  # websocket-client (the `test` extra)

        status, body = http("POST", f"{base_url}/api/kernels", token,
                            {"name": "python3", **({"path": path} if path is not None else {})})
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
