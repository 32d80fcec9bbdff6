"""Every value is typed in the schema, commented in values.yaml (the comment starts with the
key's name) and listed in docs/chart.md; ci/get-helm.sh is idempotent."""
import importlib.util
import json
import os
import subprocess
import sys

from chartlib import CACHE, CHART, HELM_VERSIONS, REPO, find_helm


def run_docs(*args):
    return subprocess.run([sys.executable, str(REPO / "ci" / "chart-docs.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_docs_up_to_date_and_every_key_commented(need_fn):
    need_fn(importlib.util.find_spec("yaml"), "PyYAML not installed")
    proc = run_docs("--check")
    assert proc.returncode == 0, proc.stderr
    doc = (REPO / "docs" / "chart.md").read_text()
    for key in ("`workers`", "`lab.service.type`", "`redis.persistence.appendOnly`",
                "`externalRedis.existingSecret`", "`worker.terminationGracePeriodSeconds`"):
        assert key in doc


def test_docs_check_catches_an_uncommented_key(need_fn):
    need_fn(importlib.util.find_spec("yaml"), "PyYAML not installed")
    import yaml
    spec = importlib.util.spec_from_file_location("chart_docs", REPO / "ci" / "chart-docs.py")
    chart_docs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart_docs)
    text = (CHART / "values.yaml").read_text().replace("  # worker.maxRetries:", "  # how often:")
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems = [p for *_, p in chart_docs.rows(schema, yaml.safe_load(text), chart_docs.comments(text)) if p]
    assert problems == ["worker.maxRetries: the comment above it in values.yaml must start with 'worker.maxRetries:'"]


def test_schema_is_closed_everywhere():
    """Every object the chart defines rejects unknown keys."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if "properties" in node:
            assert node.get("additionalProperties") is False, path or "(root)"
            for k, sub in node["properties"].items():
                walk(sub, f"{path}.{k}" if path else k)
        for k, sub in node.get("definitions", {}).items():
            walk(sub, f"definitions.{k}")
    walk(schema, "")
    assert schema["properties"]["workers"] == {"type": "integer", "minimum": 0,
                                               "description": "Number of worker pods."}


def test_get_helm_is_idempotent(need_fn):
    paths = {name: find_helm(name) for name in HELM_VERSIONS}
    need_fn(all(paths.values()), "helm not cached: run `bash ci/get-helm.sh`")
    if os.environ.get("HELM") or os.environ.get("HELM3"):
        need_fn(False, "HELM/HELM3 set: the cache is not what the tests use")
    proc = subprocess.run(["bash", str(REPO / "ci" / "get-helm.sh")], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SKIP_VALIDATOR": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "fetching" not in proc.stderr, "a cached, verified helm must not be fetched again"
    lines = dict(line.split("=", 1) for line in proc.stdout.split())
    for name, (env, version) in HELM_VERSIONS.items():  # all three helms
        assert lines[env] == str(CACHE / "helm" / version / "helm") == paths[name]
        out = subprocess.run([lines[env], "version", "--short"], capture_output=True, text=True, timeout=30)
        assert out.stdout.startswith(version), out.stdout
