"""autoscaling.*: a KEDA ScaledObject for the worker Deployment, which then has no fixed replica
count; a clear one-line failure where KEDA is missing; values checked. Helm 4 and Helm 3."""
import re

import pytest

from chartlib import CHART, KUBE_NEWEST, by_kind, one

KEDA = ("--api-versions", "keda.sh/v1alpha1/ScaledObject")
ON = ("--set", "autoscaling.enabled=true")


def test_scaledobject_targets_the_workers_and_reads_the_metrics_exporter(helm):
    docs = helm.template(*KEDA, *ON, "--set", "autoscaling.minWorkers=0", "--set", "autoscaling.maxWorkers=6",
                         "--set", "autoscaling.tasksPerWorker=3", "--set", "autoscaling.cooldownSeconds=45",
                         "--set", "autoscaling.pollingInterval=5", namespace="team-a")
    so = one(docs, "ScaledObject")
    worker = one(docs, "Deployment", "-worker")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["name"] == worker["metadata"]["name"] == "par-pyworker-worker"
    assert so["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"name": "par-pyworker-worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 6)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (5, 45)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"] == {"stabilizationWindowSeconds": 45}
    # up to maxWorkers in one HPA sync
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": 0,
                                   "policies": [{"type": "Pods", "value": 6, "periodSeconds": 15}]}
    [trigger] = spec["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    # KEDA reads trigger metadata as strings only: numbers must be quoted.
    assert trigger["metadata"] == {
        "url": "http://par-pyworker-metrics.team-a.svc:9090/scale",
        "format": "json",
        "valueLocation": "tasks",
        "targetValue": "3",
        "activationTargetValue": "0",
    }
    # KEDA owns the replica count: a fixed one would be put back by every helm upgrade.
    assert "replicas" not in worker["spec"]


def test_disabled_renders_no_scaledobject_and_keeps_the_replica_count(helm):
    docs = helm.template(*KEDA, "--set", "workers=3")
    assert by_kind(docs, "ScaledObject") == []
    assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 3


def test_the_metrics_url_follows_the_release_name(helm):
    docs = helm.template(*KEDA, *ON, "--set", "fullnameOverride=calc", release="r1", namespace="ns2")
    url = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["url"]
    assert url == "http://calc-metrics.ns2.svc:9090/scale"


def test_without_keda_the_install_fails_with_one_line_saying_to_install_it(helm):
    proc = helm.run("template", "par", str(CHART), *ON)
    assert proc.returncode != 0
    assert proc.stdout.strip() == ""
    lines = [ln for ln in proc.stderr.splitlines() if "KEDA" in ln]
    assert len(lines) == 1, proc.stderr
    assert "install KEDA" in lines[0] and "autoscaling.enabled=false" in lines[0]
    assert "no matches for kind" not in proc.stderr


def test_without_keda_a_disabled_autoscaling_installs(helm):
    assert one(helm.template(), "Deployment", "-worker")["spec"]["replicas"] == 2


def test_rendered_objects_other_than_the_scaledobject_validate(helm, kubernetes_validate):
    """kubernetes-validate knows no CRD; the rest (the Deployment without replicas) must be valid."""
    out = helm.run("template", "par", str(CHART), "--kube-version", KUBE_NEWEST, *KEDA, *ON, check=True).stdout
    docs = out.split("\n---\n")
    kept = [d for d in docs if "kind: ScaledObject" not in d]
    assert len(kept) == len(docs) - 1
    proc = kubernetes_validate("\n---\n".join(kept), KUBE_NEWEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_test_pod_needs_one_worker_when_autoscaled(helm):
    docs = helm.template(*KEDA, *ON, "--set", "workers=7")
    script = one(docs, "Pod", "-test-pmap")["spec"]["containers"][0]["args"][-1]
    assert "workers = 1\n" in script
    docs = helm.template(*KEDA, *ON, "--set", "autoscaling.minWorkers=3")
    script = one(docs, "Pod", "-test-pmap")["spec"]["containers"][0]["args"][-1]
    assert "workers = 3\n" in script


@pytest.mark.parametrize("bad, error", [
    ("autoscaling.enabled=maybe", r"autoscaling.*enabled"),
    ("autoscaling.minWorkers=-1", r"autoscaling.*minWorkers.*(minimum|greater than or equal)"),
    ("autoscaling.maxWorkers=0", r"autoscaling.*maxWorkers.*(minimum|greater than or equal)"),
    ("autoscaling.tasksPerWorker=0", r"autoscaling.*tasksPerWorker.*(minimum|greater than or equal)"),
    ("autoscaling.cooldownSeconds=-30", r"autoscaling.*cooldownSeconds.*(minimum|greater than or equal)"),
    ("autoscaling.pollingInterval=0", r"autoscaling.*pollingInterval.*(minimum|greater than or equal)"),
    ("autoscaling.maxWorkers=2.5", r"autoscaling.*maxWorkers.*(integer|Invalid type)"),
    ("autoscaling.minWorker=1", r"(additional propert|Additional property).*minWorker"),
])
def test_bad_autoscaling_values_fail_the_schema(helm, bad, error):
    proc = helm.run("template", "par", str(CHART), *KEDA, "--set", bad)
    assert proc.returncode != 0
    assert proc.stdout.strip() == ""
    assert "schema" in proc.stderr
    assert re.search(error, proc.stderr), proc.stderr


def test_max_below_min_is_refused(helm):
    proc = helm.run("template", "par", str(CHART), *KEDA, *ON, "--set", "autoscaling.minWorkers=4",
                    "--set", "autoscaling.maxWorkers=2")
    assert proc.returncode != 0
    assert proc.stdout.strip() == ""
    assert "autoscaling.maxWorkers (2) must be at least autoscaling.minWorkers (4)" in proc.stderr


def test_the_scaledobject_reads_a_service_the_chart_deploys_even_with_metrics_off(helm):
    docs = helm.template(*KEDA, *ON, "--set", "metrics.enabled=false", namespace="ns")
    url = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["url"]
    svc = one(docs, "Service", "-metrics")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics")
    assert url == f"http://{svc['metadata']['name']}.ns.svc:{port}/scale"
