"""Helpers for the chart tests: find a real helm (4 and 3), run it isolated from the user's helm
settings, render the chart and look at what it rendered. Fixtures are in conftest.py.

helm is found through $HELM / $HELM3, else in the cache `ci/get-helm.sh` fills
(~/.cache/pyworker/helm/<version>/helm). Without it the tests skip, or fail under
PYWORKER_REQUIRE_ALL=1 (see tests/conftest.py)."""
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fake_apiserver import FakeAPIServer

try:
    import yaml
except ImportError:  # installed with kubernetes-validate by ci/get-helm.sh
    yaml = None

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "chart"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
CACHE = Path(os.environ.get("PYWORKER_CACHE") or
             Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pyworker")
# The versions ci/get-helm.sh installs; keep in step with it.
HELM_VERSIONS = {"helm4": ("HELM", "v4.3.1"), "helm3": ("HELM3", "v3.17.2"), "helm39": ("HELM39", "v3.9.4")}
# The helms every lint/template test runs with; helm39 (near the chart's Helm 3.8 floor) runs a subset.
MAIN_HELMS = ("helm3", "helm4")
# Oldest and newest Kubernetes minor the chart supports (Chart.yaml kubeVersion; the schemas
# kubernetes-validate 1.37 bundles run from 1.25 to 1.37).
KUBE_OLDEST, KUBE_NEWEST = "1.25.0", "1.37.0"
TIMEOUT_S = 60


def find_helm(which):
    env, version = HELM_VERSIONS[which]
    path = os.environ.get(env) or str(CACHE / "helm" / version / "helm")
    return path if os.access(path, os.X_OK) else None


@dataclass
class Helm:
    name: str
    path: str
    env: dict

    def run(self, *args, check=False, timeout=TIMEOUT_S, env=None):
        proc = subprocess.run([self.path, *args], capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, cwd=REPO)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
        return proc

    def template(self, *args, release="par", namespace="ns", **kw):
        """Render the chart; returns the list of manifests (dicts)."""
        out = self.run("template", release, str(CHART), "--namespace", namespace, *args,
                       check=True, **kw).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    def install_dry_run(self, *args, release="par", namespace="ns"):
        """Output of `helm install --dry-run=client` (manifest, then NOTES). Helm 4 needs no
        cluster for that; Helm 3 still asks the API server for its version and the objects, so
        it gets an empty fake one (and no OpenAPI validation, which the fake cannot serve)."""
        cmd = ["install", release, str(CHART), "--namespace", namespace, "--dry-run=client", *args]
        if self.name == "helm4":
            return self.run(*cmd, check=True).stdout
        with tempfile.TemporaryDirectory() as tmp, FakeAPIServer({}) as api:
            kubeconfig = api.kubeconfig(Path(tmp) / "kubeconfig", namespace)
            return self.run(*cmd, "--disable-openapi-validation", check=True,
                            env={"KUBECONFIG": str(kubeconfig)}).stdout

    def notes(self, *args, **kw):
        """NOTES.txt as `helm install` prints it."""
        out = self.install_dry_run(*args, **kw)
        assert "NOTES:" in out, out
        return out.split("NOTES:", 1)[1]


def isolated_env(tmp):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))}
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        (tmp / var).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / var)
    # No cluster: a kubeconfig that points nowhere, so nothing can reach a real one by accident.
    env["KUBECONFIG"] = str(tmp / "no-kubeconfig")
    return env


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name_suffix=""):
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"want one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_specs(docs):
    """(name, pod spec, pod labels) of every pod the manifests create, including the test pod."""
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            t = d["spec"]["template"]
            out.append((d["metadata"]["name"], t["spec"], t["metadata"]["labels"]))
        elif d["kind"] == "Pod":
            out.append((d["metadata"]["name"], d["spec"], d["metadata"]["labels"]))
    return out


def container(docs, kind, name_suffix, name):
    spec = one(docs, kind, name_suffix)
    spec = spec["spec"]["template"]["spec"] if kind == "Deployment" else spec["spec"]
    return next(c for c in spec["containers"] if c["name"] == name)


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}
