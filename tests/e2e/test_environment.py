"""End-to-end: the notebook's environment on every worker pod (issue 18), offline on the test
cluster: a package index served inside the cluster (a pod of our image serving wheels this test
builds), the chart's pip.packages and the notebook's pyworker.pip_install() from it, a helper
module of the notebook's folder on the workers, and a shared volume (a hostPath
PersistentVolume the test makes) that the notebook writes and every worker reads.

One release serves the module (3 workers, pip.packages=pwdemo==1.0, sharedVolume, the Lab on a
NodePort reached on 127.0.0.1); the pip_install test upgrades pwdemo, so it runs last.
"""
import base64
import json
import os
import shutil
import time
import uuid
import zipfile
from pathlib import Path

import pytest

import imagelib
from e2elib import IMG, last_json, remove_namespaces, run, wait_for

pytestmark = pytest.mark.timeout(600)

RELEASE = "env"
WORKERS = 3
INDEX_SVC = "pypi"


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel in pip's wheel format, made without a build backend. No
    top_level.txt, like the wheels of hatchling or flit."""
    dist = f"{name}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: pyworker-e2e\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
        z.writestr(f"{dist}.dist-info/RECORD", "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n")
    return path


def serve_index(k8s, ns, folder: Path):
    """A PEP 503 index of the wheels in folder, at http://pypi/simple in namespace ns: a
    ConfigMap of the files (the page and the wheels side by side) and a pod of our image
    running `python -m http.server`, behind a Service."""
    wheels = sorted(folder.glob("*.whl"))
    project = wheels[0].name.split("-")[0]
    page = "<!DOCTYPE html><html><body>\n" + "".join(
        f'<a href="{w.name}">{w.name}</a><br>\n' for w in wheels) + "</body></html>\n"
    (folder / "index.html").write_text(page)
    k8s.kubectl(ns, "create", "configmap", "pypi", *(f"--from-file={p}" for p in [folder / "index.html", *wheels]))
    repo_tag = IMG
    locked = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "privileged": False,
              "capabilities": {"drop": ["ALL"]}}
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pypi", "labels": {"app": "pypi"}},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "http", "image": repo_tag, "imagePullPolicy": "Never",
                "args": ["python", "-m", "http.server", "8080", "--directory", "/srv"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 2},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                "securityContext": locked,
                "volumeMounts": [{"name": "files", "mountPath": f"/srv/simple/{project}", "readOnly": True}],
            }],
            "volumes": [{"name": "files", "configMap": {"name": "pypi"}}],
        },
    }
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": INDEX_SVC},
           "spec": {"selector": {"app": "pypi"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    k8s.kubectl(ns, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pod, svc]}))
    k8s.kubectl(ns, "wait", "--for=condition=Ready", "pod/pypi", "--timeout=120s", timeout=150)
    return f"http://{INDEX_SVC}/simple"


@pytest.fixture(scope="module")
def shared_pv(k8s, module_namespace):
    """A ReadWriteMany hostPath PersistentVolume (the cluster has one node and no provisioner),
    owned by the image's uid (hostPath ignores fsGroup); removed afterwards."""
    cls = f"e2e-shared-{module_namespace}"
    path = Path("/var/lib/pyworker-e2e") / cls
    path.mkdir(parents=True, mode=0o770)
    os.chown(path, 1000, 1000)
    pv = {"apiVersion": "v1", "kind": "PersistentVolume",
          "metadata": {"name": cls, "labels": {"pyworker-e2e": module_namespace}},
          "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": cls,
                   "hostPath": {"path": str(path), "type": "Directory"}}}
    run(*k8s.kubectl_cmd, "apply", "-f", "-", input=json.dumps(pv))
    yield {"storage_class": cls, "path": path}
    # The release and the namespace (with the claim) go first, then the volume and its folder.
    remove_namespaces(k8s, [module_namespace])
    if os.environ.get("PYWORKER_E2E_KEEP") != "1":
        run(*k8s.kubectl_cmd, "delete", "pv", cls, "--wait=false", check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(k8s, module_namespace, shared_pv, tmp_path_factory):
    ns = module_namespace
    wheels = tmp_path_factory.mktemp("wheels")
    for version in ("1.0", "2.0"):
        build_wheel(wheels, "pwdemo", version)
    index_url = serve_index(k8s, ns, wheels)
    t0 = time.monotonic()
    k8s.install(ns, RELEASE, "pip.packages={pwdemo==1.0}", f"pip.indexUrl={index_url}",
                f"pip.trustedHosts={{{INDEX_SVC}}}",
                "sharedVolume.enabled=true", f"sharedVolume.storageClass={shared_pv['storage_class']}",
                "sharedVolume.size=1Gi", "lab.service.type=NodePort", workers=WORKERS, timeout="5m")
    print(f"helm install with pip.packages and sharedVolume --wait: {time.monotonic() - t0:.0f} s")
    port = k8s.kubectl(ns, "get", "service", f"{RELEASE}-pyworker-lab",
                       "-o", "jsonpath={.spec.ports[0].nodePort}").stdout.strip()
    token = k8s.kubectl(ns, "get", "secret", f"{RELEASE}-pyworker", "-o",
                        "jsonpath={.data.lab-token}").stdout.strip()
    token = base64.b64decode(token).decode()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: imagelib.http("GET", f"{base}/api/status", token)[0] == 200, 60,
             f"JupyterLab at {base}", on_fail=lambda: k8s.describe(ns))
    # A kernel as a notebook in the Lab's root folder (/home/jovyan/work) has it.
    kernel = imagelib.Kernel(base, token, path="")
    try:
        yield {"ns": ns, "kernel": kernel, "index_url": index_url, "pv": shared_pv}
    finally:
        kernel.close()


