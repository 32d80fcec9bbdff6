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
    assert set(first) == KEYS | {"redis.conf"}
    assert first["redis.conf"] == f'requirepass "{first["redis-password"]}"\n'
    for key in KEYS:
        assert len(first[key]) == 40 and first[key].isalnum()
        assert first[key] != second[key], "a fresh install without lookup must generate new values"
    assert len({first[key] for key in KEYS}) == 3


def test_given_values_used(helm):
    values = secret_values(helm.template(*GIVEN))
    assert values == {"redis-password": "given-redis-pw-123", "lab-token": "given-lab-token-456",
                      "pyworker-secret": "given-signing-key-789",
                      "redis.conf": 'requirepass "given-redis-pw-123"\n'}


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
        conf = {"redis.conf": 'requirepass "kept-redis"\n'}
        assert secret_values(docs) == {**kept, **conf}
        assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 5
        docs = helm.template(*args, "--set", "lab.token=new-token-of-16-chars", env=env)
        assert secret_values(docs) == {**kept, **conf, "lab-token": "new-token-of-16-chars"}
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


# --- pods roll when the values they read change, and only then ----------------------------------

def secret_checksums(docs):
    return {d["metadata"]["name"].rsplit("-", 1)[-1]:
            d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
            for d in by_kind(docs, "Deployment")}


def _upgrade(helm, tmp_path, kept, *args):
    """Render as `helm upgrade` does, with the Secret `kept` (decoded values) in the cluster."""
    with FakeAPIServer(_existing_secret(kept)) as api:
        env = {"KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig", "ns"))}
        extra = ["--disable-openapi-validation"] if helm.name == "helm4" else []
        return helm.template("--dry-run=server", *extra, *args, env=env)


def test_every_pod_template_has_a_secret_checksum(helm):
    sums = secret_checksums(helm.template())
    assert set(sums) == {"worker", "lab", "redis", "metrics"}
    assert all(len(v) == 64 for v in sums.values())
    assert len(set(sums.values())) == 3, "each pod sums the keys it reads"
    assert sums["metrics"] == sums["redis"]  # both read the Redis password alone


def test_checksums_stay_across_an_upgrade_of_generated_secrets(helm, tmp_path):
    """The first install generates the secrets (lookup finds nothing); `helm upgrade` then finds
    them in the cluster and must render the same checksums, or every upgrade after the install
    would restart Redis (losing the queues) and every pod. The checksums on the install are
    those of the values in its Secret, not of other random values."""
    installed = helm.template()
    kept = secret_values(installed)
    upgraded = _upgrade(helm, tmp_path, kept, "--set", "workers=5")
    assert secret_values(upgraded) == kept
    assert secret_checksums(upgraded) == secret_checksums(installed)


def test_given_secrets_give_the_same_checksums_every_render(helm):
    """Without lookup (helm template, GitOps) given values give stable checksums."""
    assert secret_checksums(helm.template(*GIVEN)) == secret_checksums(helm.template(*GIVEN))


@pytest.mark.parametrize("change, rolled", [
    ("signingKey=another-signing-key-0", {"worker", "lab"}),
    ("redis.password=another-redis-pw-0", {"worker", "lab", "redis", "metrics"}),
    ("lab.token=another-lab-token-000", {"lab"}),
    ("workers=7", set()),
])
def test_a_changed_secret_rolls_the_pods_that_read_it(helm, tmp_path, change, rolled):
    installed = helm.template()
    before = secret_checksums(installed)
    after = secret_checksums(_upgrade(helm, tmp_path, secret_values(installed), "--set", change))
    assert {name for name in before if before[name] != after[name]} == rolled


def test_checksums_are_salted_with_the_release(helm):
    """The same password in two releases gives two checksums (no table of known hashes helps)."""
    assert secret_checksums(helm.template(*GIVEN, release="one")) != \
        secret_checksums(helm.template(*GIVEN, release="two"))
