"""What the pods look like: security, labels and selectors, the contract with the image and the
package (commands, environment, probes), NetworkPolicy, PodDisruptionBudget, config checksum."""
import pytest

from chartlib import CHART, CI_VALUES, by_kind, container, env_of, one, pod_specs

RECOMMENDED = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
               "app.kubernetes.io/component", "app.kubernetes.io/managed-by", "helm.sh/chart"}
SELECTOR_KEYS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
SCENARIOS = [None] + [p.name for p in CI_VALUES]


def render(helm, values=None, *args):
    return helm.template(*(["-f", str(CHART / "ci" / values)] if values else []), *args)


@pytest.mark.parametrize("values", SCENARIOS)
def test_every_pod_is_locked_down(helm, values):
    pods = pod_specs(render(helm, values))
    assert {n.rsplit("-", 1)[-1] for n, _, _ in pods} >= {"worker", "pmap"}
    for name, spec, _ in pods:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["runAsUser"] != 0 and psc["runAsGroup"] != 0, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        # the Lab's token (lab.allowScaling, on by default) may only scale the workers: test_lab_rbac
        assert spec["automountServiceAccountToken"] is name.endswith("-lab"), name
        assert spec["enableServiceLinks"] is False, name
        assert "hostNetwork" not in spec and "hostPID" not in spec, name
        mounts_by_volume = {v["name"] for v in spec["volumes"]}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert "add" not in sc["capabilities"], (name, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["privileged"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            paths = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in paths, f"{name}/{c['name']}: a read-only root needs a writable /tmp"
            assert {m["name"] for m in c["volumeMounts"]} <= mounts_by_volume
            assert "resources" in c, (name, c["name"])


def test_pyworker_pods_run_as_1000_and_redis_as_999(helm):
    for name, spec, labels in pod_specs(render(helm)):
        uid = 999 if labels["app.kubernetes.io/component"] == "redis" else 1000
        assert spec["securityContext"]["runAsUser"] == uid, name
        assert spec["securityContext"]["fsGroup"] == uid, name


@pytest.mark.parametrize("values", SCENARIOS)
def test_labels_and_selectors(helm, values):
    docs = render(helm, values)
    for d in docs:
        labels = d["metadata"]["labels"]
        assert RECOMMENDED <= set(labels), (d["kind"], d["metadata"]["name"])
        assert labels["app.kubernetes.io/instance"] == "par"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for d in by_kind(docs, "Deployment"):
        sel = d["spec"]["selector"]["matchLabels"]
        assert set(sel) == SELECTOR_KEYS, d["metadata"]["name"]
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert sel.items() <= pod_labels.items()
        assert RECOMMENDED <= set(pod_labels)
    components = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
                  for d in by_kind(docs, "Deployment")}
    assert "worker" in components
    for d in by_kind(docs, "Service") + by_kind(docs, "PodDisruptionBudget"):
        sel = d["spec"]["selector"] if d["kind"] == "Service" else d["spec"]["selector"]["matchLabels"]
        assert set(sel) == SELECTOR_KEYS, d["metadata"]["name"]
        assert sel["app.kubernetes.io/component"] in components


def test_component_per_part(helm):
    docs = render(helm)
    comp = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
            for d in by_kind(docs, "Deployment")}
    assert comp == {"par-pyworker-redis": "redis", "par-pyworker-worker": "worker", "par-pyworker-lab": "lab",
                    "par-pyworker-metrics": "metrics"}


