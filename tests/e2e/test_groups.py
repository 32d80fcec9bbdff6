"""Worker groups on the offline test cluster: a second group standing in for GPU nodes (a node
label and a nodeSelector), tasks with group= on that group's pods only, the others on the default
group's, and the metrics exporter reporting both groups."""
import json

import pytest

from e2elib import RELEASE_LABEL, wait_for

pytestmark = pytest.mark.timeout(600)

LABEL = "pyworker-e2e-accelerator"


def running(k8s, ns, rel, component):
    pods = k8s.pods(ns, f"{RELEASE_LABEL}={rel},app.kubernetes.io/component={component}")
    return {p["metadata"]["name"]: p for p in pods
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")}


@pytest.fixture
def gpu_node(k8s):
    """The node, labelled as if it had GPUs (the label removed afterwards)."""
    [node] = [n["metadata"]["name"] for n in k8s.json("default", "nodes")["items"]]
    k8s.kubectl("default", "label", "node", node, f"{LABEL}=fake-gpu", "--overwrite")
    yield node
    k8s.kubectl("default", "label", "node", node, f"{LABEL}-", check=False)


def test_group_tasks_run_on_that_groups_pods_only(k8s, namespace, gpu_node):
    rel = "grp"
    k8s.install(namespace, rel, "workerGroups.gpu.replicas=2",
                f"workerGroups.gpu.nodeSelector.{LABEL}=fake-gpu", workers=2)
    wait_for(lambda: len(running(k8s, namespace, rel, "worker-gpu")) == 2, 180, "2 gpu worker pods",
             on_fail=lambda: k8s.describe(namespace))
    gpu_pods = running(k8s, namespace, rel, "worker-gpu")
    default_pods = running(k8s, namespace, rel, "worker")
    assert len(default_pods) == 2 and not set(gpu_pods) & set(default_pods)
    for pod in gpu_pods.values():
        assert pod["spec"]["nodeSelector"] == {LABEL: "fake-gpu"}
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0].get("env", [])}
        assert env["PYWORKER_GROUP"] == "gpu"
    code = (
        "import json, os, socket, time, pyworker\n"
        "from pyworker import pmap, status\n"
        "deadline = time.time() + 120\n"
        "while len(status().alive) < 4 and time.time() < deadline: time.sleep(0.5)\n"
        "where = lambda i: (time.sleep(0.2), socket.gethostname(), os.environ.get('PYWORKER_GROUP', 'default'))[1:]\n"
        "gpu = pmap(where, range(24), chunksize=1, group='gpu', timeout=180, progress=False)\n"
        "plain = pmap(where, range(24), chunksize=1, timeout=180, progress=False)\n"
        "st = status()\n"
        "print('RESULT', json.dumps({'gpu': gpu, 'plain': plain, 'groups': st.groups,\n"
        "    'alive': sorted([w.get('group'), w.get('host')] for w in st.alive)}))\n")
    out = k8s.lab_run(namespace, rel, code, timeout=300).stdout
    got = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    gpu_hosts = {h for h, _ in got["gpu"]}
    assert gpu_hosts <= set(gpu_pods) and len(gpu_hosts) == 2, (gpu_hosts, gpu_pods.keys())
    assert {g for _, g in got["gpu"]} == {"gpu"}
    plain_hosts = {h for h, _ in got["plain"]}
    assert plain_hosts <= set(default_pods) and len(plain_hosts) == 2, plain_hosts
    assert got["groups"] == ["default", "gpu"]
    assert sorted(g for g, _ in got["alive"]) == ["default", "default", "gpu", "gpu"]
    # the exporter reports both groups (the figures KEDA would scale each group on); its
    # counters lag the work by up to a heartbeat
    read = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://{rel}-pyworker-metrics:9090/metrics', "
            "timeout=10).read().decode())")
    seen = {}

    def counted():
        seen["text"] = k8s.lab_run(namespace, rel, read).stdout
        return 'pyworker_tasks_done_total{group="gpu"} 24' in seen["text"]
    wait_for(counted, 60, "the gpu group's 24 tasks in the metrics", interval_s=3,
             on_fail=lambda: seen.get("text", "")[-3000:])
    assert 'pyworker_workers{group="gpu"} 2' in seen["text"]
    assert 'pyworker_workers{group="default"} 2' in seen["text"]
