"""workerGroups: a worker Deployment per group (its own replicas, resources, node selection, image,
env and autoscaling, the rest from worker.*), PYWORKER_GROUP on its pods, selectors that never
overlap, its ScaledObject reading its group's /scale, the Lab's Role covering every group and the
exporter reporting every group. Helm 4 and Helm 3."""
import json

import pytest

from chartlib import by_kind, one

KEDA = ("--api-versions", "keda.sh/v1alpha1/ScaledObject")
def _env(deployment, container="worker"):
    c = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == container)
    return {e["name"]: e.get("value") for e in c.get("env", [])}


def _set_json(values: dict):
    return ("--set-json", f"workerGroups={json.dumps(values)}")


def test_a_group_is_a_deployment_of_its_own(helm):
    docs = helm.template(*_set_json({"gpu": {
        "replicas": 2,
        "resources": {"limits": {"nvidia.com/gpu": 1}},
        "nodeSelector": {"accelerator": "nvidia"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "image": {"repository": "registry.example/pyworker-cuda", "tag": "1.2"},
        "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}]}}),
        "--set", "workers=3", "--set", "worker.resources.requests.cpu=500m",
        "--set-json", 'worker.env=[{"name": "OMP_NUM_THREADS", "value": "1"}]')
    default, gpu = one(docs, "Deployment", "-worker"), one(docs, "Deployment", "-worker-gpu")
    assert default["spec"]["replicas"] == 3 and gpu["spec"]["replicas"] == 2
    pod = gpu["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "registry.example/pyworker-cuda:1.2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["cpu"] == "500m", "what the group leaves out comes from worker.*"
    assert pod["nodeSelector"] == {"accelerator": "nvidia"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    env = _env(gpu)
    assert env["PYWORKER_GROUP"] == "gpu"
    assert env["OMP_NUM_THREADS"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "0"
    assert "PYWORKER_GROUP" not in _env(default), "the default group's workers need none"
    assert "nodeSelector" not in default["spec"]["template"]["spec"]
    # Selectors never overlap (a Deployment would adopt the other's pods), and the default one is
    # what it was before groups (a Deployment's selector cannot change on upgrade).
    sel_default = default["spec"]["selector"]["matchLabels"]
    sel_gpu = gpu["spec"]["selector"]["matchLabels"]
    assert sel_default["app.kubernetes.io/component"] == "worker"
    assert sel_gpu["app.kubernetes.io/component"] == "worker-gpu"
    labels_gpu = gpu["spec"]["template"]["metadata"]["labels"]
    assert not all(labels_gpu.get(k) == v for k, v in sel_default.items())
    # every group's pods may reach Redis (the policy admits the release's pods)
    policy = one(docs, "NetworkPolicy", "-redis")
    admitted = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert all(labels_gpu.get(k) == v for k, v in admitted.items())
    # a PodDisruptionBudget per group, each selecting its own
    pdbs = {p["metadata"]["name"]: p for p in by_kind(docs, "PodDisruptionBudget")}
    assert pdbs["par-pyworker-worker-gpu-pdb"]["spec"]["selector"]["matchLabels"] == sel_gpu


def test_a_group_autoscales_on_its_own_queue_and_the_lab_may_scale_every_group(helm):
    docs = helm.template(*KEDA, *_set_json({"gpu": {"autoscaling": {"enabled": True,
                                                                    "maxWorkers": 4}},
                                            "cpu": {"replicas": 5}}),
                         "--set", "autoscaling.cooldownSeconds=60", namespace="ns")
    [so] = by_kind(docs, "ScaledObject")
    assert so["metadata"]["name"] == so["spec"]["scaleTargetRef"]["name"] == "par-pyworker-worker-gpu"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (0, 4)
    assert so["spec"]["cooldownPeriod"] == 60, "what the group leaves out comes from autoscaling"
    assert so["spec"]["triggers"][0]["metadata"]["url"] == \
        "http://par-pyworker-metrics.ns.svc:9090/scale?group=gpu"
    assert "replicas" not in one(docs, "Deployment", "-worker-gpu")["spec"]
    assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 2
    assert one(docs, "Deployment", "-worker-cpu")["spec"]["replicas"] == 5
    role = one(docs, "Role")
    scale_rule = next(r for r in role["rules"] if r["resources"] == ["deployments/scale"])
    assert sorted(scale_rule["resourceNames"]) == ["par-pyworker-worker", "par-pyworker-worker-cpu",
                                                   "par-pyworker-worker-gpu"]
    keda_rule = next(r for r in role["rules"] if r["resources"] == ["scaledobjects"])
    assert keda_rule["resourceNames"] == ["par-pyworker-worker-gpu"]
    lab = _env(one(docs, "Deployment", "-lab"), "lab")
    assert lab["PYWORKER_WORKER_GROUPS"] == "cpu,gpu" and lab["PYWORKER_AUTOSCALED_GROUPS"] == "gpu"
    assert "PYWORKER_SCALED_OBJECT" not in lab, "the default group is not autoscaled"
    exporter = _env(one(docs, "Deployment", "-metrics"), "metrics")
    assert exporter["PYWORKER_METRICS_GROUPS"] == "cpu,gpu"


def test_a_group_autoscaled_without_keda_fails_saying_so(helm):
    proc = helm.run("template", "par", "./chart",
                    *_set_json({"gpu": {"autoscaling": {"enabled": True}}}))
    assert proc.returncode != 0 and "needs KEDA" in proc.stderr


@pytest.mark.parametrize("values, says", [
    ({"GPU": {}}, "GPU"),
    ({"default": {}}, "default"),
    ({"gpu": {"replicas": -1}}, "replicas"),
    ({"gpu": {"gpus": 1}}, "gpus"),
    ({"gpu": {"autoscaling": {"maxWorkers": 0}}}, "maxWorkers"),
])
def test_bad_groups_are_refused_before_anything_is_created(helm, values, says):
    proc = helm.run("template", "par", "./chart", *_set_json(values))
    assert proc.returncode != 0
    assert says in proc.stderr, proc.stderr
