"""Fixtures of the end-to-end tests (helpers: e2elib.py). Skipped unless PYWORKER_E2E=1."""
import os
import uuid
from pathlib import Path

import pytest

from e2elib import CACHE, IMG, REDIS_IMG, K8s, run


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYWORKER_E2E") == "1":
        return
    skip = pytest.mark.skip(reason="end-to-end tests on the test cluster: set PYWORKER_E2E=1 (docs/cluster.md)")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def k8s():
    """kubectl/helm bound to the test cluster; the project images loaded into it."""
    kubeconfig = os.environ.get("KUBECONFIG") or str(CACHE / "cluster" / "admin.conf")
    kubectl = str(CACHE / "cluster" / "bin" / "kubectl")
    if not (Path(kubeconfig).is_file() and Path(kubectl).exists()):
        pytest.fail(f"no test cluster ({kubeconfig}): run `make cluster-up`")
    ready = run(kubectl, "--kubeconfig", kubeconfig, "get", "--raw=/readyz", check=False)
    if ready.stdout.strip() != "ok":
        pytest.fail(f"the test cluster does not answer: run `make cluster-up`\n{ready.stderr}")
    helm = [l.split("=", 1)[1] for l in run("bash", "ci/get-helm.sh").stdout.splitlines() if l.startswith("HELM=")][0]
    run("bash", "ci/cluster-load-image.sh", IMG, REDIS_IMG, timeout=600)
    return K8s(kubectl, kubeconfig, helm)


def _namespace_factory(k8s):
    """(make, made): make(prefix) creates a fresh namespace and records it in made."""
    made = []

    def make(prefix="e2e"):
        ns = f"{prefix}-{uuid.uuid4().hex[:8]}"
        run(*k8s.kubectl_cmd, "create", "namespace", ns)
        made.append(ns)
        return ns

    return make, made


def _remove_namespaces(k8s, made):
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


@pytest.fixture
def make_namespace(k8s):
    """Factory of fresh namespaces, removed after the test."""
    make, made = _namespace_factory(k8s)
    yield make
    _remove_namespaces(k8s, made)


@pytest.fixture(scope="module")
def module_namespace(k8s):
    """One fresh namespace shared by the tests of a module, removed after them."""
    make, made = _namespace_factory(k8s)
    yield make()
    _remove_namespaces(k8s, made)


@pytest.fixture
def namespace(make_namespace):
    return make_namespace()
