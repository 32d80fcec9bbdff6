"""Autoscaling with KEDA, from zero and back (issue 19): `helm install` with
autoscaling.enabled=true, minWorkers=0, maxWorkers=6; idle, no worker pod runs; a 60 x 2 s pmap from
a notebook kernel starts workers, up to 6, every result comes back exactly once; after the cooldown
no worker pod runs again. Prints the time from submit to the first result (from zero workers) and
the wall time against 60 x 2 s / 6 = 20 s (bench/README.md).

Needs KEDA on the cluster (`make e2e` installs it: ci/keda-install.sh). Only 127.0.0.1 (the Lab's
NodePort) and the cluster are contacted."""
import base64
import threading
import time

import pytest

import imagelib
from e2elib import last_json, wait_for

pytestmark = pytest.mark.timeout(900)

RELEASE = "auto"
MAX_WORKERS, TASKS, TASK_S = 6, 60, 2
COOLDOWN_S, POLLING_S = 30, 5
WORKER = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=worker"

# chunksize=1: from zero workers pmap's automatic chunk size is that of one worker (15 tasks a
# chunk here), which no autoscaler can spread over 6 pods; the test measures the scaling itself.
JOB = f"""
import json, socket, time
from pyworker import pmap

def task(i):
    t = time.time()
    time.sleep({TASK_S})
    return i, socket.gethostname(), t, time.time()

t0 = time.time()
res = pmap(task, range({TASKS}), chunksize=1, timeout=600)
print('RESULT:' + json.dumps({{'submit': t0, 'end': time.time(), 'res': res}}))
"""


def worker_pods(k8s, ns):
    """Worker pods that exist and are not being deleted, and how many of those run."""
    items = [p for p in k8s.pods(ns, WORKER) if not p["metadata"].get("deletionTimestamp")]
    return len(items), sum(p["status"].get("phase") == "Running" for p in items)


def all_worker_pods_gone(k8s, ns):
    return not k8s.pods(ns, WORKER)


class PodSampler(threading.Thread):
    """Counts the worker pods every second while the job runs: (seconds since start, pods, running)."""

    def __init__(self, k8s, ns):
        super().__init__(daemon=True)
        self.k8s, self.ns, self.samples, self.halt = k8s, ns, [], threading.Event()
        self.t0 = time.time()

    def run(self):
        while not self.halt.is_set():
            try:
                self.samples.append((time.time() - self.t0, *worker_pods(self.k8s, self.ns)))
            except Exception:  # noqa: BLE001 - a missed sample is no failure; the job asserts
                pass
            self.halt.wait(1.0)


def keda_state(k8s, ns):
    so = k8s.kubectl(ns, "get", "scaledobject,hpa,deploy", "-o", "wide", check=False).stdout
    logs = k8s.kubectl("keda", "logs", "deploy/keda-operator", "--tail=30", check=False).stdout
    return f"{so}\n--- keda-operator ---\n{logs[-4000:]}\n{k8s.describe(ns)}"


@pytest.fixture(scope="module")
def autoscaled(k8s, module_namespace):
    crd = k8s.kubectl("default", "get", "crd", "scaledobjects.keda.sh", check=False)
    if crd.returncode != 0:
        pytest.fail("KEDA is not installed on the test cluster: make keda-up (make e2e installs it)")
    ns = module_namespace
    k8s.install(ns, RELEASE, "lab.service.type=NodePort", "autoscaling.enabled=true",
                "autoscaling.minWorkers=0", f"autoscaling.maxWorkers={MAX_WORKERS}",
                f"autoscaling.cooldownSeconds={COOLDOWN_S}", f"autoscaling.pollingInterval={POLLING_S}",
                # a stopping worker is idle here: no need to wait the default 300 s
                "worker.terminationGracePeriodSeconds=30", timeout="8m")
    token = base64.b64decode(k8s.json(ns, "secret", f"{RELEASE}-pyworker")["data"]["lab-token"]).decode()
    port = k8s.json(ns, "service", f"{RELEASE}-pyworker-lab")["spec"]["ports"][0]["nodePort"]
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: imagelib.http("GET", f"{base}/api/status", token)[0] == 200, 60,
             f"JupyterLab at {base}", on_fail=lambda: k8s.describe(ns))
    return {"ns": ns, "base": base, "token": token}


def test_scales_from_zero_to_six_and_back_to_zero(k8s, autoscaled):
    ns = autoscaled["ns"]
    # Idle: KEDA takes the Deployment's first pod away (no task, minWorkers 0).
    wait_for(lambda: all_worker_pods_gone(k8s, ns), 180, "no worker pod while idle",
             interval_s=2, on_fail=lambda: keda_state(k8s, ns))
    so = k8s.json(ns, "scaledobject", f"{RELEASE}-pyworker-worker")
    ready = {c["type"]: c["status"] for c in so["status"].get("conditions", [])}
    assert ready.get("Ready") == "True", so["status"]

    kernel = imagelib.Kernel(autoscaled["base"], autoscaled["token"])
    sampler = PodSampler(k8s, ns)
    sampler.start()
    try:
        r = kernel.execute(JOB, timeout_s=600)
    finally:
        sampler.halt.set()
        sampler.join(10)
        kernel.close()
    assert r["status"] == "ok", r
    out = last_json(r["stdout"])
    res = out["res"]

    # Every result exactly once, in order.
    assert [x[0] for x in res] == list(range(TASKS))
    hosts = {x[1] for x in res}
    most = max(p for _, p, _ in sampler.samples)
    most_running = max(r_ for _, _, r_ in sampler.samples)
    first_result = min(x[3] for x in res) - out["submit"]
    wall = out["end"] - out["submit"]
    ideal = TASKS * TASK_S / MAX_WORKERS
    timeline = [(round(t), p, r_) for t, p, r_ in sampler.samples]
    print(f"autoscaling 0 -> {most_running} -> 0: {TASKS} x {TASK_S} s; first result {first_result:.1f} s "
          f"after submit (from zero workers); wall {wall:.1f} s vs {ideal:.0f} s ideal on {MAX_WORKERS} "
          f"({wall / ideal:.2f}x); {len(hosts)} distinct worker pods answered")
    print(f"pods over time (s, pods, running): {timeline}")
    assert most <= MAX_WORKERS, timeline
    assert most_running == MAX_WORKERS, f"never {MAX_WORKERS} workers running: {timeline}"
    assert 2 <= len(hosts) <= MAX_WORKERS, hosts

    # After the cooldown: no worker pod again (bounded: cooldown + polling + the pods' stop).
    t_idle = time.monotonic()
    wait_for(lambda: all_worker_pods_gone(k8s, ns), COOLDOWN_S + 150, "workers to go after the cooldown",
             interval_s=2, on_fail=lambda: keda_state(k8s, ns))
    print(f"back to 0 worker pods {time.monotonic() - t_idle:.0f} s after the job ended "
          f"(cooldown {COOLDOWN_S} s)")
