"""End-to-end: the chart on the real offline test cluster (docs/cluster.md).

Opt-in, because it needs root, a running cluster and the built images:
    make cluster-up image image-redis && PYWORKER_E2E=1 python -m pytest tests/e2e
The cluster is found through $KUBECONFIG or the fixed path ~/.cache/pyworker/cluster/admin.conf.
Each test installs into its own namespace and removes it afterwards (PYWORKER_E2E_KEEP=1 keeps it).
"""
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PYWORKER_CACHE") or Path.home() / ".cache" / "pyworker")
IMG = os.environ.get("IMG", "pyworker/pyworker:dev")
REDIS_IMG = os.environ.get("REDIS_IMG", "pyworker/redis:dev")

pytestmark = pytest.mark.skipif(os.environ.get("PYWORKER_E2E") != "1",
                                reason="end-to-end tests on the test cluster: set PYWORKER_E2E=1 (docs/cluster.md)")


def run(*cmd, timeout=300, check=True, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def k8s():
    """kubectl/helm command prefixes bound to the test cluster; the project images loaded into it."""
    kubeconfig = os.environ.get("KUBECONFIG") or str(CACHE / "cluster" / "admin.conf")
    kubectl = str(CACHE / "cluster" / "bin" / "kubectl")
    if not (Path(kubeconfig).is_file() and Path(kubectl).exists()):
        pytest.fail(f"no test cluster ({kubeconfig}): run `make cluster-up`")
    ready = run(kubectl, "--kubeconfig", kubeconfig, "get", "--raw=/readyz", check=False)
    if ready.stdout.strip() != "ok":
        pytest.fail(f"the test cluster does not answer: run `make cluster-up`\n{ready.stderr}")
    helm = [l.split("=", 1)[1] for l in run("bash", "ci/get-helm.sh").stdout.splitlines() if l.startswith("HELM=")][0]
    run("bash", "ci/cluster-load-image.sh", IMG, REDIS_IMG, timeout=600)
    return {"kubectl": [kubectl, "--kubeconfig", kubeconfig], "helm": [helm, "--kubeconfig", kubeconfig]}


def test_cluster_smoke():
    """A broken cluster shows here first, not as a chart failure."""
    p = run("bash", "ci/cluster-smoke.sh", check=False)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.fixture
def namespace(k8s):
    ns = f"e2e-{int(time.time())}"
    run(*k8s["kubectl"], "create", "namespace", ns)
    yield ns
    if os.environ.get("PYWORKER_E2E_KEEP") != "1":
        run(*k8s["kubectl"], "delete", "namespace", ns, "--wait=false", check=False)


def test_install_and_helm_test(k8s, namespace):
    repo, tag = IMG.rsplit(":", 1)
    rrepo, rtag = REDIS_IMG.rsplit(":", 1)
    helm = [*k8s["helm"], "--namespace", namespace]
    run(*helm, "install", "par", "./chart", "--set", "workers=3",
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
        "--set", f"redis.image.repository={rrepo}", "--set", f"redis.image.tag={rtag}",
        "--set", "redis.image.pullPolicy=Never", "--wait", "--timeout", "5m", timeout=400)
    try:
        out = run(*helm, "test", "par", "--logs", "--timeout", "5m", timeout=400).stdout
        assert "3 distinct worker pods" in out, out
    finally:
        run(*helm, "uninstall", "par", "--wait", "--timeout", "2m", check=False, timeout=200)
