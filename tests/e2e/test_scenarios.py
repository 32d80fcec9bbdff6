"""End-to-end scenarios a user of the chart goes through, on the offline test cluster.

Each test works in its own namespace(s) (the make_namespace fixture removes them); every wait is
bounded; traffic goes only to 127.0.0.1 (NodePorts) and the cluster.
"""
import json
import re
import time

import pytest

import imagelib
from e2elib import RELEASE_LABEL, finish, last_json, run, wait_for

# Installs of up to 10 workers on 2 shared cores, jobs of up to ~80 s: above the project's 120 s.
pytestmark = pytest.mark.timeout(480)


def notes_command(notes, pattern):
    """The shell line of the printed NOTES that matches pattern (stripped)."""
    for line in notes.splitlines():
        if re.search(pattern, line.strip()):
            return line.strip()
    raise AssertionError(f"no line matching {pattern!r} in the NOTES:\n{notes}")


def run_as_user(k8s, shell):
    """Run a command copied from the NOTES with `kubectl` bound to the test cluster."""
    script = f'kubectl() {{ "{k8s.kubectl_bin}" --kubeconfig "{k8s.kubeconfig}" "$@"; }}\n{shell}\n'
    return run("bash", "-c", script, timeout=60).stdout


# --- 1. the seed demo, as a user would run it ----------------------------------------------------

def test_seed_demo_through_lab_nodeport(k8s, namespace):
    notes = k8s.install(namespace, "demo", "lab.service.type=NodePort", workers=10, timeout="8m")
    assert "10 workers" in notes, notes

    token = run_as_user(k8s, notes_command(notes, r"get secret .*lab-token")).strip()
    assert re.fullmatch(r"\S{16,}", token), f"token command printed {token!r}"
    node_port = run_as_user(k8s, notes_command(notes, r"^NODE_PORT=") + '\necho "$NODE_PORT"').strip()
    assert node_port.isdigit(), node_port
    base = f"http://127.0.0.1:{node_port}"

    # The Lab answers through the NodePort, and refuses a request without the token.
    wait_for(lambda: imagelib.http("GET", f"{base}/api/status", token)[0] == 200, 60,
             f"JupyterLab at {base}", on_fail=lambda: k8s.describe(namespace))
    assert imagelib.http("GET", f"{base}/api/kernels")[0] in (401, 403)
    status, _ = imagelib.http("GET", f"{base}/lab", token)
    assert status == 200

    kernel = imagelib.Kernel(base, token)
    try:
        r = kernel.execute(
            "import time, socket, json\n"
            "t0 = time.monotonic()\n"
            "fun = lambda i: (time.sleep(1), socket.gethostname())[1]\n"
            "res = pmap(fun, range(13))\n"
            "print('RESULT:' + json.dumps({'hosts': res, 'wall': time.monotonic() - t0}))\n",
            timeout_s=120)
        assert r["status"] == "ok", r
        out = last_json(r["stdout"])
        workers = set(k8s.worker_pods(namespace, "demo"))
        hosts = set(out["hosts"])
        assert len(out["hosts"]) == 13
        assert hosts <= workers, (hosts, workers)
        assert len(hosts) >= 5, f"only {len(hosts)} distinct workers answered: {sorted(hosts)}"
        # 13 one-second tasks on 10 workers: two rounds, far from the 13 s of one process.
        assert out["wall"] < 8, f"pmap of 13 x 1 s took {out['wall']:.1f} s"

        r = kernel.execute(
            "res = pmap(lambda x: (x, x * x + 7, str(x)), range(1000))\n"
            "print('RESULT:' + json.dumps(res))\n", timeout_s=120)
        assert r["status"] == "ok", r
        res = last_json(r["stdout"])
        assert res == [[x, x * x + 7, str(x)] for x in range(1000)]
    finally:
        kernel.close()


# --- 2. scale down and lose workers in the middle of a job ---------------------------------------

JOB_200 = """
import json, socket, time
from pyworker import pmap
res = pmap(lambda i: (time.sleep(1), (i, socket.gethostname()))[1], range(200))
print('RESULT:' + json.dumps(res), flush=True)
"""


