"""End-to-end: the chart on the real offline test cluster (docs/cluster.md).

Opt-in, because it needs root, a running cluster and the built images:
    make cluster-up image image-redis && PYWORKER_E2E=1 python -m pytest tests/e2e
Fixtures (k8s, namespace) are in conftest.py. Each test installs into its own namespace and removes
it afterwards (PYWORKER_E2E_KEEP=1 keeps it).
"""
import re

from e2elib import run


def test_cluster_smoke():
    """A broken cluster shows here first, not as a chart failure."""
    p = run("bash", "ci/cluster-smoke.sh", check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_install_and_helm_test(k8s, namespace):
    k8s.install(namespace, "par", workers=3)
    try:
        # The test pod itself fails unless min(workers, 5) distinct worker pods answered.
        out = k8s.helm(namespace, "test", "par", "--timeout", "5m").stdout
        assert re.search(r"Phase:\s+Succeeded", out), out
        # hook-succeeded: a passing test pod is deleted.
        assert k8s.pods(namespace, "app.kubernetes.io/component=test") == []
    finally:
        k8s.helm(namespace, "uninstall", "par", "--wait", "--timeout", "2m", check=False, timeout=200)
