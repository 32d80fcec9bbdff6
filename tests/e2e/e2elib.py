"""Helpers for the end-to-end tests on the offline test cluster (docs/cluster.md).

Opt-in, because they need root, a running cluster and the built images:
    make e2e    (= set-up + cluster-up + images + PYWORKER_E2E=1 .venv/bin/python -m pytest tests/e2e)
The cluster is found through $KUBECONFIG or the fixed path ~/.cache/pyworker/cluster/admin.conf.
Each test installs into its own namespace(s) and removes them afterwards (PYWORKER_E2E_KEEP=1 keeps them).
Only 127.0.0.1 and the cluster are contacted.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PYWORKER_CACHE") or Path.home() / ".cache" / "pyworker")
IMG = os.environ.get("IMG", "pyworker/pyworker:dev")
REDIS_IMG = os.environ.get("REDIS_IMG", "pyworker/redis:dev")
CHART = "./chart"
RELEASE_LABEL = "app.kubernetes.io/instance"

# The Jupyter kernel client of the image tests (REST with urllib, websocket channels).
sys.path.insert(0, str(ROOT / "tests" / "image"))
import imagelib  # noqa: E402


def run(*cmd, timeout=300, check=True, env=None, input=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                       input=input)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def wait_for(predicate, timeout_s, what, interval_s=1.0, on_fail=None):
    return imagelib.wait_for(predicate, timeout_s, what, interval_s=interval_s, on_fail=on_fail)


class K8s:
    """kubectl/helm bound to the test cluster."""

    def __init__(self, kubectl, kubeconfig, helm):
        self.kubectl_bin, self.kubeconfig = kubectl, kubeconfig
        self.kubectl_cmd = [kubectl, "--kubeconfig", kubeconfig]
        self.helm_cmd = [helm, "--kubeconfig", kubeconfig]

    # kept for the dict-style use of the original fixture
    def __getitem__(self, key):
        return {"kubectl": self.kubectl_cmd, "helm": self.helm_cmd}[key]

    def kubectl(self, ns, *args, timeout=120, check=True, input=None):
        return run(*self.kubectl_cmd, "--namespace", ns, *args, timeout=timeout, check=check, input=input)

    def helm(self, ns, *args, timeout=400, check=True):
        return run(*self.helm_cmd, "--namespace", ns, *args, timeout=timeout, check=check)

    def json(self, ns, *args):
        return json.loads(self.kubectl(ns, "get", *args, "-o", "json").stdout)

    def pods(self, ns, selector):
        return self.json(ns, "pods", "-l", selector)["items"]

    def worker_pods(self, ns, release, running_only=True):
        items = self.pods(ns, f"{RELEASE_LABEL}={release},app.kubernetes.io/component=worker")
        if running_only:
            items = [p for p in items if p["status"].get("phase") == "Running"
                     and not p["metadata"].get("deletionTimestamp")]
        return [p["metadata"]["name"] for p in items]

    def lab_pod(self, ns, release):
        items = [p for p in self.pods(ns, f"{RELEASE_LABEL}={release},app.kubernetes.io/component=lab")
                 if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        assert len(items) == 1, [p["metadata"]["name"] for p in items]
        return items[0]["metadata"]["name"]

    def describe(self, ns):
        p = self.kubectl(ns, "get", "all,events", "-o", "wide", check=False, timeout=60)
        return p.stdout[-6000:] + p.stderr[-2000:]

    def install(self, ns, release, *sets, workers=3, timeout="5m"):
        """helm install with the local images and small worker requests (2 cores); returns stdout."""
        repo, tag = IMG.rsplit(":", 1)
        rrepo, rtag = REDIS_IMG.rsplit(":", 1)
        args = ["--set", f"workers={workers}",
                "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
                "--set", "image.pullPolicy=Never",
                "--set", f"redis.image.repository={rrepo}", "--set", f"redis.image.tag={rtag}",
                "--set", "redis.image.pullPolicy=Never",
                # 2 shared cores: 10 workers at the default 250m would not all be scheduled.
                "--set", "worker.resources.requests.cpu=10m",
                "--set", "worker.resources.requests.memory=64Mi"]
        for s in sets:
            args += ["--set", s]
        p = self.helm(ns, "install", release, CHART, *args, "--wait", "--timeout", timeout, check=False)
        if p.returncode != 0:
            raise AssertionError(f"helm install {release} -> {p.returncode}\n{p.stdout}\n{p.stderr}\n"
                                 f"{self.describe(ns)}")
        return p.stdout

    def lab_python(self, ns, release, code):
        """Start `python -c code` in the release's Lab pod (kubectl exec) in the background."""
        pod = self.lab_pod(ns, release)
        return subprocess.Popen([*self.kubectl_cmd, "--namespace", ns, "exec", pod, "-c", "lab", "--",
                                 "python", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)

    def lab_run(self, ns, release, code, check=True, timeout=120):
        """`python -c code` in the release's Lab pod, waited for (at most ``timeout`` s)."""
        return self.kubectl(ns, "exec", self.lab_pod(ns, release), "-c", "lab", "--", "python",
                            "-c", code, check=check, timeout=timeout)

    @contextlib.contextmanager
    def lab_job(self, ns, release, code):
        """lab_python as a with-block: the job is killed if the block leaves it running."""
        job = self.lab_python(ns, release, code)
        try:
            yield job
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(30)


def job_result(job, timeout, what="job"):
    """Wait (bounded) for a background job; assert it succeeded; its RESULT: JSON."""
    rc, out, err = finish(job, timeout)
    assert rc == 0, f"{what} -> {rc}\n{out[-3000:]}\n{err[-3000:]}"
    return last_json(out)


GATE_KEY = "e2e:gate"


def gated_job(n, free, task_s=0.2, **imap_kw):
    """A notebook's job of n tasks returning (i, worker pod): a PROGRESS line per result (tests
    wait for those, not for time), then the RESULT: line. Tasks of items >= free wait, in the
    worker, until the test opens the gate (open_gate: a key in the release's Redis). What a
    test does meanwhile (scale, kill, restart Redis) then happens while every live worker is
    inside a task, however fast the machine. A gate left shut fails the task after 240 s."""
    kw = "".join(f", {k}={v!r}" for k, v in imap_kw.items())
    return f"""
import json, socket, time
from pyworker import imap

def task(i):
    if i >= {free}:
        from pyworker.config import Settings
        from pyworker.connection import Redis
        s = Settings.from_env()
        r = Redis(s.redis_url, s.redis_password)
        deadline = time.monotonic() + 240
        while True:
            try:
                if r.call('EXISTS', {GATE_KEY!r}):
                    break
            except Exception:  # Redis restarting (a test's doing): ask again
                pass
            if time.monotonic() > deadline:
                raise RuntimeError('the test never opened the gate')
            time.sleep(0.1)
        r.close()
    time.sleep({task_s})
    return i, socket.gethostname()

res = []
for r in imap(task, range({n}){kw}):
    res.append(r)
    print('PROGRESS', len(res), flush=True)
print('RESULT:' + json.dumps(res), flush=True)
"""


def open_gate(k8s, ns, release, timeout_s=60):
    """Open the gate of gated_job (from the Lab pod, which has the Redis URL and password);
    retried while Redis is not answering yet (a new Redis pod), for up to timeout_s."""
    code = ("from pyworker.config import Settings; from pyworker.connection import Redis; "
            "s = Settings.from_env(); "
            f"Redis(s.redis_url, s.redis_password).call('SET', {GATE_KEY!r}, '1')")
    last = [""]

    def attempt():
        p = k8s.lab_run(ns, release, code, check=False)
        last[:] = [p.stderr[-1500:]]
        return p.returncode == 0

    wait_for(attempt, timeout_s, "the gate to open", on_fail=lambda: last[0])


def live_worker_hosts(k8s, ns, release):
    """The hosts (pod names) of the workers whose lease is current, as pyworker.status() in
    the Lab pod sees them."""
    code = ("import json; from pyworker import status; "
            "print(json.dumps([w.get('host') for w in status().alive]))")
    out = k8s.lab_run(ns, release, code).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def wait_for_line(proc, pattern, timeout_s):
    """Read a background process' stdout until a line matches pattern (bounded); what was read is
    kept for finish(). Reads the raw pipe, so no line can hide in a Python buffer."""
    import select

    proc.seen = getattr(proc, "seen", "")
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, min(1.0, deadline - time.monotonic())))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:  # the process ended
            break
        proc.seen += chunk.decode(errors="replace")
        for line in proc.seen.splitlines():
            m = re.search(pattern, line)
            if m:
                return m
    rc, out, err = finish(proc, 30) if proc.poll() is not None else (None, proc.seen, "")
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s (rc {rc})\n"
                         f"{out[-3000:]}\n{err[-3000:]}")


