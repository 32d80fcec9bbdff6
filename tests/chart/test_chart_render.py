"""The chart lints, renders valid Kubernetes objects for every scenario in chart/ci/, and rejects
bad values before rendering anything. Each test runs with Helm 4 and with Helm 3."""
import json
import re
import shutil

import pytest

from chartlib import CHART, CI_VALUES, KUBE_NEWEST, KUBE_OLDEST, by_kind, one, pod_specs

SCENARIOS = [p.name for p in CI_VALUES]


def test_scenarios_exist():
    assert {"default-values.yaml", "nodeport-values.yaml", "loadbalancer-values.yaml",
            "ingress-values.yaml", "external-redis-values.yaml", "persistence-values.yaml",
            "no-lab-values.yaml"} <= set(SCENARIOS)


def test_lint_strict(helm):
    proc = helm.run("lint", "--strict", str(CHART))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", SCENARIOS)
def test_lint_strict_scenario(helm, values):
    proc = helm.run("lint", "--strict", str(CHART), "-f", str(CHART / "ci" / values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_catches_a_broken_chart(helm, tmp_path):
    """lint --strict is known to fail on a broken template, so its passing above means something."""
    broken = tmp_path / "chart"
    shutil.copytree(CHART, broken)
    (broken / "templates" / "broken.yaml").write_text("kind: ConfigMap\n{{ .Values.nope.nope }}\n")
    proc = helm.run("lint", "--strict", str(broken))
    assert proc.returncode != 0
    assert "[ERROR]" in proc.stdout + proc.stderr


@pytest.mark.parametrize("kube", [KUBE_OLDEST, KUBE_NEWEST])
@pytest.mark.parametrize("values", SCENARIOS)
def test_scenario_validates(helm, kubernetes_validate, values, kube):
    out = helm.run("template", "par", str(CHART), "--namespace", "ns", "--kube-version", kube,
                   "-f", str(CHART / "ci" / values), check=True).stdout
    assert "kind: Deployment" in out
    proc = kubernetes_validate(out, kube)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube", [KUBE_OLDEST, KUBE_NEWEST])
def test_validator_cli_accepts_the_default_render(helm4, kubernetes_validate_cli, kube):
    out = helm4.run("template", "par", str(CHART), "--kube-version", kube, check=True).stdout
    proc = kubernetes_validate_cli(out, kube)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("mutation", [
    ("imagePullPolicy:", "imagePullPolicyy:"),      # unknown key: only --strict catches it
    ("replicas: 2", 'replicas: "two"'),             # wrong type
    ("containers:", "contaners:"),                  # required key missing
])
def test_validator_rejects_mutated_manifest(helm4, kubernetes_validate, kubernetes_validate_cli, mutation):
    """The validator runs and can fail: a mutated manifest does not pass, in process or as the CLI."""
    out = helm4.run("template", "par", str(CHART), "--kube-version", KUBE_OLDEST, check=True).stdout
    assert mutation[0] in out
    assert kubernetes_validate(out, KUBE_OLDEST).returncode == 0
    mutated = out.replace(mutation[0], mutation[1])
    for validate in (kubernetes_validate, kubernetes_validate_cli):
        proc = validate(mutated, KUBE_OLDEST)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "ERROR" in proc.stdout + proc.stderr


def test_kube_version_older_than_supported_fails(helm):
    proc = helm.run("template", "par", str(CHART), "--kube-version", "1.24.0")
    assert proc.returncode != 0
    assert "kubeVersion" in proc.stderr


@pytest.mark.parametrize("workers", [0, 1, 10])
def test_workers_sets_replicas(helm, workers):
    docs = helm.template("--set", f"workers={workers}")
    assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == workers
    script = one(docs, "Pod", "-test-pmap")["spec"]["containers"][0]["args"][-1]
    assert f"workers = {workers}\n" in script
    assert "min(workers, 5)" in script


@pytest.mark.parametrize("bad, error", [
    ("workers=ten", r"workers.*(integer|Invalid type)"),
    ("workers=-1", r"workers.*(minimum|greater than or equal)"),
    ("wrokers=3", r"(additional propert|Additional property).*wrokers"),
    ("lab.servise.type=NodePort", r"(additional propert|Additional property).*servise"),
    ("lab.service.type=External", r"lab.*service.*type"),
    ("image.pullPolicy=Sometimes", r"image.*pullPolicy"),
    ("redis.persistence.enabled=maybe", r"redis.*persistence.*enabled"),
    ("signingKey=short", r"signingKey.*(equal to 16|want 16)"),
    ("lab.token=short-token", r"lab.*token.*(equal to 16|want 16)"),
    ("redis.password=short-password", r"redis.*password.*(equal to 16|want 16)"),
    ("redis.maxmemory=lots", r"redis.*maxmemory"),
])
def test_bad_values_fail_schema_and_render_nothing(helm, bad, error):
    proc = helm.run("template", "par", str(CHART), "--set", bad)
    assert proc.returncode != 0
    assert proc.stdout.strip() == "", "a failed render must print no manifest"
    assert "schema" in proc.stderr
    assert re.search(error, proc.stderr), proc.stderr


@pytest.mark.parametrize("args, error", [
    (["--set", "externalRedis.url=redis://user:pw@redis:6379/0"], "must not contain credentials"),
    (["--set", "lab.service.nodePort=30080"], "nodePort needs lab.service.type NodePort"),
    (["--set", "externalRedis.password=x"], "externalRedis.url is empty"),
    (["--set", "lab.enabled=false", "--set", "lab.ingress.enabled=true"], "lab.ingress.enabled needs lab.enabled"),
    (["--set", "externalRedis.sentinel.master=m"], "sentinel.master needs externalRedis.sentinel.hosts"),
    (["--set", "externalRedis.sentinel.hosts={s:26379}"], "sentinel.hosts needs externalRedis.sentinel.master"),
    (["--set", "externalRedis.url=redis://r:6379/0", "--set", "externalRedis.tls.existingSecret=t"],
     "needs a rediss:// externalRedis.url"),
    (["--set", "externalRedis.url=rediss://r:6379/0", "--set", "externalRedis.tls.clientCertificate=true"],
     "clientCertificate needs externalRedis.tls.existingSecret"),
    (["--set", "externalRedis.username=u"], "externalRedis.url is empty"),
])
def test_values_checked_across_keys(helm, args, error):
    proc = helm.run("template", "par", str(CHART), *args)
    assert proc.returncode != 0
    assert proc.stdout.strip() == ""
    assert error in proc.stderr


def test_validation_lists_every_problem_at_once(helm):
    proc = helm.run("template", "par", str(CHART), "--set", "externalRedis.url=redis://:pw@r:6379",
                    "--set", "lab.service.nodePort=30080")
    assert proc.returncode != 0
    assert "must not contain credentials" in proc.stderr and "nodePort needs" in proc.stderr


def test_external_redis_deploys_no_redis(helm):
    docs = helm.template("-f", str(CHART / "ci" / "external-redis-values.yaml"))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")]
    cm = one(docs, "ConfigMap", "-config")
    assert cm["data"]["PYWORKER_REDIS_URL"] == "redis://redis.data.svc.cluster.local:6379/2"
    assert cm["data"]["PYWORKER_LEASE_S"] == "15" and cm["data"]["PYWORKER_MAX_RETRIES"] == "5"
    assert cm["data"]["PYWORKER_MAX_TASKS_PER_CHILD"] == "100"
    assert cm["data"]["PYWORKER_MAX_MEMORY_MB"] == "800"
    worker = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] == 3600
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["PYWORKER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "password"}
    assert env["OMP_NUM_THREADS"]["value"] == "1"
    assert "redis-password" not in one(docs, "Secret")["data"]


def test_managed_redis_with_sentinel_mutual_tls_and_an_acl_user(helm):
    docs = helm.template("-f", str(CHART / "ci" / "managed-redis-values.yaml"))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-redis")], "no Redis deployed"
    cm = one(docs, "ConfigMap", "-config")["data"]
    assert cm["PYWORKER_REDIS_URL"] == "rediss:///0"
    assert cm["PYWORKER_REDIS_USERNAME"] == "pyworker"
    assert cm["PYWORKER_REDIS_SENTINEL_MASTER"] == "mymaster"
    assert cm["PYWORKER_REDIS_SENTINELS"] == ("sentinel-0.sentinel.data.svc.cluster.local:26379,"
                                              "sentinel-1.sentinel.data.svc.cluster.local:26379")
    assert cm["PYWORKER_REDIS_CA_FILE"] == "/etc/pyworker/redis-tls/ca.crt"
    assert (cm["PYWORKER_REDIS_CERT_FILE"], cm["PYWORKER_REDIS_KEY_FILE"]) == (
        "/etc/pyworker/redis-tls/tls.crt", "/etc/pyworker/redis-tls/tls.key")
    pods = pod_specs(docs)
    assert len(pods) == 4  # worker, Lab, metrics, test pod: each reads the TLS Secret, read-only
    for _, spec, _ in pods:
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["redis-tls"]["secret"]["secretName"] == "managed-redis-tls"
        for c in spec["containers"]:
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            assert mounts["redis-tls"] == {"name": "redis-tls", "readOnly": True,
                                           "mountPath": "/etc/pyworker/redis-tls"}
            env = {e["name"]: e for e in c["env"]}
            assert env["PYWORKER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
                "name": "managed-redis", "key": "password"}


def test_without_tls_material_no_pod_mounts_any(helm):
    for _, spec, _ in pod_specs(helm.template("--set", "externalRedis.url=rediss://r:6379/0")):
        assert "redis-tls" not in {v["name"] for v in spec["volumes"]}


def test_external_redis_without_password_sets_none(helm):
    docs = helm.template("--set", "externalRedis.url=redis://r:6379/0")
    pods = pod_specs(docs)
    assert len(pods) == 4  # worker, Lab, metrics, test pod
    for name, spec, _ in pods:
        for c in spec["containers"]:
            # (the metrics exporter signs nothing: it has no signing key)
            assert ("PYWORKER_SECRET" in {e["name"] for e in c.get("env", [])}) is (
                not name.endswith("-metrics"))
            assert "PYWORKER_REDIS_PASSWORD" not in {e["name"] for e in c.get("env", [])}


def test_persistence(helm):
    docs = helm.template("-f", str(CHART / "ci" / "persistence-values.yaml"))
    pvcs = {d["metadata"]["name"]: d for d in by_kind(docs, "PersistentVolumeClaim")}
    assert set(pvcs) == {"par-pyworker-lab", "par-pyworker-redis"}
    assert pvcs["par-pyworker-lab"]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvcs["par-pyworker-lab"]["spec"]["storageClassName"] == "standard"
    # Notebooks survive `helm uninstall`; the queue's data goes with the release.
    assert pvcs["par-pyworker-lab"]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert "helm.sh/resource-policy" not in (pvcs["par-pyworker-redis"]["metadata"].get("annotations") or {})
    redis = one(docs, "Deployment", "-redis")["spec"]
    assert redis["strategy"]["type"] == "Recreate"
    args = redis["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    vols = {v["name"]: v for v in redis["template"]["spec"]["volumes"]}
    assert vols["data"]["persistentVolumeClaim"]["claimName"] == "par-pyworker-redis"
    lab_vols = {v["name"]: v for v in one(docs, "Deployment", "-lab")["spec"]["template"]["spec"]["volumes"]}
    assert lab_vols["work"]["persistentVolumeClaim"]["claimName"] == "par-pyworker-lab"


def test_no_persistence_uses_emptydir_and_no_aof(helm):
    docs = helm.template()
    assert not by_kind(docs, "PersistentVolumeClaim")
    args = one(docs, "Deployment", "-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--save") + 1] == ""


def test_no_lab(helm):
    docs = helm.template("-f", str(CHART / "ci" / "no-lab-values.yaml"))
    assert not [d for d in docs if d["metadata"]["name"].endswith("-lab")]
    assert not by_kind(docs, "NetworkPolicy") and not by_kind(docs, "PodDisruptionBudget")
    assert one(docs, "Deployment", "-worker")["spec"]["replicas"] == 10
    aff = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]["affinity"]
    assert "nodeAffinity" in aff and "podAntiAffinity" not in aff


def test_ingress(helm):
    docs = helm.template("-f", str(CHART / "ci" / "ingress-values.yaml"))
    ing = one(docs, "Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "lab-example-com-tls", "hosts": ["lab.example.com"]}]
    rule = ing["spec"]["rules"][0]
    assert rule["host"] == "lab.example.com"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "par-pyworker-lab", "port": {"name": "http"}}


@pytest.mark.parametrize("kind", ["NodePort", "LoadBalancer"])
def test_service_types(helm, kind):
    docs = helm.template("--set", f"lab.service.type={kind}", "--set", "lab.service.nodePort=30888")
    svc = one(docs, "Service", "-lab")
    assert svc["spec"]["type"] == kind
    assert svc["spec"]["ports"][0]["nodePort"] == 30888


def test_long_release_name_fits(helm):
    name = "a" * 53
    docs = helm.template(release=name)
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]
        for v in d["metadata"]["labels"].values():
            assert len(v) <= 63


@pytest.mark.parametrize("key", ["redis.password", "externalRedis.password"])
def test_control_characters_in_a_password_are_refused(helm, key, tmp_path):
    """A trailing newline (--set-file of a file that ends in one) is a password nobody types."""
    section = {"password": "a-password-of-16-chars\n"}
    if key.startswith("external"):
        section["url"] = "redis://r:6379/0"
    values = tmp_path / "values.json"
    values.write_text(json.dumps({key.split(".")[0]: section}))
    proc = helm.run("template", "par", str(CHART), "-f", str(values))
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    assert re.search(key.replace(".", r".*") + ".*(pattern|does not match)", proc.stderr), proc.stderr


@pytest.mark.parametrize("args", [
    ["--set", "lab.token=", "--set", "redis.password=", "--set", "signingKey="],
    ["--set", "lab.token=a-token-of-16-chars", "--set", "redis.password=a-password-of-16-c"],
    ["--set", "externalRedis.url=redis://r:6379/0", "--set", "externalRedis.password=short"],
])
def test_good_secrets_pass_the_schema(helm, args):
    """Empty means generated; an external Redis' password is whatever that Redis has."""
    assert helm.run("template", "par", str(CHART), *args).returncode == 0
