"""The chart works with an old Helm 3 (3.9, next to the 3.8 floor the chart promises): lint,
render and validate every scenario, and reject bad values. Helm 3.9 assumes Kubernetes 1.24 when
not told, which is below the chart's kubeVersion, so each render names a version."""
import pytest

from chartlib import CHART, CI_VALUES, KUBE_OLDEST, one

SCENARIOS = [p.name for p in CI_VALUES]


def test_lint_strict(helm39):
    proc = helm39.run("lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values", SCENARIOS)
def test_scenario_validates(helm39, kubernetes_validate, values):
    out = helm39.run("template", "par", str(CHART), "--kube-version", KUBE_OLDEST,
                     "-f", str(CHART / "ci" / values), check=True).stdout
    proc = kubernetes_validate(out, KUBE_OLDEST)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_same_output_as_current_helm3(helm39, helm3):
    """Given the same secrets and Kubernetes version, Helm 3.9 and Helm 3.17 render the same."""
    args = ("--kube-version", KUBE_OLDEST, "--set", "redis.password=p-of-16-characters",
            "--set", "lab.token=t-of-16-characters",
            "--set", "signingKey=k-of-16-characters", "--set", "workers=4")
    old, new = helm39.template(*args), helm3.template(*args)
    assert old == new
    assert one(old, "Deployment", "-worker")["spec"]["replicas"] == 4


@pytest.mark.parametrize("bad", ["workers=ten", "workers=-1", "nope=1"])
def test_bad_values_fail(helm39, bad):
    proc = helm39.run("template", "par", str(CHART), "--kube-version", KUBE_OLDEST, "--set", bad)
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    assert "schema" in proc.stderr