def namespace_factory(k8s):
    """(make, made): make(prefix) creates a fresh namespace and records it in made."""
    made = []

    def make(prefix="e2e"):
        ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
        run(*k8s.kubectl_cmd, "create", "namespace", ns)
        made.append(ns)
        return ns

    return make, made


def remove_namespaces(k8s, made):
    """Uninstall every release of the namespaces, delete them and wait (bounded), so later tests
    get the node's resources back."""
    if os.environ.get("PYWORKER_E2E_KEEP") == "1":
        return
    for ns in made:
        releases = run(*k8s.helm_cmd, "--namespace", ns, "list", "-q", check=False).stdout.split()
        for rel in releases:
            run(*k8s.helm_cmd, "--namespace", ns, "uninstall", rel, "--wait", "--timeout", "2m",
                check=False, timeout=200)
    for ns in made:
        run(*k8s.kubectl_cmd, "delete", "namespace", ns, "--wait=false", check=False)
    for ns in made:
        # --grace-period for any worker still stopping (their grace period is 300 s by default).
        run(*k8s.kubectl_cmd, "--namespace", ns, "delete", "pods", "--all", "--grace-period=0",
            "--force", "--wait=false", check=False)
    for ns in made:
        run(*k8s.kubectl_cmd, "wait", "--for=delete", f"namespace/{ns}", "--timeout=120s",
            check=False, timeout=180)


def finish(proc, timeout):
    """Wait (bounded) for a background process; returns (rc, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
        out = getattr(proc, "seen", "") + out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"background job did not finish within {timeout}s\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def last_json(stdout):
    """The last line of stdout that starts with RESULT: parsed as JSON."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT:")]
    assert lines, f"no RESULT: line in\n{stdout[-3000:]}"
    return json.loads(lines[-1][len("RESULT:"):])


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
