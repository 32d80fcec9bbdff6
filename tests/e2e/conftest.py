"""Fixtures of the end-to-end tests (helpers: e2elib.py). Skipped unless PYWORKER_E2E=1."""
import os
from pathlib import Path

import pytest

from e2elib import CACHE, IMG, REDIS_IMG, K8s, namespace_factory, remove_namespaces, run


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


@pytest.fixture
def make_namespace(k8s):
    """Factory of fresh namespaces, removed after the test."""
    make, made = namespace_factory(k8s)
    yield make
    remove_namespaces(k8s, made)


@pytest.fixture(scope="module")
def module_namespace(k8s):
    """One fresh namespace shared by the tests of a module, removed after them."""
    make, made = namespace_factory(k8s)
    yield make()
    remove_namespaces(k8s, made)


@pytest.fixture
def namespace(make_namespace):
    return make_namespace()
