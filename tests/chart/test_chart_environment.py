"""The notebook's environment on the workers, as the chart renders it: extra packages (pip.*)
installed by an init container into a writable folder on every pod's Python path, with index
credentials from an existing Secret; the shared volume (sharedVolume.*) at one path in the Lab
and every worker. The packages really installing is tests/e2e/test_environment.py's job; here a
real pip runs the rendered init script against a local folder of wheels."""
import re
import subprocess
import sys
import zipfile

import pytest

from chartlib import CHART, container, env_of, one

TARGET = "/opt/pyworker/pip"


def render(helm, *args):
    return helm.template(*args)


def pods(docs):
    """(worker pod spec, Lab pod spec)."""
    return (one(docs, "Deployment", "-worker")["spec"]["template"]["spec"],
            one(docs, "Deployment", "-lab")["spec"]["template"]["spec"])


def test_default_every_pod_has_the_pip_folder_on_its_path_and_no_init_container(helm):
    docs = render(helm)
    for spec, name in zip(pods(docs), ("worker", "lab")):
        assert "initContainers" not in spec, "no packages, no init container (no start delay)"
        c = next(c for c in spec["containers"] if c["name"] == name)
        env = env_of(c)
        assert env["PYWORKER_PIP_TARGET"]["value"] == TARGET
        assert env["PYTHONPATH"]["value"] == TARGET
        assert not any(k.startswith("PIP_") for k in env), "no index settings unless given"
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == TARGET)
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume == {"name": mount["name"], "emptyDir": {}}
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert not any(m["mountPath"] == "/home/jovyan/shared" for m in c["volumeMounts"])
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]


def test_packages_are_installed_by_an_init_container_in_the_worker_and_lab_pods(helm):
    docs = render(helm, "--set", "pip.packages={pwdemo==1.0,pandas>=2,mypkg @ https://h/mypkg-1.whl}",
                  "--set", "pip.indexUrl=https://pypi.example.com/simple",
                  "--set", "pip.extraIndexUrl=https://a.example/simple https://b.example/simple",
                  "--set", "pip.findLinks=https://wheels.example/", "--set", "pip.trustedHosts={idx.tools.svc}")
    for spec, name in zip(pods(docs), ("worker", "lab")):
        [init] = spec["initContainers"]
        main = next(c for c in spec["containers"] if c["name"] == name)
        assert init["name"] == "pip-install"
        assert init["image"] == main["image"] and init["imagePullPolicy"] == main["imagePullPolicy"]
        assert init["securityContext"] == main["securityContext"]
        assert init["resources"]["limits"]["memory"] and init["resources"]["requests"]["cpu"]
        assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert init["args"][:2] == ["bash", "-c"]
        script, argv0, *reqs = init["args"][2:]
        assert reqs == ["pwdemo==1.0", "pandas>=2", "mypkg @ https://h/mypkg-1.whl"], \
            "each requirement one argument, never shell text"
        assert 'python -m pip install --target "$PYWORKER_PIP_TARGET"' in script
        assert "--constraint /opt/venv/constraints.txt" in script and '"$@"' in script
        env = env_of(init)
        assert env == {k: v for k, v in env_of(main).items() if k in env}, "the same settings as the pod"
        assert env["PIP_INDEX_URL"]["value"] == "https://pypi.example.com/simple"
        assert env["PIP_EXTRA_INDEX_URL"]["value"] == "https://a.example/simple https://b.example/simple"
        assert env["PIP_FIND_LINKS"]["value"] == "https://wheels.example/"
        assert env["PIP_TRUSTED_HOST"]["value"] == "idx.tools.svc"
        assert env["PYWORKER_PIP_TARGET"]["value"] == TARGET
        # pip writes only to volumes: its target, /tmp and the home folder of the pod
        mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
        assert mounts == {"/tmp": "tmp", "/home/jovyan": "home", TARGET: "pip"}
        assert {m["mountPath"]: m["name"] for m in main["volumeMounts"]}[TARGET] == "pip"
    # the runtime pip_install of the notebook and the workers finds the same index
    assert "PIP_INDEX_URL" in env_of(container(docs, "Deployment", "-worker", "worker"))
    assert "initContainers" not in one(docs, "Pod", "-test-pmap")["spec"]


def test_keep_image_versions_off_drops_the_constraints(helm):
    docs = render(helm, "--set", "pip.packages={x}", "--set", "pip.keepImageVersions=false")
    assert "--constraint" not in pods(docs)[0]["initContainers"][0]["args"][2]