def test_scale_down_and_kill_workers_during_job(k8s, namespace):
    rel = "churn"
    k8s.install(namespace, rel, workers=6)
    before = set(k8s.worker_pods(namespace, rel))
    assert len(before) == 6, before
    job = k8s.lab_python(namespace, rel, JOB_200)
    try:
        time.sleep(8)  # the job is running on all workers
        assert job.poll() is None, finish(job, 30)
        k8s.helm(namespace, "upgrade", rel, "./chart", "--reuse-values", "--set", "workers=3",
                 "--wait", "--timeout", "3m")
        # Force-delete 2 of the workers that stay (not the ones already stopping).
        wait_for(lambda: len(k8s.worker_pods(namespace, rel)) == 3, 60, "the scale-down to 3")
        victims = sorted(k8s.worker_pods(namespace, rel))[:2]
        k8s.kubectl(namespace, "delete", "pod", *victims, "--grace-period=0", "--force", "--wait=false")
        assert job.poll() is None, "the job ended before the workers were killed: make it longer"
        rc, out, err = finish(job, 300)
    finally:
        if job.poll() is None:
            job.kill()
    assert rc == 0, f"{out[-3000:]}\n{err[-3000:]}"
    res = last_json(out)
    assert [i for i, _ in res] == list(range(200)), "every item's result exactly once, in order"
    # The replacement workers (Deployment back at 3) are up.
    wait_for(lambda: len(k8s.worker_pods(namespace, rel)) == 3, 120, "3 running workers after the job",
             on_fail=lambda: k8s.describe(namespace))


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
    ja = k8s.lab_python(a, "alpha", job_tagged("alpha"))
    jb = k8s.lab_python(b, "beta", job_tagged("beta"))
    try:
        ra, rb = finish(ja, 240), finish(jb, 240)
    finally:
        for j in (ja, jb):
            if j.poll() is None:
                j.kill()
    for (rc, out, err), ns, rel in ((ra, a, "alpha"), (rb, b, "beta")):
        assert rc == 0, f"{rel}: {out[-3000:]}\n{err[-3000:]}"
        res = last_json(out)
        assert [(t, i) for t, i, _ in res] == [(rel, i) for i in range(300)]
        hosts = {h for _, _, h in res}
        workers = set(k8s.worker_pods(ns, rel))
        assert hosts <= workers, f"{rel}'s items ran on pods outside the release: {hosts - workers}"


# --- 4. NetworkPolicy ----------------------------------------------------------------------------

PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 6379), timeout=5)
    s.settimeout(5)
    s.sendall(b"PING\\r\\n")
    print("REPLY:" + s.recv(200).decode(errors="replace").strip())
except OSError as exc:
    print("BLOCKED:" + repr(exc))
"""


def probe_redis(k8s, ns, name, labels, host):
    overrides = {"metadata": {"labels": labels}, "spec": {"automountServiceAccountToken": False}}
    k8s.kubectl(ns, "run", name, f"--image={imagelib.IMG}", "--image-pull-policy=Never",
                "--restart=Never", f"--overrides={json.dumps(overrides)}", "--command", "--",
                "python", "-c", PROBE, host)
    wait_for(lambda: k8s.json(ns, "pod", name)["status"].get("phase") in ("Succeeded", "Failed"),
             90, f"probe pod {name}", on_fail=lambda: k8s.describe(ns))
    return k8s.kubectl(ns, "logs", name).stdout.strip()


def test_network_policy_admits_only_release_pods(k8s, namespace):
    rel = "np"
    k8s.install(namespace, rel, "lab.enabled=false", workers=1)
    k8s.kubectl(namespace, "get", "networkpolicy", f"{rel}-pyworker-redis")
    host = f"{rel}-pyworker-redis"
    inside = probe_redis(k8s, namespace, "probe-in",
                         {"app.kubernetes.io/name": "pyworker", RELEASE_LABEL: rel}, host)
    assert inside.startswith("REPLY:") and "NOAUTH" in inside, inside
    outside = probe_redis(k8s, namespace, "probe-out", {"role": "stranger"}, host)
    if outside.startswith("REPLY:"):
        pytest.skip("the cluster's network plugin does not enforce NetworkPolicy (bridge CNI, "
                    f"docs/cluster.md): a pod without the release's labels reached Redis ({outside})")
    assert outside.startswith("BLOCKED:"), outside


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
    out = k8s.helm(namespace, "test", rel, "--logs", "--timeout", "5m").stdout
    assert "2 distinct worker pods" in out, out
    k8s.helm(namespace, "uninstall", rel, "--wait", "--timeout", "3m")
    test_pod = f"Pod/{rel}-pyworker-test-pmap"
    wait_for(lambda: set(release_leftovers(k8s, namespace, rel)) <= {test_pod}, 90,
             "the release's objects to go", on_fail=lambda: f"left: {release_leftovers(k8s, namespace, rel)}")
    assert set(named_after(k8s, namespace, rel)) <= {test_pod.lower()}
    if release_leftovers(k8s, namespace, rel):
        # The `helm test` pod is a hook with only hook-delete-policy before-hook-creation (kept so
        # `helm test --logs` can show it); Helm does not delete hook resources on uninstall.
        pytest.xfail(f"chart: `helm uninstall` leaves the `helm test` pod behind: "
                     f"{release_leftovers(k8s, namespace, rel)}")
