#!/usr/bin/env python3
"""Write docs/chart.md: a table of every value of the chart (key, type, default, description).

Keys and types come from chart/values.schema.json, defaults from chart/values.yaml, descriptions
from the comment above each key in values.yaml (which starts with the key's dotted name).
Objects the chart passes to Kubernetes unchanged (resources, securityContexts, affinity, ...) are
one row each; their inner keys are Kubernetes' own.

  python3 ci/chart-docs.py            print the document
  python3 ci/chart-docs.py --write    write docs/chart.md
  python3 ci/chart-docs.py --check    exit 1 if docs/chart.md is out of date or a key has no comment
"""
import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "chart"
DOC = REPO / "docs" / "chart.md"

# How a $ref'd definition is named in the Type column.
REF_TYPES = {
    "quantity": "quantity",
    "resources": "object (ResourceRequirements)",
    "envList": "list (EnvVar)",
    "nodeSelector": "map of string",
    "tolerations": "list (Toleration)",
    "affinity": "object (Affinity)",
    "podSecurityContext": "object (PodSecurityContext)",
    "containerSecurityContext": "object (SecurityContext)",
    "pullPolicy": "string",
    "annotations": "map of string",
    "storageClass": "string",
}
NOTES = """
## Good to know

- **The `helm test` pod** is deleted when it passes, so `helm uninstall` leaves nothing behind
  (Helm never deletes hook resources itself). A failed test pod stays, for
  `kubectl logs <release>-pyworker-test-pmap`, until the next `helm test` replaces it or you delete
  it. For the same reason `helm test --logs` cannot show a passing test's output (helm/helm#9098).
- **Secrets.** The Redis password, the message signing key and the Lab token live in the Secret
  `<release>-pyworker` (keys `redis-password`, `pyworker-secret`, `lab-token`). Values you do not
  give are generated on first install and kept on `helm upgrade` (the chart looks the Secret up).
  `helm template` and `--dry-run=client` cannot look anything up, so they show new random values;
  a GitOps tool that renders with `helm template` should be given the three values explicitly.
  Pods read secrets at start: after changing one, restart them with
  `kubectl rollout restart deployment -l app.kubernetes.io/instance=<release>`.
- **Settings** (`PYWORKER_*`) are in the ConfigMap `<release>-pyworker-config`; a change rolls the
  worker and Lab pods (checksum annotation).
- **Metrics** (`metrics.enabled`, on by default; `autoscaling.enabled` deploys it too): one small
  pod runs `pyworker metrics`, Service `<release>-pyworker-metrics`, port 9090 (`metrics`).
  `GET /metrics` is Prometheus' text format: `pyworker_workers`, `pyworker_workers_busy`,
  `pyworker_tasks_queued`, `pyworker_tasks_running` (gauges), `pyworker_tasks_done_total`,
  `pyworker_tasks_failed_total`, `pyworker_items_done_total`, `pyworker_items_failed_total`
  (counters) and the histogram `pyworker_task_duration_seconds`, each labelled with its worker
  group (`group="default"`, `group="gpu"`, ...; `GET /scale?group=gpu` for one group's JSON).
  A task is what a worker takes at a time: a chunk of a `pmap`'s items, one `Executor.submit`
  call. `GET /scale` is the JSON an autoscaler reads: `{"tasks": queued + running, "queued",
  "running", "workers", "busy"}`; `/healthz` says the server runs. Each scrape is one Redis round
  trip (at most 5 s; Redis out of reach answers 503 with the reason). The counters live in Redis
  (written with the workers' heartbeats: they lag by up to a second) and survive the exporter's
  restarts. The pod holds the Redis password but not the signing key, and its port is open to
  every namespace (Prometheus and KEDA run in their own): it serves counts only, never a task,
  a function, a worker's name or a key. `metrics.serviceMonitor.enabled` /
  `metrics.podMonitor.enabled` add a Prometheus Operator ServiceMonitor / PodMonitor; without
  the operator's CRDs in the cluster the install fails with one line saying so.
- **Scaling from the notebook** (`lab.allowScaling`, on by default): `pyworker.scale(n)` in the
  Lab sets the worker Deployment's replicas (with autoscaling: its ScaledObject's
  `minReplicaCount`), and `pyworker.status()` shows desired and live workers. The Lab runs as
  the ServiceAccount `<release>-pyworker-lab`, whose Role allows get/patch/update of that one
  Deployment's `scale` subresource and nothing else (check with `kubectl auth can-i patch
  deployments.apps/<release>-pyworker-worker --subresource=scale
  --as=system:serviceaccount:<ns>:<release>-pyworker-lab`). With `lab.allowScaling=false` there
  is no Role and no token in the Lab, and `scale()` says how to enable it. A later `helm upgrade`
  sets the replicas back to `workers`: Helm 3 without asking; Helm 4, which applies server-side,
  stops with `conflict with "Python-urllib" with subresource "scale" ... .spec.replicas` (as
  after a `kubectl scale`; with autoscaling, on the ScaledObject's `.spec.minReplicaCount`)
  until you add `--force-conflicts`.
- **Volumes.** The Lab's PersistentVolumeClaim (`lab.persistence`: your notebooks) is kept by
  `helm uninstall`; delete it by hand when the notebooks can go. Redis' claim
  (`redis.persistence`) holds only queued work, which no caller can collect once the release is
  gone, so it is deleted with the release.
- **Packages and shared files.** `pip.packages` are installed at every pod start by the init
  container `pip-install` into `/opt/pyworker/pip` (first on `PYTHONPATH`); a pod stuck in
  `Init:Error` shows pip's error with `kubectl logs POD -c pip-install`. `sharedVolume` mounts one
  ReadWriteMany claim in the Lab and every worker. Examples and trade-offs: docs/environment.md.
- **Helm versions.** Tested with Helm 4.3, 3.17 and 3.9 (the chart needs 3.8 or newer). Without a
  cluster, `helm template` assumes the Kubernetes its helm was built with (Helm 3.9: 1.24, below
  the chart's 1.25 floor); pass `--kube-version 1.25.0` or newer there. `helm install` uses the
  cluster's real version.
- **Test a release:** `helm test <release>` runs a `pmap` over the workers and passes when at
  least min(workers, 5) distinct worker pods answered.
"""
AUTOSCALING = """
## Autoscaling with KEDA

`--set autoscaling.enabled=true` renders a KEDA `ScaledObject` for the worker Deployment and takes
`replicas` out of the Deployment (else every `helm upgrade` would put `workers` back and fight
KEDA). KEDA 2.x must be installed in the cluster; without its CRDs the install stops with one line
saying so. KEDA starts the first worker as soon as a task is queued (from zero when
`autoscaling.minWorkers=0`), the HorizontalPodAutoscaler it manages adds workers up to
`maxWorkers`, aiming at `tasksPerWorker` tasks per worker (wanted = ceil(tasks / tasksPerWorker)),
and after `cooldownSeconds` without a task the workers stop, down to `minWorkers`. The same window
holds between two non-zero counts, so a pause between two cells does not stop the workers the next
cell needs. Scaling up goes to the wanted count in one step of the HPA (which decides every 15 s
by default), not by its default +4 pods a step. `workers` is ignored while autoscaling is on.

**Why KEDA's `metrics-api` scaler on the chart's own metrics exporter** (`GET /scale` of
`<release>-pyworker-metrics`, field `tasks`), not its `redis` list scaler:
- The number that says how many workers are needed is tasks queued **plus tasks running**. The
  `redis` scaler reads `LLEN` of one list: queued tasks only. Workers take tasks off the queue
  long before they finish them (and hold the next one), so the list is empty while a whole wave
  of long tasks still runs: KEDA would start the cooldown and the HPA would aim below the work in
  flight. The exporter counts both, from the key layout in docs/protocol.md, which stays the
  package's business: KEDA sees one number, whatever the layout becomes.
- The exporter already has the Redis password and is admitted by the release's NetworkPolicy;
  the list scaler would need the password in a TriggerAuthentication and a way in to Redis from
  KEDA's namespace.
- The exporter is always on (one small pod; its `/metrics` serves Prometheus the same numbers), so
  KEDA can read it while there are no workers at all. `activationTargetValue: "0"`: any task
  wakes the first worker.

**Scaling down loses no task.** KEDA lowers the Deployment's replica count; Kubernetes sends
SIGTERM to the pods it removes. A worker that gets it finishes the task it is running, gives back
the one it holds, takes no other and exits; `worker.terminationGracePeriodSeconds` (default 300 s)
bounds how long that may take, so set it above your longest task. A worker killed anyway is like a
worker that died: its task runs again elsewhere once its lease (`worker.leaseSeconds`) expires,
up to `worker.maxRetries` times.

On the offline test cluster, `make keda-up` builds KEDA from its Go module and installs it
(docs/cluster.md).

## Worker groups

`workerGroups` adds a worker Deployment per named group next to the default one, for work that
needs other machines, such as GPUs:

```yaml
workerGroups:
  gpu:
    replicas: 1                      # default 1; or autoscaling below
    resources: {limits: {nvidia.com/gpu: 1}}
    nodeSelector: {nvidia.com/gpu.present: "true"}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    image: {repository: registry.example/pyworker-cuda, tag: "1.0"}   # FROM the pyworker image
    env: [{name: CUDA_MODULE_LOADING, value: LAZY}]
    autoscaling: {enabled: true, minWorkers: 0, maxWorkers: 4}
```

`pmap(fn, xs, group="gpu")` (and `imap`, `Executor(group=...)`, `Pool(group=...)`, joblib's
`parallel_config(backend="pyworker", group=...)`) runs only on that group's workers; a call
without `group=` runs on the default group (`workers`, `worker.*`). Each group is a queue of its
own in Redis (docs/protocol.md), so a group's tasks never wait behind another's and an idle
group costs nothing. A group with no live worker keeps its tasks queued until one starts (its
autoscaler, or `pyworker.scale(n, group="gpu")`); the `pmap` says it is waiting. Maps a group
sets are merged over `worker.*`'s (a group that only adds `nvidia.com/gpu` keeps `worker`'s CPU
and memory), lists replace them, `env` is appended to `worker.env`, and `autoscaling` is merged
over the top-level `autoscaling`. The group's Deployment, PodDisruptionBudget and ScaledObject are
`<release>-pyworker-worker-<group>`; its pods carry `app.kubernetes.io/component:
worker-<group>` and `PYWORKER_GROUP=<group>`.
"""

