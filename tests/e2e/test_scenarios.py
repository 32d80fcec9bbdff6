"""End-to-end scenarios a user of the chart goes through, on the offline test cluster.

Each test works in its own namespace(s) (the make_namespace fixture removes them); every wait is
bounded; traffic goes only to 127.0.0.1 (NodePorts) and the cluster.
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

import imagelib
from e2elib import (RELEASE_LABEL, gated_job, job_result, last_json, live_worker_hosts, open_gate,
                    run, wait_for, wait_for_line)

# Installs of up to 10 workers on 2 shared cores, jobs of up to ~80 s: above the project's 120 s.
pytestmark = pytest.mark.timeout(480)


# --- 1. scale down and lose workers in the middle of a job ---------------------------------------

def test_scale_down_and_kill_workers_during_job(k8s, namespace):
    rel = "churn"
    k8s.install(namespace, rel, workers=6)
    before = set(k8s.worker_pods(namespace, rel))
    assert len(before) == 6, before
    # Items 12 and up wait at a gate: while the test scales down and kills, each live worker is
    # inside a task (the stopping ones must finish theirs; the killed ones' must run again).
    with k8s.lab_job(namespace, rel, gated_job(60, free=12, chunksize=1)) as job:
        wait_for_line(job, r"^PROGRESS 12$", 120)  # results are coming back
        k8s.helm(namespace, "upgrade", rel, "./chart", "--reuse-values", "--set", "workers=3",
                 "--wait", "--timeout", "3m")
        # Force-delete 2 of the workers that stay (not the ones already stopping).
        wait_for(lambda: len(k8s.worker_pods(namespace, rel)) == 3, 60, "the scale-down to 3")
        victims = sorted(k8s.worker_pods(namespace, rel))[:2]
        k8s.kubectl(namespace, "delete", "pod", *victims, "--grace-period=0", "--force", "--wait=false")
        assert job.poll() is None, "the job ended at a shut gate"
        # Dead for sure (not finishing their task in the kill's grace) before the gate opens.
        wait_for(lambda: not live_worker_hosts(k8s, namespace, rel) & set(victims), 60,
                 "the killed workers' leases to end")
        open_gate(k8s, namespace, rel)
        res = job_result(job, 300)
    assert [i for i, _ in res] == list(range(60)), "every item's result exactly once, in order"
    assert not {host for _, host in res[12:]} & set(victims), "no result from a killed worker"
    # The replacement workers (Deployment back at 3) are up.
    wait_for(lambda: len(k8s.worker_pods(namespace, rel)) == 3, 120, "3 running workers after the job",
             on_fail=lambda: k8s.describe(namespace))


# --- 2. Redis restarts in the middle of a job, with persistence on ------------------------------

def redis_pod(k8s, ns, rel):
    items = [p for p in k8s.pods(ns, f"{RELEASE_LABEL}={rel},app.kubernetes.io/component=redis")
             if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    return items[0]["metadata"] if len(items) == 1 else None


@pytest.fixture
def host_path_volume(k8s, namespace):
    """A hostPath PersistentVolume for one claim of `namespace` (the cluster has no provisioner):
    returns its storageClassName and host directory; both are removed afterwards."""
    cls = f"e2e-{namespace}"
    path = Path("/var/lib/pyworker-e2e") / namespace
    path.mkdir(parents=True, mode=0o700)
    os.chown(path, 999, 999)  # the Redis image's uid/gid; hostPath volumes ignore fsGroup
    pv = {"apiVersion": "v1", "kind": "PersistentVolume",
          "metadata": {"name": cls, "labels": {"pyworker-e2e": namespace}},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": cls,
                   "hostPath": {"path": str(path), "type": "Directory"}}}
    run(*k8s.kubectl_cmd, "apply", "-f", "-", input=json.dumps(pv))
    yield {"storage_class": cls, "path": path}
    run(*k8s.kubectl_cmd, "delete", "pv", cls, "--wait=false", check=False)
    shutil.rmtree(path, ignore_errors=True)


def test_redis_restart_with_persistence_keeps_the_job(k8s, namespace, host_path_volume):
    rel = "durable"
    k8s.install(namespace, rel, "redis.persistence.enabled=true",
                f"redis.persistence.storageClass={host_path_volume['storage_class']}", workers=3)
    before = redis_pod(k8s, namespace, rel)
    assert before, k8s.describe(namespace)
    # Items 6 and up wait at a gate (a key in Redis, which the append-only file keeps) until the
    # new Redis pod is up: the restart happens mid-job however fast the machine.
    with k8s.lab_job(namespace, rel, gated_job(60, free=6, chunksize=1)) as job:
        # The job is under way: some results are in, most tasks still queued in Redis.
        wait_for_line(job, r"^PROGRESS 6$", 120)
        t0 = time.monotonic()
        k8s.kubectl(namespace, "delete", "pod", before["name"], "--wait=true", "--timeout=90s", timeout=120)
        wait_for(lambda: (redis_pod(k8s, namespace, rel) or {}).get("uid") not in (None, before["uid"]),
                 120, "a new Redis pod", on_fail=lambda: k8s.describe(namespace))
        print(f"Redis pod replaced in {time.monotonic() - t0:.1f} s")
        assert job.poll() is None, "the job ended at a shut gate"
        open_gate(k8s, namespace, rel)
        res = job_result(job, 300)
    assert [i for i, _ in res] == list(range(60)), "every item's result exactly once, in order"
    # The append-only file on the volume is what carried the queue across the restart.
    assert any(host_path_volume["path"].rglob("*.aof")), list(host_path_volume["path"].rglob("*"))
    # Redis' claim holds only queued work: it goes with the release.
    k8s.helm(namespace, "uninstall", rel, "--wait", "--timeout", "3m")
    wait_for(lambda: not k8s.json(namespace, "pvc")["items"], 90, "the Redis claim to go",
             on_fail=lambda: k8s.describe(namespace))


# --- 2b. user code that kills its process ---------------------------------------------------------

ISOLATION_JOB = """
import json, os, pyworker
def task(x):
    if x == 3:
        os._exit(5)
    if x == 7:  # past the pod's memory limit: the kernel's OOM killer
        blocks = []
        while True:
            blocks.append(b"x" * (32 << 20))
    return x * 2
