"""Scaling from the notebook and the metrics exporter, on the offline test cluster: pyworker.scale()
in the Lab against the real API server and RBAC, what the Lab's token may not do, and the
exporter's numbers during a job."""
import json

import pytest

from e2elib import RELEASE_LABEL, gated_job, job_result, open_gate, wait_for

pytestmark = pytest.mark.timeout(600)


def ready_workers(k8s, ns, rel):
    pods = k8s.pods(ns, f"{RELEASE_LABEL}={rel},app.kubernetes.io/component=worker")
    return [p["metadata"]["name"] for p in pods
            if not p["metadata"].get("deletionTimestamp")
            and any(c["type"] == "Ready" and c["status"] == "True"
                    for c in p["status"].get("conditions", []))]


def can_i(k8s, ns, sa, *args):
    p = k8s.kubectl(ns, "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{sa}",
                    check=False)
    answer = p.stdout.strip()
    assert answer in ("yes", "no"), (args, p.stdout, p.stderr)
    return answer == "yes"


def test_scale_from_the_lab_and_nothing_else(k8s, namespace):
    rel = "scl"
    k8s.install(namespace, rel, workers=1)
    p = k8s.lab_run(namespace, rel, "import pyworker; print('DESIRED', pyworker.scale(4, wait=True, "
                                    "timeout=240))", timeout=300)
    assert "DESIRED 4" in p.stdout, p.stdout + p.stderr
    wait_for(lambda: len(ready_workers(k8s, namespace, rel)) == 4, 240, "4 Ready worker pods",
             on_fail=lambda: k8s.describe(namespace))
    assert k8s.json(namespace, "deployment", f"{rel}-pyworker-worker")["spec"]["replicas"] == 4
    out = k8s.lab_run(namespace, rel, "import pyworker; print(pyworker.status())").stdout
    assert "4 worker(s) alive of 4 desired" in out, out

    # The Lab's ServiceAccount: the worker Deployment's scale subresource, and nothing else.
    sa = f"{rel}-pyworker-lab"
    worker = f"deployments.apps/{rel}-pyworker-worker"
    for verb in ("get", "patch", "update"):
        assert can_i(k8s, namespace, sa, verb, worker, "--subresource=scale"), verb
    denied = [
        ("patch", f"deployments.apps/{rel}-pyworker-redis", "--subresource=scale"),
        ("patch", f"deployments.apps/{rel}-pyworker-lab", "--subresource=scale"),
        ("patch", worker),  # the Deployment itself: its pod template would run any image
        ("update", worker),
        ("delete", worker),
        ("create", "deployments.apps"),
        ("list", "deployments.apps"),
        ("get", "secrets"),
        ("list", "secrets"),
        ("get", f"secrets/{rel}-pyworker"),
        ("delete", "pods"),
        ("create", "pods"),
        ("create", "pods", "--subresource=exec"),
        ("patch", "deployments.apps/anything", "--subresource=scale"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
        ("patch", "roles.rbac.authorization.k8s.io"),
    ]
    for args in denied:
        assert not can_i(k8s, namespace, sa, *args), args
    # in another namespace neither
    assert not can_i(k8s, "default", sa, "patch", worker, "--subresource=scale")
    # The token itself, from the Lab: another Deployment's scale is refused by the API server.
    code = ("from pyworker import scaling, ScalingError\n"
            "t = scaling.target()._replace(deployment='" + rel + "-pyworker-redis')\n"
            "try:\n"
            "    scaling._request(t, 'PATCH', scaling._scale_path(t), {'spec': {'replicas': 0}})\n"
            "    print('ALLOWED')\n"
            "except ScalingError as e:\n"
            "    print('REFUSED', e)\n")
    out = k8s.lab_run(namespace, rel, code).stdout
    assert "REFUSED" in out and "HTTP 403" in out, out
    assert len([p for p in k8s.pods(namespace, f"{RELEASE_LABEL}={rel},app.kubernetes.io/component=redis")
                if not p["metadata"].get("deletionTimestamp")]) == 1

    # lab.allowScaling=false: no Role, no token, and scale() says how to turn it on. (Helm 4
    # applies server-side: the replicas scale() set are another manager's, so the upgrade needs
    # --force-conflicts, and puts them back to `workers`; docs/chart.md says so.)
    p = k8s.helm(namespace, "upgrade", rel, "./chart", "--reuse-values", "--set",
                 "lab.allowScaling=false", "--wait", "--timeout", "4m", check=False)
    assert p.returncode != 0 and "conflict" in p.stderr and ".spec.replicas" in p.stderr, p.stderr
    k8s.helm(namespace, "upgrade", rel, "./chart", "--reuse-values", "--set", "lab.allowScaling=false",
             "--force-conflicts", "--wait", "--timeout", "4m")
    assert k8s.json(namespace, "deployment", f"{rel}-pyworker-worker")["spec"]["replicas"] == 1
    assert not k8s.json(namespace, "roles")["items"]
    assert not can_i(k8s, namespace, sa, "patch", worker, "--subresource=scale")

    def refused_clearly():
        p = k8s.lab_run(namespace, rel, "import pyworker\ntry:\n    pyworker.scale(2)\n"
                                        "except pyworker.ScalingError as e:\n    print('ERROR', e)\n",
                        check=False)
        return "ERROR scaling from the notebook is off" in p.stdout and p.stdout
    out = wait_for(refused_clearly, 180, "the new Lab pod refusing scale()")
    assert "--set lab.allowScaling=true" in out, out


def metrics_from_lab(k8s, ns, rel, path):
    code = ("import urllib.request; print(urllib.request.urlopen("
            f"'http://{rel}-pyworker-metrics:9090{path}', timeout=10).read().decode())")
    return k8s.lab_run(ns, rel, code).stdout


def parse_prometheus(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_endpoint_during_a_job(k8s, namespace):
    rel = "met"
    k8s.install(namespace, rel, workers=2)
    G = '{group="default"}'
    # Every task waits at the gate: while the test looks, both workers are inside one.
    with k8s.lab_job(namespace, rel, gated_job(20, free=0, task_s=0.0, chunksize=1)) as job:
        def both_busy():
            figures = json.loads(metrics_from_lab(k8s, namespace, rel, "/scale"))
            return figures["busy"] == 2 and figures
        figures = wait_for(both_busy, 120, "both workers busy, as /scale says")
        assert figures["workers"] == 2
        # imap keeps a window of max(4 x 2 workers, 8) + 1 tasks in Redis, not all 20
        assert figures["tasks"] == 9 == figures["queued"] + figures["running"]
        assert figures["queued"] >= 1 and figures["running"] >= 2
        m = parse_prometheus(metrics_from_lab(k8s, namespace, rel, "/metrics"))
        assert m[f"pyworker_workers{G}"] == 2 and m[f"pyworker_workers_busy{G}"] == 2
        assert m[f"pyworker_tasks_queued{G}"] + m[f"pyworker_tasks_running{G}"] == 9
        assert m[f"pyworker_tasks_done_total{G}"] == 0
        open_gate(k8s, namespace, rel)
        res = job_result(job, 300)
    assert [i for i, _ in res] == list(range(20))

    def all_counted():
        m = parse_prometheus(metrics_from_lab(k8s, namespace, rel, "/metrics"))
        return m[f"pyworker_tasks_done_total{G}"] == 20 and m
    m = wait_for(all_counted, 60, "20 tasks counted done")
    assert m[f"pyworker_items_done_total{G}"] == 20 and m[f"pyworker_tasks_failed_total{G}"] == 0
    assert m['pyworker_task_duration_seconds_count{group="default"}'] == 20
    assert m[f"pyworker_tasks_queued{G}"] == 0 and m[f"pyworker_workers_busy{G}"] == 0
    # the exporter's pod: ready, one replica, no restarts
    [pod] = k8s.pods(namespace, f"{RELEASE_LABEL}={rel},app.kubernetes.io/component=metrics")
    assert pod["status"]["containerStatuses"][0]["ready"] is True
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
