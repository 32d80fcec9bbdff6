"""`python -m bench.cluster` (`make bench-cluster`): pyworker on the real offline Kubernetes cluster.

Installs the chart with 10 worker pods into a fresh namespace of the test cluster (docs/cluster.md),
then runs, from a notebook's place (a `python` in the release's JupyterLab pod, as a notebook
would), three repeats of:
  seed  the seed demo, 13 x sleep(1) -> wall time (ideal 2.0 s on 10 pods) and distinct pods,
  W1    20,000 no-op calls -> tasks/s (automatic chunking),
  W5    200 sequential one-item calls -> p50 / p99 latency,
and prints a markdown table of the medians. The namespace is removed at the end, and so are the
cluster and the Docker engine if this run started them (a cluster left running would take CPU from
the next benchmark); --keep keeps all three.

    python -m bench.cluster [--workers 10] [--repeats 3] [--keep]

Needs root: it runs `ci/cluster-up.sh`, `ci/start-dockerd.sh` and `ci/build-image.sh all` itself
(each only does what is missing). Only 127.0.0.1 and the cluster are contacted.
"""
import argparse
import inspect
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))  # the e2e tests' kubectl/helm wrapper

from bench import workloads  # noqa: E402
from e2elib import CACHE  # noqa: E402

# Runs in the Lab pod; the workload functions are shipped as source with it.
IN_POD = '''
import json, socket, statistics, time
from pyworker import get_client, pmap

def seed(pmap, workers):
    t = time.perf_counter()
    hosts = pmap(lambda i: (time.sleep(1), socket.gethostname())[1], range(13))
    return {"wall_s": time.perf_counter() - t, "pods": len(set(hosts))}

pm = lambda fn, xs: pmap(fn, xs, progress=False)
workers = get_client().live_workers()
print("PROGRESS live workers:", workers, flush=True)
runs = {"seed": [], "W1": [], "W5": []}
for r in range(REPEATS):
    for name, fn in (("seed", seed), ("W1", w1_tiny_tasks), ("W5", w5_latency)):
        runs[name].append(fn(pm, workers))
        print(f"PROGRESS repeat {r + 1}/{REPEATS} {name}: {runs[name][-1]}", flush=True)
print("RESULT:" + json.dumps({"workers": workers, "runs": runs}), flush=True)
'''


