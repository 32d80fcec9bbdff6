"""Fixtures for the chart tests: a real helm, once as Helm 4 and once as Helm 3, each isolated from
the user's helm settings, and the kubernetes-validate CLI. Missing tools skip the tests, or fail
them under PYWORKER_REQUIRE_ALL=1 (see tests/conftest.py); `bash ci/get-helm.sh` installs them."""
import contextlib
import importlib.util
import io
import shutil
import subprocess

import pytest

from chartlib import HELM_VERSIONS, MAIN_HELMS, TIMEOUT_S, Helm, find_helm, isolated_env, yaml


@pytest.fixture(scope="session", params=MAIN_HELMS)
def helm(request, tmp_path_factory, need_fn):
    """A real helm; the tests using it run once with Helm 4 and once with Helm 3."""
    need_fn(yaml, "PyYAML not installed: run `bash ci/get-helm.sh` (it comes with kubernetes-validate)")
    path = find_helm(request.param)
    need_fn(path, f"{request.param} not found: run `bash ci/get-helm.sh` (or set "
                  f"${HELM_VERSIONS[request.param][0]})")
    return Helm(request.param, path, isolated_env(tmp_path_factory.mktemp(request.param)))


def _one_helm(name, tmp_path_factory, need_fn):
    need_fn(yaml, "PyYAML not installed: run `bash ci/get-helm.sh`")
    path = find_helm(name)
    need_fn(path, f"{name} not found: run `bash ci/get-helm.sh` (or set ${HELM_VERSIONS[name][0]})")
    return Helm(name, path, isolated_env(tmp_path_factory.mktemp(name + "-only")))


@pytest.fixture(scope="session")
def helm4(tmp_path_factory, need_fn):
    """Helm 4 alone, for tests whose subject is not helm (e.g. the validator)."""
    return _one_helm("helm4", tmp_path_factory, need_fn)


@pytest.fixture(scope="session")
def helm3(tmp_path_factory, need_fn):
    """Helm 3 (current) alone."""
    return _one_helm("helm3", tmp_path_factory, need_fn)


@pytest.fixture(scope="session")
def helm39(tmp_path_factory, need_fn):
    """Helm 3.9, the oldest helm we can get here, next to the chart's Helm 3.8 floor."""
    return _one_helm("helm39", tmp_path_factory, need_fn)


@pytest.fixture(scope="session")
def kubernetes_validate_cli(need_fn):
    """`kubernetes-validate --strict --quiet -k VERSION -` as a command."""
    exe = shutil.which("kubernetes-validate")
    need_fn(exe, "kubernetes-validate not found: run `bash ci/get-helm.sh` (pip install kubernetes-validate)")

    def validate(manifest_text, kube_version):
        return subprocess.run([exe, "--strict", "--quiet", "-k", kube_version, "-"],
                              input=manifest_text, capture_output=True, text=True, timeout=TIMEOUT_S)
    return validate


@pytest.fixture(scope="session")
def kubernetes_validate(need_fn, tmp_path_factory):
    """The same check as `kubernetes-validate --strict --quiet -k VERSION FILE` (the CLI's own
    validate_file), run in this process: the package takes seconds to import (its jsonschema pulls
    in a grammar compiler when jupyter's dependencies are installed), which it then does once per
    session instead of once per manifest. tests/chart/test_chart_render.py checks the CLI agrees."""
    need_fn(importlib.util.find_spec("kubernetes_validate"),
            "kubernetes-validate not installed: run `bash ci/get-helm.sh`")
    from kubernetes_validate.utils import validate_file
    tmp = tmp_path_factory.mktemp("kubernetes-validate")

    def validate(manifest_text, kube_version):
        path = tmp / "manifest.yaml"
        path.write_text(manifest_text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = validate_file(str(path), kube_version, strict=True, quiet=True, no_warn=False)
        return subprocess.CompletedProcess(["kubernetes-validate", "--strict"], rc, out.getvalue(), "")
    return validate