def test_index_urls_with_credentials_come_from_an_existing_secret(helm):
    docs = render(helm, "--set", "pip.packages={x}", "--set", "pip.existingSecret=pip-creds",
                  "--set", "pip.existingSecretIndexUrlKey=url")
    for spec in pods(docs):
        for c in spec["initContainers"] + spec["containers"]:
            env = env_of(c)
            assert env["PIP_INDEX_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "pip-creds", "key": "url", "optional": True}
            assert env["PIP_EXTRA_INDEX_URL"]["valueFrom"]["secretKeyRef"] == {
                "name": "pip-creds", "key": "extra-index-url", "optional": True}


def test_a_changed_package_list_rolls_the_pods(helm):
    def template(*args):
        return [one(render(helm, *args), "Deployment", suffix)["spec"]["template"] for suffix in ("-worker", "-lab")]
    assert template("--set", "pip.packages={a==1}") != template("--set", "pip.packages={a==2}")


@pytest.mark.parametrize("bad, error", [
    ("pip.packages={--index-url=https://evil/simple}", r"pip.*packages"),
    ("pip.packages={-r /etc/passwd}", r"pip.*packages"),
    ("pip.indexUrl=https://user:token@pypi.example.com/simple", r"pip.*indexUrl"),
    ("pip.indexUrl=pypi.example.com/simple", r"pip.*indexUrl"),
    ("pip.extraIndexUrl=https://u:p@h/simple", r"pip.*extraIndexUrl"),
    ("pip.findLinks=https://u:p@h/wheels", r"pip.*findLinks"),
    ("pip.keepImageVersions=maybe", r"pip.*keepImageVersions"),
    ("pip.pakages={x}", r"(additional propert|Additional property).*pakages"),
    ("sharedVolume.mountPath=shared", r"sharedVolume.*mountPath"),
    ("sharedVolume.mountPath=/", r"sharedVolume.*mountPath"),
    ("sharedVolume.mountPath=/home/jovyan/shared/", r"sharedVolume.*mountPath"),
    ("sharedVolume.accessModes={ReadWriteSome}", r"sharedVolume.*accessModes"),
    ("sharedVolume.size=lots", r"sharedVolume.*size"),
])
def test_bad_values_fail_the_schema(helm, bad, error):
    proc = helm.run("template", "par", str(CHART), "--set", bad)
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    assert "schema" in proc.stderr
    assert re.search(error, proc.stderr), proc.stderr


@pytest.mark.parametrize("args, error", [
    (["--set", "pip.existingSecret=s", "--set", "pip.indexUrl=https://h/simple"],
     "either in pip.existingSecret or in pip.indexUrl/pip.extraIndexUrl"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/home/jovyan"],
     "sharedVolume.mountPath /home/jovyan would hide /home/jovyan,"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/home"],
     "sharedVolume.mountPath /home would hide /home/jovyan,"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/home/jovyan/work"],
     "would hide /home/jovyan/work"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/opt"],
     "would hide /opt/pyworker/pip"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/tmp"], "would hide /tmp"),
    (["--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/opt/venv/data"],
     "inside the image's Python"),
])
def test_values_checked_across_keys(helm, args, error):
    proc = helm.run("template", "par", str(CHART), *args)
    assert proc.returncode != 0 and proc.stdout.strip() == ""
    assert error in proc.stderr, proc.stderr


def test_shared_volume_new_claim_mounted_at_one_path_in_lab_and_workers(helm):
    docs = render(helm, "--set", "sharedVolume.enabled=true", "--set", "sharedVolume.storageClass=nfs-csi",
                  "--set", "sharedVolume.size=50Gi")
    pvc = one(docs, "PersistentVolumeClaim", "-shared")
    assert pvc["metadata"]["name"] == "par-pyworker-shared"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs-csi",
                           "resources": {"requests": {"storage": "50Gi"}}}
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", "users' data outlives a release"
    for spec, name in zip(pods(docs), ("worker", "lab")):
        c = next(c for c in spec["containers"] if c["name"] == name)
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/home/jovyan/shared")
        assert not mount.get("readOnly")
        volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"] == {"claimName": "par-pyworker-shared"}
        # the non-root user writes there: the volume's group is the pods' fsGroup
        assert spec["securityContext"]["fsGroup"] == 1000


def test_shared_volume_existing_claim_and_no_provisioning(helm):
    docs = render(helm, "--set", "sharedVolume.enabled=true", "--set", "sharedVolume.existingClaim=team-data",
                  "--set", "sharedVolume.mountPath=/data/team")
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    for spec, name in zip(pods(docs), ("worker", "lab")):
        c = next(c for c in spec["containers"] if c["name"] == name)
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/data/team")
        assert next(v for v in spec["volumes"] if v["name"] == mount["name"])["persistentVolumeClaim"] == {
            "claimName": "team-data"}
    pvc = one(render(helm, "--set", "sharedVolume.enabled=true", "--set", "sharedVolume.storageClass=-"),
              "PersistentVolumeClaim", "-shared")
    assert pvc["spec"]["storageClassName"] == ""


def test_network_policy_leaves_egress_to_a_package_index_open(helm):
    """The init container and pip_install reach the index: no policy of the chart selects the
    worker or Lab pods, and those it has (Redis', the metrics exporter's) restrict ingress only."""
    docs = render(helm, "--set", "pip.packages={x}")
    for np in [d for d in docs if d["kind"] == "NetworkPolicy"]:
        assert "Egress" not in np["spec"]["policyTypes"]
        assert np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] in (
            "redis", "metrics")


