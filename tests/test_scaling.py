"""pyworker.scale() and status()'s desired workers, against a local HTTPS server standing in for
the Kubernetes API server: the requests' shape (path, verb, token, patch), TLS checked against the
given CA, and the error messages. (The real API server, RBAC included, is tests/e2e/test_scale_from_lab.py.)"""
import json
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import pyworker
from pyworker import ScalingError, scaling

SCALE = "/apis/apps/v1/namespaces/ns/deployments/par-pyworker-worker/scale"
SCALED_OBJECT = "/apis/keda.sh/v1alpha1/namespaces/ns/scaledobjects/par-pyworker-worker"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 (openssl), and another CA that did not sign it."""
    folder = tmp_path_factory.mktemp("tls")

    def make(name):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt"),
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True, timeout=60)
        return folder / f"{name}.crt", folder / f"{name}.key"
    return make("server"), make("other")


class API:
    """Answers: {(verb, path): (status, body)}; records (verb, path, headers, body)."""

    def __init__(self, cert, key, answers):
        self.answers, self.requests = answers, []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                api.requests.append((self.command, self.path, dict(self.headers), body))
                status, reply = api.answers.get((self.command, self.path),
                                                (404, {"kind": "Status", "message": "not found"}))
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PATCH = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def lab(tls, tmp_path, monkeypatch):
    """A Lab's environment as the chart makes it, pointed at a local API server; yields a
    function that starts the server with the given answers."""
    (cert, key), _ = tls
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("token-1\n")
    (sa / "ca.crt").write_bytes(cert.read_bytes())
    (sa / "namespace").write_text("ns")
    monkeypatch.setattr(scaling, "SA_DIR", str(sa))
    for var in ("PYWORKER_SCALED_OBJECT", "PYWORKER_NAMESPACE", "PYWORKER_WORKER_GROUPS",
                "PYWORKER_AUTOSCALED_GROUPS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYWORKER_WORKER_DEPLOYMENT", "par-pyworker-worker")
    monkeypatch.setenv("PYWORKER_ALLOW_SCALING", "true")
    servers = []

    def start(answers):
        api = API(cert, key, answers)
        servers.append(api)
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
        return api
    start.sa = sa
    yield start
    for api in servers:
        api.close()


def scale_reply(n):
    return {"kind": "Scale", "apiVersion": "autoscaling/v1", "spec": {"replicas": n},
            "status": {"replicas": 2}}


def test_scale_patches_the_worker_deployments_scale(lab):
    api = lab({("PATCH", SCALE): (200, scale_reply(4))})
    assert pyworker.scale(4) == 4
    [(verb, path, headers, body)] = api.requests
    assert (verb, path) == ("PATCH", SCALE)
    assert headers["Authorization"] == "Bearer token-1"
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert body == {"spec": {"replicas": 4}}
    # a rotated token (projected tokens are) is read again for the next call
    (lab.sa / "token").write_text("token-2")
    assert pyworker.scale(0) == 4  # (what the API answered)
    assert api.requests[-1][2]["Authorization"] == "Bearer token-2"
    assert api.requests[-1][3] == {"spec": {"replicas": 0}}


def test_namespace_from_the_environment_first(lab, monkeypatch):
    monkeypatch.setenv("PYWORKER_NAMESPACE", "other")
    api = lab({})
    with pytest.raises(ScalingError, match="no Deployment par-pyworker-worker in namespace other"):
        pyworker.scale(2)
    assert api.requests[0][1] == "/apis/apps/v1/namespaces/other/deployments/par-pyworker-worker/scale"


def test_refused_says_what_the_token_may_do(lab):
    lab({("PATCH", SCALE): (403, {"kind": "Status", "message": 'deployments.apps "par-pyworker-'
                                  'worker" is forbidden: User "system:serviceaccount:ns:x" cannot '
                                  'patch resource "deployments/scale"'})})
    with pytest.raises(ScalingError) as info:
        pyworker.scale(3)
    text = str(info.value)
    assert "refused to PATCH the Deployment par-pyworker-worker in namespace ns: HTTP 403" in text
    assert "cannot patch resource" in text and "lab.allowScaling=true" in text


def test_autoscaling_sets_the_minimum(lab, monkeypatch):
    monkeypatch.setenv("PYWORKER_SCALED_OBJECT", "par-pyworker-worker")
    api = lab({("GET", SCALED_OBJECT): (200, {"spec": {"minReplicaCount": 0, "maxReplicaCount": 6}}),
               ("PATCH", SCALED_OBJECT): (200, {"spec": {"minReplicaCount": 4}}),
               ("GET", SCALE): (200, scale_reply(1))})
    assert pyworker.scale(4) == 4
    assert ("PATCH", SCALED_OBJECT) in [(v, p) for v, p, _, _ in api.requests]
    patch = next(b for v, p, _, b in api.requests if v == "PATCH")
    assert patch == {"spec": {"minReplicaCount": 4}}
    assert not [p for v, p, _, _ in api.requests if v == "PATCH" and p == SCALE]
    with pytest.raises(ValueError, match="above the autoscaler's maximum of 6"):
        pyworker.scale(7)


def test_a_worker_groups_deployment_or_scaled_object(lab, monkeypatch):
    monkeypatch.setenv("PYWORKER_WORKER_GROUPS", "gpu,big")
    monkeypatch.setenv("PYWORKER_AUTOSCALED_GROUPS", "big")
    gpu = SCALE.replace("par-pyworker-worker", "par-pyworker-worker-gpu")
    big = SCALED_OBJECT.replace("par-pyworker-worker", "par-pyworker-worker-big")
    api = lab({("PATCH", gpu): (200, scale_reply(2)),
               ("GET", big): (200, {"spec": {"minReplicaCount": 0, "maxReplicaCount": 8}}),
               ("PATCH", big): (200, {"spec": {"minReplicaCount": 3}}),
               ("GET", SCALE.replace("par-pyworker-worker", "par-pyworker-worker-big")):
                   (200, scale_reply(0))})
    assert pyworker.scale(2, group="gpu") == 2
    assert api.requests[-1][:2] == ("PATCH", gpu) and api.requests[-1][3] == {"spec": {"replicas": 2}}
    assert pyworker.scale(3, group="big") == 3
    assert ("PATCH", big) in [(v, p) for v, p, _, _ in api.requests]
    with pytest.raises(ScalingError, match=r"no worker group 'tpu' \(its groups: default, gpu, big\)"):
        pyworker.scale(1, group="tpu")


def test_scaling_off(lab, monkeypatch):
    api = lab({})
    monkeypatch.setenv("PYWORKER_ALLOW_SCALING", "false")
    with pytest.raises(ScalingError, match=r"scaling from the notebook is off for this release "
                                           r"\(lab.allowScaling=false\).*--set lab.allowScaling=true"):
        pyworker.scale(2)
    assert api.requests == []


def test_no_token(lab):
    lab({})
    (lab.sa / "token").unlink()
    with pytest.raises(ScalingError, match="has no ServiceAccount token.*lab.allowScaling=true"):
        pyworker.scale(2)


def test_not_a_release_lab(monkeypatch):
    monkeypatch.delenv("PYWORKER_WORKER_DEPLOYMENT", raising=False)
    with pytest.raises(ScalingError, match="not one .*kubectl scale deployment"):
        pyworker.scale(2)
    monkeypatch.setenv("PYWORKER_WORKER_DEPLOYMENT", "par-pyworker-worker")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ScalingError, match="not in a Kubernetes pod"):
        pyworker.scale(2)


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True, None])
def test_bad_counts(bad):
    with pytest.raises(ValueError, match="number of workers >= 0"):
        pyworker.scale(bad)


def test_the_servers_certificate_is_checked(lab, tls):
    _, (other, _) = tls
    api = lab({("PATCH", SCALE): (200, scale_reply(4))})
    (lab.sa / "ca.crt").write_bytes(other.read_bytes())  # a CA that did not sign the server's
    with pytest.raises(ScalingError, match="cannot reach the Kubernetes API at https://127.0.0.1"
                                           ".*CERTIFICATE_VERIFY_FAILED"):
        pyworker.scale(4)
    assert api.requests == []


def test_status_shows_desired_workers(lab, cluster):
    lab({("GET", SCALE): (200, scale_reply(5))})
    text = str(pyworker.status())
    assert "2 worker(s) alive of 5 desired" in text
    assert "of 5 desired" in pyworker.status()._repr_html_()


def test_status_leaves_desired_out_elsewhere(cluster, monkeypatch):
    monkeypatch.delenv("PYWORKER_WORKER_DEPLOYMENT", raising=False)
    status = pyworker.status()
    assert status.desired is None and "desired" not in str(status)