def log(msg):
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(*cmd, timeout):
    log(" ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout)


def answers(cmd, expect=None):
    """Whether a status command succeeds within 15 s (and prints ``expect``, if given)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and (expect is None or r.stdout.strip() == expect)


def stop_dockerd(timeout_s=60):
    """SIGTERM to the Docker engine (it stops its own containerd), bounded wait for it to go."""
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    if not pids:
        return
    log(f"stopping the Docker engine this run started (pid {' '.join(pids)})")
    subprocess.run(["kill", "-TERM", *pids], check=False)
    end, alive = time.monotonic() + timeout_s, pids
    while time.monotonic() < end:
        alive = [p for p in pids if Path(f"/proc/{p}/status").exists()
                 and "\nState:\tZ" not in Path(f"/proc/{p}/status").read_text()]
        if not alive:
            return
        time.sleep(0.5)
    log(f"the Docker engine did not stop within {timeout_s} s (pids {' '.join(alive)})")


def run_streaming(job, timeout_s):
    """Wait (bounded) for the job in the pod, logging its PROGRESS lines as they come."""
    lines = []

    def pump():
        for line in job.stdout:
            lines.append(line)
            if line.startswith("PROGRESS "):
                log(line[len("PROGRESS "):].rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        job.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait(30)
        raise SystemExit(f"the benchmark in the Lab pod did not finish within {timeout_s} s:\n"
                         + "".join(lines)[-3000:])
    reader.join(30)
    return job.returncode, "".join(lines), job.stderr.read()


def pod_script(repeats):
    source = "\n".join(inspect.getsource(f) for f in (
        workloads.noop, workloads.w1_tiny_tasks, workloads.w5_latency))
    return source + f"\nREPEATS = {repeats}\n" + IN_POD


def medians(runs):
    out = {}
    for name, rows in runs.items():
        out[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return out


def table(result, workers, install_s):
    m = medians(result["runs"])
    return "\n".join([
        f"pyworker on the offline test cluster: {workers} worker pods (live: {result['workers']}), "
        f"caller in the JupyterLab pod; medians of {len(result['runs']['W1'])} repeats",
        f"machine: {os.cpu_count()} cores, {platform.platform()}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; helm install --wait took {install_s:.0f} s",
        "",
        "| workload | figure | value |",
        "|---|---|---|",
        f"| seed demo 13 x 1 s | wall (ideal 2.0 s) | {m['seed']['wall_s']:.2f} s |",
        f"| seed demo 13 x 1 s | distinct pods that answered | {m['seed']['pods']:.0f} |",
        f"| W1 20,000 no-op calls | tasks/s | {m['W1']['tasks_per_s']:,.0f} |",
        f"| W5 200 one-item calls | p50 / p99 | {m['W5']['p50_ms']:.2f} / {m['W5']['p99_ms']:.2f} ms |",
    ])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true",
                    help="keep the namespace, and the cluster and Docker engine this run started")
    args = ap.parse_args(argv)
    if args.workers < 1 or args.repeats < 1:
        ap.error("--workers and --repeats must be at least 1")

    kubeconfig = os.environ.get("KUBECONFIG") or str(CACHE / "cluster" / "admin.conf")
    kubectl = str(CACHE / "cluster" / "bin" / "kubectl")
    cluster_was_up = answers([kubectl, "--kubeconfig", kubeconfig, "get", "--raw=/readyz"], "ok")
    engine_was_up = answers(["docker", "info"])
    try:
        return bench(args, kubeconfig, kubectl)
    finally:
        if args.keep:
            log("--keep: the cluster and the Docker engine keep running ('make cluster-down' stops "
                "the cluster)")
        else:
            if not cluster_was_up:
                log("stopping the cluster this run started (bash ci/cluster-down.sh)")
                subprocess.run(["bash", "ci/cluster-down.sh"], cwd=ROOT, timeout=300, check=False)
            if not engine_was_up:
                stop_dockerd()


def bench(args, kubeconfig, kubectl):
    sh("bash", "ci/cluster-up.sh", timeout=900)
    sh("bash", "ci/start-dockerd.sh", timeout=120)  # the image build needs an engine
    sh("bash", "ci/build-image.sh", "all", timeout=1800)
    from e2elib import IMG, REDIS_IMG, K8s, last_json, namespace_factory, remove_namespaces, run

    helm = [l.split("=", 1)[1] for l in run("bash", "ci/get-helm.sh").stdout.splitlines()
            if l.startswith("HELM=")][0]
    sh("bash", "ci/cluster-load-image.sh", IMG, REDIS_IMG, timeout=600)
    k8s = K8s(kubectl, kubeconfig, helm)
    make, made = namespace_factory(k8s)
    ns = make("bench")
    try:
        log(f"helm install bench ./chart --set workers={args.workers} in namespace {ns}")
        t0 = time.monotonic()
        k8s.install(ns, "bench", workers=args.workers, timeout="8m")
        install_s = time.monotonic() - t0
        log(f"installed in {install_s:.0f} s; running the workloads in the Lab pod")
        rc, out, err = run_streaming(k8s.lab_python(ns, "bench", pod_script(args.repeats)),
                                     300 + 300 * args.repeats)
        if rc != 0:
            raise SystemExit(f"the benchmark in the Lab pod failed ({rc}):\n{out[-3000:]}\n{err[-3000:]}")
        print()
        print(table(last_json(out), args.workers, install_s))
    finally:
        if args.keep:
            log(f"kept namespace {ns}")
        else:
            log(f"removing namespace {ns}")
            remove_namespaces(k8s, made)
    return 0


if __name__ == "__main__":
    sys.exit(main())