KEY_LINE = re.compile(r"^(\s*)([A-Za-z0-9_-]+):(\s|$)")
COMMENT_LINE = re.compile(r"^\s*#\s?(.*)$")


def comments(values_text):
    """{dotted key: comment text above it} for every key in values.yaml that has a comment."""
    out, stack, pending = {}, [], []
    for line in values_text.splitlines():
        m = COMMENT_LINE.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = KEY_LINE.match(line)
        if not m:
            pending = []
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if pending:
            out[".".join(k for _, k in stack)] = " ".join(pending)
        pending = []
    return out


def rows(schema, values, notes):
    """(key, type, default, description, problem) for every chart-defined key, in schema order."""
    defs = schema.get("definitions", {})

    def walk(node, path, value):
        for key, sub in node.get("properties", {}).items():
            dotted = ".".join(path + [key])
            if key == "global":
                continue
            ref = sub.get("$ref", "").rsplit("/", 1)[-1]
            resolved = defs[ref] if ref else sub
            if ref:
                typ = REF_TYPES.get(ref, ref)
            else:
                t = resolved.get("type", "any")
                typ = " or ".join(t) if isinstance(t, list) else t
                if t == "array":
                    typ = "list of " + resolved.get("items", {}).get("type", "any")
                if "enum" in resolved:
                    typ += " (" + ", ".join(map(str, resolved["enum"])) + ")"
            default = value.get(key) if isinstance(value, dict) else None
            note = notes.get(dotted, "")
            problem = None
            if not note.startswith(dotted + ":"):
                problem = f"{dotted}: the comment above it in values.yaml must start with '{dotted}:'"
            desc = note[len(dotted) + 1:].strip() if note.startswith(dotted + ":") else note
            desc = desc[:1].upper() + desc[1:]
            chart_object = not ref and resolved.get("additionalProperties") is False and "properties" in resolved
            if chart_object:
                yield dotted, "object", "", desc, problem
                yield from walk(resolved, path + [key], default)
            else:
                yield dotted, typ, json.dumps(default), desc, problem
    yield from walk(schema, [], values)