out = pyworker.pmap(task, range(12), chunksize=1, return_exceptions=True, timeout=300)
print("RESULT:" + json.dumps([f"{type(v).__name__}: {v}" if isinstance(v, BaseException) else v
                              for v in out]))
"""


def test_a_task_that_exits_or_runs_out_of_memory_fails_alone_and_no_pod_restarts(k8s, namespace):
    """One item calls os._exit, one allocates past the worker pod's memory limit: every other
    item comes back, those two fail saying why, and no worker pod restarted (the worker's
    supervisor replaced its executor; the lease and the liveness probe never missed a beat)."""
    rel = "isolate"
    k8s.install(namespace, rel, "worker.resources.limits.memory=256Mi", workers=3)
    pods = set(k8s.worker_pods(namespace, rel))
    out = last_json(k8s.lab_run(namespace, rel, ISOLATION_JOB, timeout=330).stdout)
    assert [v for i, v in enumerate(out) if i not in (3, 7)] == \
        [x * 2 for x in range(12) if x not in (3, 7)], out
    assert out[3].startswith("WorkerLostError: item #3 (3) killed the executor") \
        and "exited with code 5" in out[3], out[3]
    assert out[7].startswith("WorkerLostError: item #7 (7) killed the executor") \
        and "out of memory" in out[7] and "256 MiB" in out[7], out[7]
    restarts = {p["metadata"]["name"]: [c.get("restartCount", 0)
                                        for c in p["status"].get("containerStatuses", [])]
                for p in k8s.pods(namespace, f"{RELEASE_LABEL}={rel},"
                                             "app.kubernetes.io/component=worker")}
    assert set(restarts) == pods and all(r == [0] for r in restarts.values()), restarts


# --- 3. two releases side by side ----------------------------------------------------------------

def job_tagged(tag):
    return f"""
