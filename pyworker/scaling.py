"""pyworker.scale(n): set the number of worker pods from the Lab of a pyworker Helm release.

It patches the worker Deployment's ``scale`` subresource through the Kubernetes API, with the
Lab's ServiceAccount token; the chart's Role allows that and nothing else (lab.allowScaling). With
autoscaling on (the chart sets PYWORKER_SCALED_OBJECT), the autoscaler owns the replicas: scale(n)
sets its ScaledObject's minReplicaCount instead. Plain urllib and ssl: no Kubernetes client.

What the chart gives the Lab: PYWORKER_WORKER_DEPLOYMENT, PYWORKER_NAMESPACE (downward API),
PYWORKER_ALLOW_SCALING, PYWORKER_SCALED_OBJECT (with autoscaling), PYWORKER_WORKER_GROUPS and
PYWORKER_AUTOSCALED_GROUPS (workerGroups: group G's Deployment, and its ScaledObject, is named
"<PYWORKER_WORKER_DEPLOYMENT>-G"), and the token under SA_DIR (only with lab.allowScaling).
"""
from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import NamedTuple

from .config import DEFAULT_GROUP
from .errors import ScalingError

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT_S = 10.0
ELSEWHERE = ("elsewhere, scale the workers with `kubectl scale deployment/<release>-pyworker-worker "
             "--replicas=N` or `helm upgrade <release> <chart> --reuse-values --set workers=N`")


class Target(NamedTuple):
    api: str  # https://host:port of the Kubernetes API
    namespace: str
    deployment: str
    scaled_object: str | None
    token_file: str
    ca_file: str


def target(environ=None, sa_dir: str | None = None, group: str | None = None) -> Target:
    """Where scale() would write for worker group ``group`` (None: the default group), from the
    Lab's environment; ScalingError saying why not."""
    env = os.environ if environ is None else environ
    sa_dir = sa_dir or SA_DIR
    deployment = env.get("PYWORKER_WORKER_DEPLOYMENT", "")
    if not deployment:
        raise ScalingError("pyworker.scale() sets the number of workers from the Lab of a pyworker "
                           "Helm release, and this is not one (PYWORKER_WORKER_DEPLOYMENT is not "
                           f"set); {ELSEWHERE}")
    scaled_object = env.get("PYWORKER_SCALED_OBJECT") or None
    if group not in (None, DEFAULT_GROUP):
        groups = [g for g in env.get("PYWORKER_WORKER_GROUPS", "").split(",") if g]
        if group not in groups:
            raise ScalingError(
                f"this release has no worker group {group!r} (its groups: "
                f"{', '.join([DEFAULT_GROUP, *groups])}); add it under workerGroups with helm "
                "upgrade")
        deployment = f"{deployment}-{group}"
        autoscaled = env.get("PYWORKER_AUTOSCALED_GROUPS", "").split(",")
        scaled_object = deployment if group in autoscaled else None
    if env.get("PYWORKER_ALLOW_SCALING", "true").lower() == "false":
        raise ScalingError(
            "scaling from the notebook is off for this release (lab.allowScaling=false): turn it "
            "on with `helm upgrade <release> <chart> --reuse-values --set lab.allowScaling=true` "
            "(the Lab restarts with a token that may scale the workers and nothing else); "
            f"meanwhile `kubectl scale deployment/{deployment} --replicas=N`")
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    if not host:
        raise ScalingError("pyworker.scale() needs the Kubernetes API, and this process is not in "
                           f"a Kubernetes pod (no KUBERNETES_SERVICE_HOST); {ELSEWHERE}")
    token_file, ca_file = os.path.join(sa_dir, "token"), os.path.join(sa_dir, "ca.crt")
    if not os.path.isfile(token_file):
        raise ScalingError(
            f"the Lab has no ServiceAccount token ({token_file}): it is mounted only with "
            "lab.allowScaling=true (`helm upgrade <release> <chart> --reuse-values --set "
            "lab.allowScaling=true`)")
    namespace = env.get("PYWORKER_NAMESPACE", "")
    if not namespace:
        try:
            with open(os.path.join(sa_dir, "namespace")) as f:
                namespace = f.read().strip()
        except OSError:
            raise ScalingError("the Lab's namespace is not known: set PYWORKER_NAMESPACE "
                               "(the chart sets it from the pod's metadata.namespace)") from None
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    api = f"https://{host}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
    return Target(api, namespace, deployment, scaled_object, token_file, ca_file)