def render():
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    table = list(rows(schema, yaml.safe_load(text), comments(text)))
    problems = [p for *_, p in table if p]
    lines = [
        "# Chart values",
        "",
        "<!-- Generated by `make chart-docs` (ci/chart-docs.py) from chart/values.yaml and",
        "     chart/values.schema.json; edit those, not this file. -->",
        "",
        "Every value of the `chart/` Helm chart. Set them with `--set key=value` or `-f my-values.yaml`;",
        "`chart/values.schema.json` rejects unknown keys and wrong types, so a typo fails the install.",
        "Types in parentheses are Kubernetes objects passed through unchanged.",
        "",
        "| Key | Type | Default | Description |",
        "| --- | --- | --- | --- |",
    ]
    for key, typ, default, desc, _ in table:
        cell = (lambda s: s.replace("|", "\\|"))
        lines.append(f"| `{key}` | {cell(typ)} | {('`' + cell(default) + '`') if default else ''} | {cell(desc)} |")
    lines += ["", NOTES.strip(), "", AUTOSCALING.strip(), ""]
    return "\n".join(lines) + "\n", problems


def main(argv):
    doc, problems = render()
    if problems:
        print("\n".join(problems), file=sys.stderr)
    if "--check" in argv:
        stale = not DOC.exists() or DOC.read_text() != doc
        if stale:
            print(f"{DOC.relative_to(REPO)} is out of date: run `make chart-docs`", file=sys.stderr)
        return 1 if (stale or problems) else 0
    if problems:
        return 1
    if "--write" in argv:
        DOC.write_text(doc)
    else:
        sys.stdout.write(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