import json, socket, time
from pyworker import pmap
res = pmap(lambda i: (time.sleep(0.05), ({tag!r}, i, socket.gethostname()))[1], range(300))
print('RESULT:' + json.dumps(res), flush=True)
"""


def test_two_releases_do_not_mix(k8s, make_namespace):
    a, b = make_namespace("e2e-a"), make_namespace("e2e-b")
    k8s.install(a, "alpha", workers=2)
    k8s.install(b, "beta", workers=2)
    with k8s.lab_job(a, "alpha", job_tagged("alpha")) as ja, \
            k8s.lab_job(b, "beta", job_tagged("beta")) as jb:
        ra, rb = job_result(ja, 240, "alpha"), job_result(jb, 240, "beta")
    for res, ns, rel in ((ra, a, "alpha"), (rb, b, "beta")):
        assert [(t, i) for t, i, _ in res] == [(rel, i) for i in range(300)]
        hosts = {h for _, _, h in res}
        workers = set(k8s.worker_pods(ns, rel))
        assert hosts <= workers, f"{rel}'s items ran on pods outside the release: {hosts - workers}"


# --- 4. NetworkPolicy ----------------------------------------------------------------------------
# The cluster enforces NetworkPolicy (kube-router's firewall, docs/cluster.md): these prove the
# chart's policy admits this release's pods to Redis and nothing else.

PROBE = """
import socket, sys, time
host, patience = sys.argv[1], float(sys.argv[2])
try:
    addr = socket.gethostbyname(host)
except OSError as exc:
    sys.exit("NORESOLVE:" + repr(exc))  # not a verdict on the policy: DNS itself failed
# A new pod the policy admits can start before the enforcer has added its address to the
# policy's rules: retry for `patience` seconds. A pod expected to be refused gets one 5 s attempt.
deadline = time.monotonic() + patience
while True:
    try:
        s = socket.create_connection((addr, 6379), timeout=5)
        s.settimeout(5)
        s.sendall(b"PING\\r\\n")
        print("REPLY:" + s.recv(200).decode(errors="replace").strip())
        break
    except OSError as exc:
        if time.monotonic() >= deadline:
            print("BLOCKED:" + repr(exc))
            break
        time.sleep(1)
"""

# An authenticated PING with the settings the chart gives its pods (URL through the Service name).
REDIS_PING = """
import os, redis
r = redis.Redis.from_url(os.environ["PYWORKER_REDIS_URL"],
                         password=os.environ.get("PYWORKER_REDIS_PASSWORD") or None,
                         socket_connect_timeout=5, socket_timeout=5)