def run_cell(env, code, timeout_s=120):
    r = env["kernel"].execute(code, timeout_s=timeout_s)
    assert r["status"] == "ok", r
    return last_json(r["stdout"])


def on_every_worker(k8s, env, task_body, n=24):
    """pmap a task over n items (0.5 s each, one per chunk, so every worker gets some) from the
    notebook; returns {worker pod: [task results]} and asserts every worker pod answered."""
    out = run_cell(env, (
        "import json, socket, time\n"
        "def task(i):\n"
        "    time.sleep(0.5)\n"
        + "".join(f"    {line}\n" for line in task_body.strip().splitlines()) +
        f"res = pmap(task, range({n}), chunksize=1)\n"
        "print('RESULT:' + json.dumps(res))\n"), timeout_s=150)
    by_host = {}
    for host, value in out:
        by_host.setdefault(host, []).append(value)
    workers = set(k8s.worker_pods(env["ns"], RELEASE))
    assert len(workers) == WORKERS, workers
    assert set(by_host) == workers, f"answered: {sorted(by_host)}, worker pods: {sorted(workers)}"
    return by_host


def test_chart_pip_packages_reach_every_worker_and_the_lab_kernel(k8s, env):
    # The kernel imports it from the pip folder (the Lab pod's init container put it there).
    lab = run_cell(env, "import importlib, json\nm = importlib.import_module('pwdemo')\n"
                        "print('RESULT:' + json.dumps([m.__version__, m.__file__]))\n")
    assert lab == ["1.0", "/opt/pyworker/pip/pwdemo/__init__.py"]
    # Every worker imports its own copy, from its own pip folder.
    by_host = on_every_worker(k8s, env, "import pwdemo\nreturn socket.gethostname(), [pwdemo.__version__, pwdemo.__file__]")
    for host, values in by_host.items():
        assert {tuple(v) for v in values} == {("1.0", "/opt/pyworker/pip/pwdemo/__init__.py")}, host
    # The init container's log says what it did (where a failure would show).
    pod = k8s.worker_pods(env["ns"], RELEASE)[0]
    log = k8s.kubectl(env["ns"], "logs", pod, "-c", "pip-install").stdout
    assert "Successfully installed pwdemo-1.0" in log and "pip-install: done" in log, log


def test_a_helper_module_of_the_notebook_folder_runs_on_every_worker(k8s, env):
    marker = uuid.uuid4().hex
    lab = k8s.lab_pod(env["ns"], RELEASE)
    k8s.kubectl(env["ns"], "exec", "-i", lab, "-c", "lab", "--", "sh", "-c", "cat > /home/jovyan/work/helpers.py",
                input=f"import os, socket\nMARK = {marker!r}\n\ndef clean(row):\n"
                      "    return socket.gethostname(), [row.strip().upper() + '-' + MARK,\n"
                      "                                  os.path.exists('/home/jovyan/work/helpers.py')]\n")
    out = run_cell(env, "import json, os\nfrom helpers import clean\n"
                        "res = pmap(clean, [f' row{i} ' for i in range(24)], chunksize=1)\n"
                        "print('RESULT:' + json.dumps([os.getcwd(), res]))\n", timeout_s=150)
    cwd, res = out
    assert cwd == "/home/jovyan/work"
    assert [v[0] for _, v in res] == [f"ROW{i}-{marker}" for i in range(24)]
    assert not any(v[1] for _, v in res), "the workers have no helpers.py: it travelled with the function"
    workers = set(k8s.worker_pods(env["ns"], RELEASE))
    assert {host for host, _ in res} == workers