def _request(t: Target, method: str, path: str, body: dict | None = None,
             timeout_s: float = TIMEOUT_S) -> dict:
    """One call to the API server, authenticated with the Lab's token (read again each time:
    projected tokens are rotated) over TLS checked against the cluster's CA."""
    with open(t.token_file) as f:
        token = f.read().strip()
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/merge-patch+json"
    request = urllib.request.Request(t.api + path, data=data, method=method, headers=headers)
    try:
        context = ssl.create_default_context(cafile=t.ca_file)
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise _refused(t, method, path, exc) from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ScalingError(f"cannot reach the Kubernetes API at {t.api}: {reason}") from None


def _refused(t: Target, method: str, path: str, exc: urllib.error.HTTPError) -> ScalingError:
    try:
        message = json.loads(exc.read()).get("message", "")
    except (OSError, ValueError, AttributeError):
        message = ""
    said = f" ({message})" if message else ""
    what = (f"ScaledObject {t.scaled_object}" if "scaledobjects" in path
            else f"Deployment {t.deployment}")
    if exc.code in (401, 403):
        return ScalingError(
            f"the Kubernetes API refused to {method} the {what} in namespace {t.namespace}: "
            f"HTTP {exc.code}{said}. The Lab's ServiceAccount may scale only its release's worker "
            "Deployment, and only with lab.allowScaling=true")
    if exc.code == 404:
        return ScalingError(f"there is no {what} in namespace {t.namespace}{said}: was the "
                            "release removed, or renamed?")
    return ScalingError(f"the Kubernetes API answered HTTP {exc.code} to {method} {path}{said}")


def _scale_path(t: Target) -> str:
    return f"/apis/apps/v1/namespaces/{t.namespace}/deployments/{t.deployment}/scale"


def _scaled_object_path(t: Target) -> str:
    return f"/apis/keda.sh/v1alpha1/namespaces/{t.namespace}/scaledobjects/{t.scaled_object}"


def scale(n: int, wait: bool = False, timeout: float = 300.0, group: str | None = None) -> int:
    """Set the number of worker pods to ``n`` (with autoscaling: the least number the autoscaler
    keeps); returns the number the cluster now wants. ``wait=True``: return once ``n`` workers
    are live in Redis (at most ``timeout`` seconds: TimeoutError). ``group``: that worker group's
    pods (the chart's workerGroups; None: the default group)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"scale() takes a number of workers >= 0, not {n!r}")
    t = target(group=group)
    if t.scaled_object:
        spec = _request(t, "GET", _scaled_object_path(t)).get("spec", {})
        most = spec.get("maxReplicaCount")
        if most is not None and n > most:
            raise ValueError(f"{n} workers is above the autoscaler's maximum of {most} "
                             "(autoscaling.maxWorkers): raise that with helm upgrade first")
        _request(t, "PATCH", _scaled_object_path(t), {"spec": {"minReplicaCount": n}})
        desired = max(n, _desired(t) or 0)
    else:
        reply = _request(t, "PATCH", _scale_path(t), {"spec": {"replicas": n}})
        desired = reply.get("spec", {}).get("replicas", n)
    if wait:
        _wait_for_workers(n, timeout, group)
    return desired


def _desired(t: Target, timeout_s: float = TIMEOUT_S) -> int | None:
    return _request(t, "GET", _scale_path(t), timeout_s=timeout_s).get("spec", {}).get("replicas")


def desired_workers(timeout_s: float = 2.0) -> int | None:
    """The worker Deployment's desired replicas, or None when that cannot be known here (not a
    release's Lab, scaling off, the API out of reach): status() then leaves it out."""
    try:
        return _desired(target(), timeout_s)
    except ScalingError:
        return None


def _wait_for_workers(n: int, timeout_s: float, group: str | None = None):
    from .api import get_client
    broker = get_client().for_group(group).broker
    deadline = time.monotonic() + timeout_s
    while True:
        live = broker.live_workers()
        if live == n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{live} worker(s) live after {timeout_s:g} s, not {n}: see "
                               "`kubectl get pods` for pods that cannot start (resources, image)")
        time.sleep(0.5)