print("PING:" + repr(r.ping()))
"""


def probe_pod(k8s, ns, name, labels, host, patience):
    """PROBE from a new pod with these labels (no service account token); returns its output."""
    overrides = {"metadata": {"labels": labels}, "spec": {"automountServiceAccountToken": False}}
    k8s.kubectl(ns, "run", name, f"--image={imagelib.IMG}", "--image-pull-policy=Never",
                "--restart=Never", f"--overrides={json.dumps(overrides)}", "--command", "--",
                "python", "-c", PROBE, host, str(patience))
    wait_for(lambda: k8s.json(ns, "pod", name)["status"].get("phase") in ("Succeeded", "Failed"),
             90, f"probe pod {name}", on_fail=lambda: k8s.describe(ns))
    return k8s.kubectl(ns, "logs", name).stdout.strip()


def exec_python(k8s, ns, pod, container, code, *args):
    return k8s.kubectl(ns, "exec", pod, "-c", container, "--", "python", "-c", code, *args,
                       timeout=60).stdout.strip()


def test_network_policy_admits_only_release_pods(k8s, make_namespace):
    ns, other_ns = make_namespace("e2e-np"), make_namespace("e2e-np-other")
    rel = "np"
    k8s.install(ns, rel, workers=1)                             # with the Lab
    k8s.install(other_ns, "other", "lab.enabled=false", workers=1)
    k8s.kubectl(ns, "get", "networkpolicy", f"{rel}-pyworker-redis")
    host = f"{rel}-pyworker-redis.{ns}.svc.cluster.local"

    # Admitted: this release's worker and Lab (authenticated PING through the Service) ...
    worker = k8s.worker_pods(ns, rel)[0]
    assert exec_python(k8s, ns, worker, "worker", REDIS_PING) == "PING:True"
    assert exec_python(k8s, ns, k8s.lab_pod(ns, rel), "lab", REDIS_PING) == "PING:True"
    # ... and any pod of this namespace carrying the release's labels (as the helm test pod does).
    inside = probe_pod(k8s, ns, "probe-in", {"app.kubernetes.io/name": "pyworker", RELEASE_LABEL: rel},
                       host, patience=30)
    assert inside.startswith("REPLY:") and "NOAUTH" in inside, inside

    # Refused: a worker of another release (which does reach its own Redis) ...
    other_worker = k8s.worker_pods(other_ns, "other")[0]
    assert exec_python(k8s, other_ns, other_worker, "worker", REDIS_PING) == "PING:True"
    crossed = exec_python(k8s, other_ns, other_worker, "worker", PROBE, host, "0")
    assert crossed.startswith("BLOCKED:"), f"another release's worker reached {host}: {crossed}"
    # ... a pod of this namespace labelled as another release, and one with no release labels.
    for name, labels in (("probe-other", {"app.kubernetes.io/name": "pyworker", RELEASE_LABEL: "other"}),
                         ("probe-out", {"role": "stranger"})):
        out = probe_pod(k8s, ns, name, labels, host, patience=0)
        assert out.startswith("BLOCKED:"), f"{name} ({labels}) reached {host}: {out}"


# --- 5. uninstall leaves nothing behind ----------------------------------------------------------

UNINSTALL_KINDS = "pods,services,secrets,configmaps,pvc,deployments,networkpolicies,poddisruptionbudgets"


def release_leftovers(k8s, ns, rel):
    items = k8s.json(ns, UNINSTALL_KINDS, "-l", f"{RELEASE_LABEL}={rel}")["items"]
    return [f"{i['kind']}/{i['metadata']['name']}" for i in items]


def named_after(k8s, ns, rel):
    """Pods, services, secrets, PVCs named after the release, labels or not (helm's release Secrets too)."""
    names = k8s.kubectl(ns, "get", "pods,services,secrets,pvc", "-o", "name").stdout.split()
    return [n for n in names if n.split("/", 1)[1].startswith(rel)]


def test_uninstall_leaves_nothing(k8s, namespace):
    rel = "gone"
    k8s.install(namespace, rel, workers=2)  # persistence off (default): no PVC at all
    assert release_leftovers(k8s, namespace, rel)
    k8s.helm(namespace, "uninstall", rel, "--wait", "--timeout", "3m")
    wait_for(lambda: not release_leftovers(k8s, namespace, rel), 90, "the release's objects to go",
             on_fail=lambda: f"left: {release_leftovers(k8s, namespace, rel)}")
    assert named_after(k8s, namespace, rel) == []


def test_uninstall_after_helm_test_leaves_nothing(k8s, namespace):
    rel = "tested"
    k8s.install(namespace, rel, "lab.enabled=false", workers=2)
    out = k8s.helm(namespace, "test", rel, "--timeout", "5m").stdout
    assert re.search(r"Phase:\s+Succeeded", out), out
    k8s.helm(namespace, "uninstall", rel, "--wait", "--timeout", "3m")
    # Helm never deletes hook resources on uninstall: the chart's test pod removes itself on success.
    wait_for(lambda: not release_leftovers(k8s, namespace, rel), 90, "the release's objects to go",
             on_fail=lambda: f"left: {release_leftovers(k8s, namespace, rel)}")
    assert named_after(k8s, namespace, rel) == []