def test_a_file_the_notebook_writes_on_the_shared_volume_is_read_on_every_worker(k8s, env):
    content = f"a,b\n1,{uuid.uuid4().hex}\n"
    run_cell(env, f"import json\nopen('/home/jovyan/shared/data.csv', 'w').write({content!r})\n"
                  "print('RESULT:' + json.dumps(True))\n")
    by_host = on_every_worker(k8s, env, "return socket.gethostname(), open('/home/jovyan/shared/data.csv').read()")
    for host, values in by_host.items():
        assert set(values) == {content}, host
    # On the volume itself, owned by the notebook's user.
    f = env["pv"]["path"] / "data.csv"
    assert f.read_text() == content and f.stat().st_uid == 1000


def test_a_package_pip_cannot_install_stops_the_pod_with_pips_error_in_its_log(k8s, env):
    """A version the index does not have: the worker pod stays in its init container, whose log
    (and the pod's status) has pip's error and ours, as the NOTES say."""
    ns, rel = env["ns"], "badpip"
    repo, tag = IMG.rsplit(":", 1)
    k8s.helm(ns, "install", rel, "./chart", "--set", "workers=1", "--set", "lab.enabled=false",
             "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
             "--set", "externalRedis.url=redis://nowhere:6379/0",
             "--set", "worker.resources.requests.cpu=10m", "--set", "worker.resources.requests.memory=64Mi",
             "--set", "pip.packages={pwdemo==9.9}", "--set", f"pip.indexUrl={env['index_url']}",
             "--set", f"pip.trustedHosts={{{INDEX_SVC}}}")
    try:
        selector = f"app.kubernetes.io/instance={rel},app.kubernetes.io/component=worker"
        state = {}

        def failed():
            pods = k8s.pods(ns, selector)
            for s in (pods[0]["status"].get("initContainerStatuses") or []) if pods else []:
                term = s["state"].get("terminated") or s.get("lastState", {}).get("terminated")
                if s["name"] == "pip-install" and term:
                    state.update(pod=pods[0]["metadata"]["name"], term=term)
                    return True
            return False
        wait_for(failed, 120, "the pip-install init container to fail", on_fail=lambda: k8s.describe(ns))
        assert state["term"]["exitCode"] != 0
        assert "No matching distribution found for pwdemo==9.9" in state["term"]["message"], state
        log = k8s.kubectl(ns, "logs", state["pod"], "-c", "pip-install", "--previous=false", check=False).stdout
        if "could not install" not in log:  # restarted, and running again: the failed run's log
            log = k8s.kubectl(ns, "logs", state["pod"], "-c", "pip-install", "--previous").stdout
        assert "No matching distribution found for pwdemo==9.9" in log, log
        assert "could not install the chart's pip.packages (pwdemo==9.9)" in log, log
        # The worker itself never started.
        pod = k8s.json(ns, "pod", state["pod"])
        assert not any(s.get("state", {}).get("running") for s in pod["status"].get("containerStatuses", [])), pod["status"]
    finally:
        k8s.helm(ns, "uninstall", rel, "--wait", "--timeout", "2m", check=False, timeout=200)


def test_pip_install_from_the_notebook_reaches_every_worker(k8s, env):
    """pyworker.pip_install (issue 18 part 2) from the notebook, from the in-cluster index:
    afterwards tasks on every worker import the new version. Runs last: it upgrades pwdemo."""
    summary = run_cell(env, (
        "import json, pyworker\n"
        f"summary = pyworker.pip_install('pwdemo==2.0', index_url={env['index_url']!r})\n"
        "print(summary)\n"
        "print('RESULT:' + json.dumps({'ok': summary.ok, 'hosts': sorted(w.host or w.worker for w in summary.workers),\n"
        "                              'text': str(summary)}))\n"), timeout_s=240)
    print(summary["text"])
    assert summary["ok"], summary["text"]
    workers = set(k8s.worker_pods(env["ns"], RELEASE))
    assert set(summary["hosts"]) == workers, (summary, workers)
    by_host = on_every_worker(k8s, env, "import pwdemo\nreturn socket.gethostname(), pwdemo.__version__")
    for host, values in by_host.items():
        assert set(values) == {"2.0"}, host
    lab = run_cell(env, "import importlib.metadata, json\n"
                        "print('RESULT:' + json.dumps(importlib.metadata.version('pwdemo')))\n")
    assert lab == "2.0"
