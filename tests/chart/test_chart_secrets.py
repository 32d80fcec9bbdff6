"""Secrets: generated when not given, given values used, kept across upgrades (lookup of the
existing Secret, exercised against a fake API server), and never in a ConfigMap or the NOTES."""
import base64

import pytest

from chartlib import CHART, CI_VALUES, by_kind, one
from fake_apiserver import FakeAPIServer

KEYS = {"pyworker-secret", "lab-token", "redis-password"}
GIVEN = ["--set", "redis.password=given-redis-pw-123", "--set", "lab.token=given-lab-token-456",
         "--set", "signingKey=given-signing-key-789"]


def secret_values(docs):
    data = one(docs, "Secret")["data"]
    return {k: base64.b64decode(v).decode() for k, v in data.items()}


def test_generated_when_not_given(helm):
    first, second = secret_values(helm.template()), secret_values(helm.template())
    assert set(first) == KEYS
    for key in KEYS:
        assert len(first[key]) == 40 and first[key].isalnum()
        assert first[key] != second[key], "a fresh install without lookup must generate new values"
    assert len(set(first.values())) == 3


def test_given_values_used(helm):
    values = secret_values(helm.template(*GIVEN))
    assert values == {"redis-password": "given-redis-pw-123", "lab-token": "given-lab-token-456",
                      "pyworker-secret": "given-signing-key-789"}


def _existing_secret(values, namespace="ns", release="par"):
    return {
        ("v1", "secrets", namespace, "par-pyworker"): {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "par-pyworker", "namespace": namespace,
                         "labels": {"app.kubernetes.io/managed-by": "Helm"},
                         "annotations": {"meta.helm.sh/release-name": release,
                                         "meta.helm.sh/release-namespace": namespace}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
        }
    }


def test_kept_across_upgrade(helm, tmp_path):
    """With the release's Secret already in the cluster, `lookup` finds it and the chart renders
    the same values again; a value given in --set still wins."""
    kept = {"redis-password": "kept-redis", "lab-token": "kept-token", "pyworker-secret": "kept-key"}
    with FakeAPIServer(_existing_secret(kept)) as api:
        env = {"KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig", "ns"))}
        args = ["--dry-run=server", "--set", "workers=5"]
        if helm.name == "helm4":  # helm 4 validates against the server's OpenAPI, which the fake lacks
            args.append("--disable-openapi-validation")
        docs = helm.template(*args, env=env)
        assert secret_values(docs) == kept
        assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 5
        docs = helm.template(*args, "--set", "lab.token=new-token", env=env)
        assert secret_values(docs) == {**kept, "lab-token": "new-token"}
    assert "/api/v1/namespaces/ns/secrets/par-pyworker" in api.requests, "lookup never asked the server"


def test_missing_key_in_existing_secret_is_generated(helm, tmp_path):
    """An upgrade from a release whose Secret lacks a key (e.g. Lab enabled later) adds that key."""
    with FakeAPIServer(_existing_secret({"pyworker-secret": "kept-key"})) as api:
        env = {"KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig", "ns"))}
        args = ["--dry-run=server"] + (["--disable-openapi-validation"] if helm.name == "helm4" else [])
        values = secret_values(helm.template(*args, env=env))
    assert values["pyworker-secret"] == "kept-key"
    assert len(values["redis-password"]) == 40 and len(values["lab-token"]) == 40


@pytest.mark.parametrize("values", [None] + [p.name for p in CI_VALUES])
def test_no_secret_outside_the_secret(helm, values):
    args = GIVEN + (["-f", str(CHART / "ci" / values)] if values else [])
    docs = helm.template(*args)
    secrets = set(secret_values(docs).values())
    assert secrets, "nothing to look for"
    for d in docs:
        if d["kind"] == "Secret":
            continue
        text = repr(d)
        for s in secrets:
            assert s not in text, f"a secret value appears in {d['kind']} {d['metadata']['name']}"
    for cm in by_kind(docs, "ConfigMap"):
        assert not any(k in name for name in cm["data"] for k in ("PASSWORD", "SECRET", "TOKEN"))


def test_no_secret_in_notes(helm):
    out = helm.install_dry_run(*GIVEN)
    manifest, notes = out.split("NOTES:", 1)
    assert base64.b64encode(b"given-lab-token-456").decode() in manifest  # it is in the Secret
    for s in ("given-redis-pw-123", "given-lab-token-456", "given-signing-key-789"):
        assert s not in notes
        assert base64.b64encode(s.encode()).decode() not in notes


def test_pods_read_secrets_by_reference(helm):
    docs = helm.template()
    for d in by_kind(docs, "Deployment") + by_kind(docs, "Pod"):
        spec = d["spec"]["template"]["spec"] if d["kind"] == "Deployment" else d["spec"]
        for c in spec["containers"]:
            for e in c.get("env", []):
                if any(k in e["name"] for k in ("PASSWORD", "SECRET", "TOKEN")):
                    assert "value" not in e, f"{e['name']} must come from a secretKeyRef"
                    assert e["valueFrom"]["secretKeyRef"]["name"] == "par-pyworker"