def test_worker_contract(helm):
    docs = render(helm)
    c = container(docs, "Deployment", "-worker", "worker")
    assert c["image"] == "pyworker/pyworker:0.1.0"   # appVersion
    assert "command" not in c, "tini is the image's entrypoint; only args are set"
    assert c["args"] == ["pyworker", "worker"]
    env = env_of(c)
    assert env["PYWORKER_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PYWORKER_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "par-pyworker", "key": "pyworker-secret"}
    assert env["PYWORKER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "par-pyworker", "key": "redis-password"}
    assert c["envFrom"] == [{"configMapRef": {"name": "par-pyworker-config"}}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == ["pyworker", "health", "--max-age", "30"]
        assert c[probe]["timeoutSeconds"] >= 5
    cm = one(docs, "ConfigMap", "-config")["data"]
    assert cm == {"PYWORKER_REDIS_URL": "redis://par-pyworker-redis:6379/0",
                  "PYWORKER_HEARTBEAT_FILE": "/tmp/pyworker-heartbeat",
                  "PYWORKER_LEASE_S": "5", "PYWORKER_MAX_RETRIES": "3",
                  "PYWORKER_MAX_TASKS_PER_CHILD": "0", "PYWORKER_MAX_MEMORY_MB": "0"}
    spec = one(docs, "Deployment", "-worker")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 300
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/home/jovyan"}


def test_lab_contract(helm):
    docs = render(helm)
    c = container(docs, "Deployment", "-lab", "lab")
    assert "command" not in c
    assert c["args"] == ["jupyter", "lab", "--ServerApp.ip=0.0.0.0", "--ServerApp.port=8888", "--no-browser",
                         "--ServerApp.root_dir=/home/jovyan/work",
                         # no outside calls from the Lab: no news feed, no PyPI update check
                         "--LabApp.news_url=None",
                         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    env = env_of(c)
    assert env["JUPYTER_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "par-pyworker", "key": "lab-token"}
    assert {"PYWORKER_SECRET", "PYWORKER_REDIS_PASSWORD"} <= set(env)
    assert c["envFrom"] == [{"configMapRef": {"name": "par-pyworker-config"}}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/api", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8888, "protocol": "TCP"}]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp", "/home/jovyan", "/home/jovyan/work"}
    svc = one(docs, "Service", "-lab")
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["ports"][0]["targetPort"] == "http"


def test_redis_contract(helm):
    docs = render(helm, None, "--set", "redis.image.repository=pyworker/redis", "--set", "redis.image.tag=dev",
                  "--set", "redis.image.pullPolicy=Never")
    c = container(docs, "Deployment", "-redis", "redis")
    assert c["image"] == "pyworker/redis:dev" and c["imagePullPolicy"] == "Never"
    # A config file then options only, so the image's own entrypoint (tini -- redis-server, or
    # the official image's docker-entrypoint.sh, which takes a first argument ending in .conf
    # for redis-server's) stays in front.
    assert "command" not in c
    args = c["args"]
    assert args[0] == "/etc/redis-secret/redis.conf" and args[1].startswith("--")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/redis-secret")
    assert mount["readOnly"] is True
    volume = next(v for v in one(docs, "Deployment", "-redis")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == "par-pyworker"
    assert volume["secret"]["items"] == [{"key": "redis.conf", "path": "redis.conf"}]
    assert "--requirepass" not in args
    # redis-cli reads REDISCLI_AUTH: the probes' command lines carry no password.
    assert env_of(c)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "par-pyworker", "key": "redis-password"}
    for probe in ("livenessProbe", "readinessProbe"):
        cmd = c[probe]["exec"]["command"]
        assert cmd[:2] == ["sh", "-c"] and cmd[2].startswith("redis-cli ping | grep")
    assert one(docs, "Service", "-redis")["spec"]["ports"][0]["port"] == 6379


def test_default_redis_image_is_official_and_pinned(helm):
    c = container(render(helm), "Deployment", "-redis", "redis")
    repo, tag = c["image"].split(":")
    assert repo == "redis"
    assert tag[0].isdigit() and tag.count(".") == 2, "pin a full version, not a moving tag"


def test_test_pod_runs_pmap(helm):
    docs = render(helm, None, "--set", "workers=10", "--set", "image.tag=dev", "--set", "image.pullPolicy=Never")
    pod = one(docs, "Pod", "-test-pmap")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    # A passing test pod is deleted (uninstall never deletes hooks); a failing one stays for its logs.
    policy = set(pod["metadata"]["annotations"]["helm.sh/hook-delete-policy"].split(","))
    assert policy == {"before-hook-creation", "hook-succeeded"}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["activeDeadlineSeconds"] > 0
    c = pod["spec"]["containers"][0]
    assert c["image"] == "pyworker/pyworker:dev" and c["imagePullPolicy"] == "Never"
    assert c["args"][:2] == ["python", "-c"]
    script = c["args"][2]
    compile(script, "test-pmap", "exec")
    assert "from pyworker import pmap" in script and "socket.gethostname()" in script
    assert "range(tasks)" in script and "max(20, 4 * workers)" in script
    assert {"PYWORKER_SECRET", "PYWORKER_REDIS_PASSWORD"} <= set(env_of(c))
    assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "test"


def test_test_pod_script_logic(helm):
    """Run the rendered script with a stand-in pyworker: it passes with enough distinct hosts and
    fails with too few; it waits out refusals that waiting may fix (a NetworkPolicy enforcer that
    has not seen the new pod yet), not a refused password."""
    import subprocess
    import sys
    script = one(render(helm, None, "--set", "workers=3"), "Pod", "-test-pmap")["spec"]["containers"][0]["args"][2]

    def run_script(hosts, refusals=0, retryable=True):
        fake = ("import itertools, socket, sys, types\n"
                f"names = itertools.cycle(['w%d' % i for i in range({hosts})])\n"
                "socket.gethostname = lambda: next(names)\n"
                "class ConnectionError(Exception):\n"
                "    def __init__(self, m, retryable=True): super().__init__(m); self.retryable = retryable\n"
                f"refusals = [{refusals}]\n"
                "def connect():\n"
                "    if refusals[0]:\n"
                "        refusals[0] -= 1\n"
                f"        raise ConnectionError('cannot reach Redis: Connection refused', {retryable})\n"
                "sys.modules['pyworker'] = types.SimpleNamespace(pmap=lambda f, xs: [f(x) for x in xs],\n"
                "    connect=connect, ConnectionError=ConnectionError)\n"
                "import time; time.sleep = lambda s: None\n")
        return subprocess.run([sys.executable, "-c", fake + script], capture_output=True, text=True, timeout=30)

    for hosts, ok in ((3, True), (2, False)):
        proc = run_script(hosts)
        assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
        if ok:
            assert f"on {hosts} distinct worker pods (want >= 3 of 3)" in proc.stdout
    proc = run_script(3, refusals=3)
    assert proc.returncode == 0 and "on 3 distinct worker pods" in proc.stdout, proc.stdout + proc.stderr
    proc = run_script(3, refusals=1, retryable=False)
    assert proc.returncode != 0 and "Connection refused" in proc.stderr, proc.stdout + proc.stderr


def test_network_policy_admits_only_this_release(helm):
    docs = render(helm)
    np = one(docs, "NetworkPolicy", "-redis")
    redis_labels = one(docs, "Deployment", "-redis")["spec"]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert np["spec"]["policyTypes"] == ["Ingress"]
    [rule] = np["spec"]["ingress"]
    [peer] = rule["from"]
    assert set(peer) == {"podSelector"}, "no namespaceSelector or ipBlock: only pods of this namespace"
    allowed = peer["podSelector"]["matchLabels"]
    for _, _, labels in pod_specs(docs):
        assert allowed.items() <= labels.items()          # workers, Lab, test pod, Redis itself
    other_release = {**allowed, "app.kubernetes.io/instance": "other"}
    assert not allowed.items() <= other_release.items()
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]


def test_pdb(helm):
    pdb = one(render(helm), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    pdb = one(render(helm, None, "--set", "worker.podDisruptionBudget.maxUnavailable=25%"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "25%"


def test_config_checksum_rolls_pods_on_config_change_only(helm):
    def checksums(*args):
        docs = render(helm, None, *args)
        return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
                for d in by_kind(docs, "Deployment") if d["metadata"]["name"] != "par-pyworker-redis"}
    base = checksums()
    assert set(base) == {"par-pyworker-worker", "par-pyworker-lab", "par-pyworker-metrics"}
    assert len(set(base.values())) == 1
    assert checksums("--set", "workers=9") == base
    changed = checksums("--set", "worker.leaseSeconds=30")
    assert all(changed[k] != base[k] for k in base)
