"""The metrics exporter (Deployment, Service, NetworkPolicy, Prometheus Operator monitors) and the
Lab's right to scale the workers (ServiceAccount, Role, RoleBinding, lab.allowScaling)."""
import pytest

from chartlib import by_kind, container, env_of, one, pod_specs

MONITOR_APIS = ("--api-versions", "monitoring.coreos.com/v1/ServiceMonitor",
                "--api-versions", "monitoring.coreos.com/v1/PodMonitor")


def test_metrics_exporter(helm):
    docs = helm.template()
    dep = one(docs, "Deployment", "-metrics")
    assert dep["metadata"]["name"] == "par-pyworker-metrics" and dep["spec"]["replicas"] == 1
    c = container(docs, "Deployment", "-metrics", "metrics")
    assert c["args"] == ["pyworker", "metrics", "--host", "0.0.0.0", "--port", "9090"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = env_of(c)
    # Redis, yes; the signing key (which makes workers run code), no
    assert set(env) == {"PYWORKER_REDIS_PASSWORD"}
    assert c["envFrom"] == [{"configMapRef": {"name": "par-pyworker-config"}}]
    assert c["resources"]["limits"]["memory"] == "128Mi"
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    svc = one(docs, "Service", "-metrics")
    assert svc["metadata"]["name"] == "par-pyworker-metrics"
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics",
                                     "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_metrics_network_policy(helm):
    docs = helm.template()
    np = one(docs, "NetworkPolicy", "-metrics")
    labels = one(docs, "Deployment", "-metrics")["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    # its port, from anywhere (no `from`: every namespace); nothing else
    assert np["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]
    # and the exporter may reach Redis: Redis' policy admits the release's pods
    redis_np = one(docs, "NetworkPolicy", "-redis")
    assert redis_np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items() <= labels.items()


def test_metrics_off(helm):
    docs = helm.template("--set", "metrics.enabled=false")
    assert not [d for d in docs if "metrics" in d["metadata"]["name"]]


def test_monitors_need_their_crds(helm):
    for key in ("serviceMonitor", "podMonitor"):
        proc = helm.run("template", "par", "chart", "--set", f"metrics.{key}.enabled=true")
        assert proc.returncode != 0
        kind = key[0].upper() + key[1:]
        assert f"this cluster has no {kind} (monitoring.coreos.com/v1): install the Prometheus " \
               f"Operator's CRDs first" in proc.stderr, proc.stderr
    proc = helm.run("template", "par", "chart", "--set", "metrics.enabled=false",
                    "--set", "metrics.podMonitor.enabled=true", *MONITOR_APIS)
    assert proc.returncode != 0 and "metrics.podMonitor.enabled needs metrics.enabled=true" in proc.stderr


def test_monitors(helm):
    docs = helm.template("--set", "metrics.serviceMonitor.enabled=true",
                         "--set", "metrics.serviceMonitor.labels.release=kps",
                         "--set", "metrics.podMonitor.enabled=true",
                         "--set", "metrics.podMonitor.interval=15s", *MONITOR_APIS)
    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    svc = one(docs, "Service", "-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    pm = one(docs, "PodMonitor")
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics",
                                                  "interval": "15s"}]
    pod_labels = one(docs, "Deployment", "-metrics")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("bad", ["metrics.serviceMonitor.interval=often", "metrics.enabled=yes-please"])
def test_metrics_values_are_typed(helm, bad):
    proc = helm.run("template", "par", "chart", "--set", bad)
    assert proc.returncode != 0 and "metrics" in proc.stderr


def test_lab_rbac(helm):
    docs = helm.template()
    sa = one(docs, "ServiceAccount", "-lab")
    assert sa["metadata"]["name"] == "par-pyworker-lab" and sa["automountServiceAccountToken"] is False
    spec = one(docs, "Deployment", "-lab")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "par-pyworker-lab"
    assert spec["automountServiceAccountToken"] is True
    role = one(docs, "Role")
    # exactly the worker Deployment's scale subresource: not the Deployment (its pod template
    # would run any image), not another Deployment
    assert role["rules"] == [{"apiGroups": ["apps"], "resources": ["deployments/scale"],
                              "resourceNames": ["par-pyworker-worker"],
                              "verbs": ["get", "patch", "update"]}]
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "par-pyworker-lab",
                                    "namespace": "ns"}]
    env = env_of(container(docs, "Deployment", "-lab", "lab"))
    assert env["PYWORKER_WORKER_DEPLOYMENT"]["value"] == "par-pyworker-worker"
    assert env["PYWORKER_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["PYWORKER_ALLOW_SCALING"]["value"] == "true"
    # no other pod gets a token
    for name, pod, _ in pod_specs(docs):
        assert pod["automountServiceAccountToken"] is name.endswith("-lab"), name


def test_lab_without_scaling(helm):
    docs = helm.template("--set", "lab.allowScaling=false")
    assert not by_kind(docs, "Role") and not by_kind(docs, "RoleBinding")
    spec = one(docs, "Deployment", "-lab")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    env = env_of(container(docs, "Deployment", "-lab", "lab"))
    assert env["PYWORKER_ALLOW_SCALING"]["value"] == "false"
    docs = helm.template("--set", "lab.enabled=false")
    assert not by_kind(docs, "Role") and not by_kind(docs, "ServiceAccount")