def test_notes_say_where_pip_errors_and_shared_files_are(helm):
    notes = helm.notes("--set", "pip.packages={pwdemo==1.0}", "--set", "sharedVolume.enabled=true")
    assert "logs POD -c pip-install" in notes and "pwdemo==1.0" in notes
    assert "mounted at /home/jovyan/shared" in notes
    plain = helm.notes()
    assert "pip-install" not in plain and "shared volume" not in plain


def _wheel(tmp_path, name, version):
    """A pure-Python wheel, written as pip's wheel format wants it (no build backend needed)."""
    dist = f"{name}-{version}"
    path = tmp_path / f"{dist}-py3-none-any.whl"
    files = {f"{name}/__init__.py": f"__version__ = {version!r}\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
        z.writestr(f"{dist}.dist-info/RECORD", record)
    return path


def _run_init_script(helm, tmp_path, *sets):
    spec = pods(render(helm, "--set", "pip.keepImageVersions=false", *sets))[0]
    init = spec["initContainers"][0]
    target = tmp_path / "target"
    target.mkdir(exist_ok=True)
    env = {"PATH": f"{sys.prefix}/bin:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
           "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PYWORKER_PIP_TARGET": str(target)}
    proc = subprocess.run(init["args"], capture_output=True, text=True, env=env, timeout=120)
    return proc, target


def test_the_rendered_init_script_installs_with_a_real_pip_and_fails_clearly(helm, tmp_path):
    """The script the init container runs, run here by a real pip (offline, from a folder of
    wheels): it installs into PYWORKER_PIP_TARGET; a requirement pip cannot meet fails it with
    pip's error and ours, naming the values to fix."""
    (tmp_path / "wheels").mkdir()
    _wheel(tmp_path / "wheels", "pwdemo", "1.0")
    proc, target = _run_init_script(helm, tmp_path, "--set", "pip.packages={pwdemo==1.0}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "pwdemo" / "__init__.py").read_text() == "__version__ = '1.0'\n"
    assert "pip-install: done" in proc.stdout

    proc, _ = _run_init_script(helm, tmp_path, "--set", "pip.packages={pwdemo==9.9}")
    assert proc.returncode != 0
    assert "No matching distribution found for pwdemo==9.9" in proc.stderr, proc.stderr
    assert "could not install the chart's pip.packages (pwdemo==9.9)" in proc.stderr
    assert "helm upgrade" in proc.stderr


def test_values_of_a_release_from_before_pip_and_shared_volume_render(helm):
    """`helm upgrade --reuse-values` from a chart without pip.* and sharedVolume.* renders with
    the old release's values, which lack them (null removes a key, like that): the pods get the
    pip folder (for pip_install) and no init container or shared volume."""
    docs = render(helm, "--set", "pip=null", "--set", "sharedVolume=null")
    for spec in pods(docs):
        assert "initContainers" not in spec
        assert {v["name"] for v in spec["volumes"]} >= {"pip"} and "shared" not in {v["name"] for v in spec["volumes"]}
    assert "pip-install" not in helm.notes("--set", "pip=null", "--set", "sharedVolume=null")


def test_a_shared_volume_inside_the_notebook_folder_is_allowed(helm):
    """Under /home/jovyan/work the Lab's file browser shows it; the workers have the same path."""
    docs = render(helm, "--set", "sharedVolume.enabled=true", "--set", "sharedVolume.mountPath=/home/jovyan/work/shared")
    for spec, name in zip(pods(docs), ("worker", "lab")):
        c = next(c for c in spec["containers"] if c["name"] == name)
        assert "/home/jovyan/work/shared" in {m["mountPath"] for m in c["volumeMounts"]}
