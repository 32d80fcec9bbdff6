{{/*
Names. One helper per resource name, so each name is defined once; every template and NOTES.txt
use these. Kubernetes names are at most 63 characters; the longest suffix below is "-worker-pdb"
(11), so the prefix is cut to 52.
*/}}

{{/* pyworker.name: the chart name, or nameOverride. */}}
{{- define "pyworker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* pyworker.fullname: "<release>-<name>", or just the release name when it already contains the name. */}}
{{- define "pyworker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := include "pyworker.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* pyworker.chart: "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "pyworker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* pyworker.secret.fullname: the Secret with the Redis password, signing key and Lab token. */}}
{{- define "pyworker.secret.fullname" -}}
{{- include "pyworker.fullname" . }}
{{- end }}

{{/* pyworker.config.fullname: the ConfigMap of PYWORKER_* settings. */}}
{{- define "pyworker.config.fullname" -}}
{{- include "pyworker.fullname" . }}-config
{{- end }}

{{/* pyworker.redis.fullname: the Redis Deployment, Service, PVC and NetworkPolicy. */}}
{{- define "pyworker.redis.fullname" -}}
{{- include "pyworker.fullname" . }}-redis
{{- end }}

{{/* pyworker.worker.fullname: the worker Deployment. */}}
{{- define "pyworker.worker.fullname" -}}
{{- include "pyworker.fullname" . }}-worker
{{- end }}

{{/* pyworker.worker.groupFullname: group .group's worker Deployment, ScaledObject and PodDisruptionBudget ("default": pyworker.worker.fullname; else "<that>-<group>"). Call with (dict "ctx" $ "group" name). */}}
{{- define "pyworker.worker.groupFullname" -}}
{{- if eq .group "default" }}
{{- include "pyworker.worker.fullname" .ctx }}
{{- else }}
{{- printf "%s-%s" (include "pyworker.worker.fullname" .ctx) .group | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* pyworker.worker.groupPdbName: group .group's PodDisruptionBudget. Call with (dict "ctx" $ "group" name). */}}
{{- define "pyworker.worker.groupPdbName" -}}
{{- if eq .group "default" }}
{{- include "pyworker.worker.pdb.fullname" .ctx }}
{{- else }}
{{- printf "%s-pdb" (include "pyworker.worker.groupFullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* pyworker.worker.component: the component label of group .group's workers ("worker", "worker-<group>": each Deployment's selector its own). Call with (dict "group" name). */}}
{{- define "pyworker.worker.component" -}}
{{- if eq .group "default" }}worker{{ else }}worker-{{ .group }}{{ end }}
{{- end }}

{{/* pyworker.worker.groups: the worker groups as YAML, name -> settings: "default" from workers/worker/autoscaling, then each of workerGroups with what it leaves out taken from worker and autoscaling (env: worker.env, then the group's). Read with fromYaml. */}}
{{- define "pyworker.worker.groups" -}}
{{- $worker := omit .Values.worker "podDisruptionBudget" "leaseSeconds" "maxRetries" "maxTasksPerChild" "maxMemoryMB" }}
{{- $auto := .Values.autoscaling | default dict }}
{{- $out := dict "default" (merge (dict "replicas" .Values.workers "autoscaling" $auto "image" (dict)) $worker) }}
{{- range $name, $g := .Values.workerGroups | default dict }}
{{- $g = $g | default dict }}
{{- $one := merge (omit $g "env" "autoscaling" "image") (deepCopy $worker) }}
{{- $_ := set $one "replicas" (hasKey $g "replicas" | ternary $g.replicas 1) }}
{{- $_ := set $one "env" (concat ($worker.env | default list) ($g.env | default list)) }}
{{- $_ := set $one "autoscaling" (merge (deepCopy ($g.autoscaling | default dict)) (deepCopy $auto)) }}
{{- $_ := set $one "image" ($g.image | default dict) }}
{{- $_ := set $out $name $one }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* pyworker.worker.autoscaledGroups: the groups whose workers KEDA scales, comma-separated. */}}
{{- define "pyworker.worker.autoscaledGroups" -}}
{{- $names := list }}
{{- range $name, $g := include "pyworker.worker.groups" . | fromYaml }}
{{- if $g.autoscaling.enabled }}{{ $names = append $names $name }}{{ end }}
{{- end }}
{{- join "," $names }}
{{- end }}

{{/* pyworker.worker.pdb.fullname: the workers' PodDisruptionBudget. */}}
{{- define "pyworker.worker.pdb.fullname" -}}
{{- include "pyworker.fullname" . }}-worker-pdb
{{- end }}

{{/* pyworker.lab.fullname: the JupyterLab Deployment, Service, Ingress and PVC. */}}
{{- define "pyworker.lab.fullname" -}}
{{- include "pyworker.fullname" . }}-lab
{{- end }}

{{/* pyworker.metricsName: the metrics exporter's Deployment, Service, NetworkPolicy and monitors (KEDA's ScaledObject reads its /scale). */}}
{{- define "pyworker.metricsName" -}}
{{- include "pyworker.fullname" . }}-metrics
{{- end }}

{{/* pyworker.metrics.enabled: "true" when the exporter is deployed: metrics.enabled, or any worker group autoscaled (the autoscaler reads it). */}}
{{- define "pyworker.metrics.enabled" -}}
{{- if or .Values.metrics.enabled (include "pyworker.worker.autoscaledGroups" .) }}true{{ end }}
{{- end }}

{{/* pyworker.lab.serviceAccountName: the Lab's ServiceAccount (its token only scales the workers, and only with lab.allowScaling). */}}
{{- define "pyworker.lab.serviceAccountName" -}}
{{- include "pyworker.fullname" . }}-lab
{{- end }}

{{/* pyworker.lab.scalerName: the Role and RoleBinding that let the Lab scale the worker Deployment (lab.allowScaling). */}}
{{- define "pyworker.lab.scalerName" -}}
{{- include "pyworker.fullname" . }}-lab-scale
{{- end }}

{{/* pyworker.lab.scaling: "true" when the Lab may scale the workers (lab.enabled and lab.allowScaling), else "". */}}
{{- define "pyworker.lab.scaling" -}}
{{- if and .Values.lab.enabled .Values.lab.allowScaling }}true{{ end }}
{{- end }}

{{/* pyworker.test.fullname: the `helm test` pod. */}}
{{- define "pyworker.test.fullname" -}}
{{- include "pyworker.fullname" . }}-test-pmap
{{- end }}

{{/*
Labels. Call with a dict: (dict "ctx" $ "component" "worker").
*/}}

{{/* pyworker.selectorLabels: the labels selectors use: name, instance and (optional) component. */}}
{{- define "pyworker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pyworker.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* pyworker.labels: the recommended labels of every resource: selector labels plus version, managed-by and chart. */}}
{{- define "pyworker.labels" -}}
{{ include "pyworker.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: {{ include "pyworker.name" .ctx }}
helm.sh/chart: {{ include "pyworker.chart" .ctx }}
{{- end }}

{{/*
Settings.
*/}}

{{/* pyworker.image: "<repository>:<tag>" of the pyworker image; the tag defaults to appVersion. */}}
{{- define "pyworker.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}

{{/* pyworker.groupImage: a worker group's image: its image.repository/tag where given, else the chart's. Call with (dict "ctx" $ "image" $group.image). */}}
{{- define "pyworker.groupImage" -}}
{{- $i := .image | default dict }}
{{- printf "%s:%s" ($i.repository | default .ctx.Values.image.repository) (toString ($i.tag | default (default .ctx.Chart.AppVersion .ctx.Values.image.tag))) }}
{{- end }}

{{/* pyworker.redis.image: "<repository>:<tag>" of the Redis image. */}}
{{- define "pyworker.redis.image" -}}
{{- printf "%s:%s" .Values.redis.image.repository (toString .Values.redis.image.tag) }}
{{- end }}

{{/* pyworker.redis.enabled: "true" when the chart deploys Redis (no externalRedis.url), else "". */}}
{{- define "pyworker.redis.enabled" -}}
{{- if not (or .Values.externalRedis.url .Values.externalRedis.sentinel.master) }}true{{ end }}
{{- end }}

{{/* pyworker.redis.url: what PYWORKER_REDIS_URL is: the chart's Redis Service, or externalRedis.url. */}}
{{- define "pyworker.redis.url" -}}
{{- if .Values.externalRedis.url }}
{{- .Values.externalRedis.url }}
{{- else if .Values.externalRedis.sentinel.master }}
{{- "redis:///0" }}
{{- else }}
{{- printf "redis://%s:6379/0" (include "pyworker.redis.fullname" .) }}
{{- end }}
{{- end }}

{{/*
pyworker.secretValue: the value of one key of the release's Secret, base64-encoded, in this order:
the value given in values, else the value the existing Secret has (so generated secrets survive
`helm upgrade`), else a new random one. `lookup` returns nothing under `helm template` and
`--dry-run=client`, so those always take the given or a random value.
Call with (dict "ctx" $ "key" "lab-token" "given" .Values.lab.token).
*/}}
{{- define "pyworker.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "pyworker.secret.fullname" .ctx) | default dict }}
{{- $data := get $existing "data" | default dict }}
{{- if .given }}
{{- .given | b64enc }}
{{- else if hasKey $data .key }}
{{- get $data .key }}
{{- else }}
{{- randAlphaNum 40 | b64enc }}
{{- end }}
{{- end }}

{{/*
pyworker.secretData: the data of the release's Secret (key -> base64 value) as JSON, worked out
once per render and kept on the root context: the Secret and the checksums on the pod templates
then see the same values, generated ones included (each randAlphaNum call would give another).
redis.conf is Redis' own setting of the password (requirepass, quoted as Redis' config parser
reads it), so that the password is on no command line.
*/}}
{{- define "pyworker.secretData" -}}
{{- if not (hasKey . "pyworkerSecretData") }}
{{- $data := dict
  "pyworker-secret" (include "pyworker.secretValue" (dict "ctx" . "key" "pyworker-secret" "given" .Values.signingKey))
  "lab-token" (include "pyworker.secretValue" (dict "ctx" . "key" "lab-token" "given" .Values.lab.token)) }}
{{- if include "pyworker.redis.enabled" . }}
{{- $password := include "pyworker.secretValue" (dict "ctx" . "key" "redis-password" "given" .Values.redis.password) }}
{{- $quoted := b64dec $password | replace "\\" "\\\\" | replace "\"" "\\\"" }}
{{- $_ := set $data "redis-password" $password }}
{{- $_ := set $data "redis.conf" (printf "requirepass \"%s\"\n" $quoted | b64enc) }}
{{- else if and .Values.externalRedis.password (not .Values.externalRedis.existingSecret) }}
{{- $_ := set $data "redis-password" (.Values.externalRedis.password | b64enc) }}
{{- end }}
{{- $_ := set . "pyworkerSecretData" $data }}
{{- end }}
{{- get . "pyworkerSecretData" | toJson }}
{{- end }}

{{/*
pyworker.secretChecksum: a pod annotation that changes when a key of the Secret the pod reads
changes (`helm upgrade --set signingKey=...`), so the pod is replaced instead of keeping the old
value until it happens to restart; it stays the same across upgrades that change none (generated
values are kept by lookup). The release's namespace and name salt the hash.
Call with (dict "ctx" $ "keys" (list "pyworker-secret" "redis-password")).
*/}}
{{- define "pyworker.secretChecksum" -}}
{{- $data := include "pyworker.secretData" .ctx | fromJson }}
{{- $parts := list .ctx.Release.Namespace .ctx.Release.Name }}
{{- range .keys }}
{{- $parts = append $parts (printf "%s=%s" . (get $data . | toString)) }}
{{- end }}
{{- join "\n" $parts | sha256sum }}
{{- end }}

{{/*
pyworker.bytes: a Kubernetes quantity (512Mi, 1G, 1.5Gi, 1073741824) in bytes, as an integer.
*/}}
{{- define "pyworker.bytes" -}}
{{- $q := toString . }}
{{- $num := regexFind "^[0-9.]+([eE][-+]?[0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $units := dict "" 1.0 "m" 0.001 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0
  "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "cannot read %q as a number of bytes: use a quantity such as 800Mi or 1Gi" $q) }}
{{- end }}
{{- mulf (float64 $num) (get $units $unit) | floor | int64 }}
{{- end }}

{{/*
pyworker.redis.maxmemory: Redis' maxmemory in bytes: redis.maxmemory if given, else 80 % of the
container's memory limit (the rest is for Redis' own overhead, client buffers and the copy-on-write
of a persistence fork), else "" (no limit given: none set).
*/}}
{{- define "pyworker.redis.maxmemory" -}}
{{- $limit := dig "limits" "memory" "" (.Values.redis.resources | default dict) }}
{{- /* (default: a `helm upgrade --reuse-values` from a chart without the key has none) */}}
{{- $given := .Values.redis.maxmemory | default "" }}
{{- if ne (toString $given) "" }}
{{- include "pyworker.bytes" $given }}
{{- else if ne (toString $limit) "" }}
{{- mulf (include "pyworker.bytes" $limit | float64) 0.8 | floor | int64 }}
{{- end }}
{{- end }}

{{/*
pyworker.redisPasswordEnv: the env entry PYWORKER_REDIS_PASSWORD (or another name, via .name)
from the right Secret; renders nothing for an external Redis without a password.
Call with (dict "ctx" $ "name" "PYWORKER_REDIS_PASSWORD").
*/}}
{{- define "pyworker.redisPasswordEnv" -}}
{{- $v := .ctx.Values }}
{{- if and $v.externalRedis.url $v.externalRedis.existingSecret }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.externalRedis.existingSecret }}
      key: {{ $v.externalRedis.existingSecretKey }}
{{- else if or (not $v.externalRedis.url) $v.externalRedis.password }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "pyworker.secret.fullname" .ctx }}
      key: redis-password
{{- end }}
{{- end }}

{{/*
pyworker.env: what every pyworker container (worker, Lab, test) gets: the ConfigMap of settings,
the secrets from the Secret, and its own pod name as PYWORKER_WORKER_NAME.
*/}}
{{- define "pyworker.envFrom" -}}
- configMapRef:
    name: {{ include "pyworker.config.fullname" . }}
{{- end }}

{{- define "pyworker.env" -}}
- name: PYWORKER_WORKER_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: PYWORKER_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "pyworker.secret.fullname" . }}
      key: pyworker-secret
{{- include "pyworker.redisPasswordEnv" (dict "ctx" . "name" "PYWORKER_REDIS_PASSWORD") }}
{{- end }}

{{/*
pyworker.redisTls: the volume and the mount of externalRedis.tls.existingSecret (the CA bundle, and
the client certificate and key), for every pyworker container; nothing without it.
Call with (dict "ctx" $ "part" "volume") or (dict "ctx" $ "part" "mount").
*/}}
{{- define "pyworker.redisTls" -}}
{{- $tls := .ctx.Values.externalRedis.tls }}
{{- if $tls.existingSecret }}
{{- if eq .part "volume" }}
- name: redis-tls
  secret:
    secretName: {{ $tls.existingSecret }}
    defaultMode: 0440
{{- else }}
- name: redis-tls
  mountPath: /etc/pyworker/redis-tls
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{/* pyworker.configChecksum: sha256 of the rendered ConfigMap; a pod annotation, so pods roll when settings change. */}}
{{- define "pyworker.configChecksum" -}}
{{- include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* pyworker.imagePullSecrets: the pod's imagePullSecrets, if any. */}}
{{- define "pyworker.imagePullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Extra packages (pip.*). They live in an emptyDir at pyworker.pip.target, first on PYTHONPATH (so
before the venv's site-packages) in the workers, the Lab and its kernels; the chart's init
container and the notebook's pyworker.pip_install() (PYWORKER_PIP_TARGET) both install there.
*/}}
{{- define "pyworker.pip.target" -}}
/opt/pyworker/pip
{{- end }}

{{/*
pyworker.pip.env: the environment of every container that imports or installs packages: where
they are, and pip's own index settings (plain values, or the URLs with credentials from
pip.existingSecret; both keys optional, so a Secret may hold just one).
*/}}
{{- define "pyworker.pip.env" -}}
{{- $p := .Values.pip | default dict -}}
- name: PYWORKER_PIP_TARGET
  value: {{ include "pyworker.pip.target" . | quote }}
- name: PYTHONPATH
  value: {{ include "pyworker.pip.target" . | quote }}
{{- if $p.existingSecret }}
- name: PIP_INDEX_URL
  valueFrom:
    secretKeyRef:
      name: {{ $p.existingSecret }}
      key: {{ $p.existingSecretIndexUrlKey }}
      optional: true
- name: PIP_EXTRA_INDEX_URL
  valueFrom:
    secretKeyRef:
      name: {{ $p.existingSecret }}
      key: {{ $p.existingSecretExtraIndexUrlKey }}
      optional: true
{{- end }}
{{- with $p.indexUrl }}
- name: PIP_INDEX_URL
  value: {{ . | quote }}
{{- end }}
{{- with $p.extraIndexUrl }}
- name: PIP_EXTRA_INDEX_URL
  value: {{ . | quote }}
{{- end }}
{{- with $p.findLinks }}
- name: PIP_FIND_LINKS
  value: {{ . | quote }}
{{- end }}
{{- with $p.trustedHosts }}
- name: PIP_TRUSTED_HOST
  value: {{ join " " . | quote }}
{{- end }}
{{- end }}

{{/*
pyworker.pip.initContainer: installs pip.packages before the pod's main container starts; nothing
without packages. The requirements are arguments of the script ("$@"), never shell text. On a
failure the last lines of the log (pip's error and ours) become the container's termination
message, which `kubectl describe pod` shows.
*/}}
{{- define "pyworker.pip.initContainer" -}}
{{- $p := .Values.pip | default dict }}
{{- if $p.packages -}}
- name: pip-install
  image: {{ include "pyworker.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - bash
    - -c
    - |
      echo "pip-install: installing $* into $PYWORKER_PIP_TARGET"
      if python -m pip install --target "$PYWORKER_PIP_TARGET" --upgrade --no-warn-script-location \
          --disable-pip-version-check --progress-bar off {{ if dig "keepImageVersions" true $p }}--constraint /opt/venv/constraints.txt {{ end }}"$@"; then
        echo "pip-install: done"
      else
        echo "pip-install: pip could not install the chart's pip.packages ($*): pip's error is above." >&2
        echo "Fix pip.packages or the index settings (pip.indexUrl, pip.existingSecret, pip.trustedHosts) and run helm upgrade." >&2
        exit 1
      fi
    - pip-install
    {{- range $p.packages }}
    - {{ . | quote }}
    {{- end }}
  env:
    {{- include "pyworker.pip.env" . | nindent 4 }}
  terminationMessagePolicy: FallbackToLogsOnError
  {{- with $p.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.containerSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: home
      mountPath: /home/jovyan
    - name: pip
      mountPath: {{ include "pyworker.pip.target" . }}
{{- end }}
{{- end }}

{{/*
pyworker.sharedVolume.claimName: the claim of sharedVolume: the given existing one, or the chart's.
*/}}
{{- define "pyworker.sharedVolume.claimName" -}}
{{- dig "existingClaim" "" (.Values.sharedVolume | default dict) | default (printf "%s-shared" (include "pyworker.fullname" .)) }}
{{- end }}

{{/*
pyworker.environmentVolumes: the volumes of the environment every worker and Lab pod shares: the pip
folder and, with sharedVolume, the shared claim. Call with (dict "ctx" $ "part" "volume") or
(dict "ctx" $ "part" "mount").
*/}}
{{- define "pyworker.environmentVolumes" -}}
{{- $shared := .ctx.Values.sharedVolume | default dict }}
{{- if eq .part "volume" -}}
- name: pip
  emptyDir: {}
{{- if $shared.enabled }}
- name: shared
  persistentVolumeClaim:
    claimName: {{ include "pyworker.sharedVolume.claimName" .ctx }}
{{- end }}
{{- else -}}
- name: pip
  mountPath: {{ include "pyworker.pip.target" .ctx }}
{{- if $shared.enabled }}
- name: shared
  mountPath: {{ $shared.mountPath }}
{{- end }}
{{- end }}
{{- end }}

{{/*
pyworker.validateValues: checks across values that the schema cannot express; fails once with
every problem listed.
*/}}
{{- define "pyworker.validateValues" -}}
{{- $v := .Values }}
{{- $errors := list }}
{{- if regexMatch "^rediss?://[^/]*@" $v.externalRedis.url }}
{{- $errors = append $errors "externalRedis.url must not contain credentials (it is stored in a ConfigMap): put the password in externalRedis.password or externalRedis.existingSecret" }}
{{- end }}
{{- if and $v.externalRedis.password $v.externalRedis.existingSecret }}
{{- $errors = append $errors "set only one of externalRedis.password and externalRedis.existingSecret" }}
{{- end }}
{{- if and $v.externalRedis.sentinel.master (not $v.externalRedis.sentinel.hosts) }}
{{- $errors = append $errors "externalRedis.sentinel.master needs externalRedis.sentinel.hosts (the sentinels, host:port)" }}
{{- end }}
{{- if and $v.externalRedis.sentinel.hosts (not $v.externalRedis.sentinel.master) }}
{{- $errors = append $errors "externalRedis.sentinel.hosts needs externalRedis.sentinel.master (the name the sentinels monitor the master under)" }}
{{- end }}
{{- if and $v.externalRedis.tls.existingSecret (not (hasPrefix "rediss://" $v.externalRedis.url)) }}
{{- $errors = append $errors "externalRedis.tls.existingSecret needs a rediss:// externalRedis.url (rediss:///0 with Sentinel)" }}
{{- end }}
{{- if and $v.externalRedis.tls.clientCertificate (not $v.externalRedis.tls.existingSecret) }}
{{- $errors = append $errors "externalRedis.tls.clientCertificate needs externalRedis.tls.existingSecret (with tls.crt and tls.key)" }}
{{- end }}
{{- if and (not (or $v.externalRedis.url $v.externalRedis.sentinel.master)) (or $v.externalRedis.password $v.externalRedis.existingSecret $v.externalRedis.username) }}
{{- $errors = append $errors "externalRedis.password/existingSecret/username are set but externalRedis.url is empty: set the URL, or use redis.password for the chart's Redis" }}
{{- end }}
{{- if and $v.lab.service.nodePort (eq $v.lab.service.type "ClusterIP") }}
{{- $errors = append $errors "lab.service.nodePort needs lab.service.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $v.lab.ingress.enabled (not $v.lab.enabled) }}
{{- $errors = append $errors "lab.ingress.enabled needs lab.enabled" }}
{{- end }}
{{- if lt (int $v.autoscaling.maxWorkers) (int $v.autoscaling.minWorkers) }}
{{- $errors = append $errors (printf "autoscaling.maxWorkers (%v) must be at least autoscaling.minWorkers (%v)" $v.autoscaling.maxWorkers $v.autoscaling.minWorkers) }}
{{- end }}
{{- $limit := dig "limits" "memory" "" ($v.redis.resources | default dict) }}
{{- $maxmemory := $v.redis.maxmemory | default "" }}
{{- if and (include "pyworker.redis.enabled" .) (ne (toString $maxmemory) "") (ne (toString $limit) "") }}
{{- if ge (include "pyworker.bytes" $maxmemory | int64) (include "pyworker.bytes" $limit | int64) }}
{{- $errors = append $errors (printf "redis.maxmemory (%v) must be below redis.resources.limits.memory (%v), with room for Redis' own overhead; leave it empty for 80 %% of the limit" $v.redis.maxmemory $limit) }}
{{- end }}
{{- end }}
{{- $pip := $v.pip | default dict }}
{{- if and $pip.existingSecret (or $pip.indexUrl $pip.extraIndexUrl) }}
{{- $errors = append $errors "set the index URLs either in pip.existingSecret or in pip.indexUrl/pip.extraIndexUrl, not both" }}
{{- end }}
{{- if dig "enabled" false ($v.sharedVolume | default dict) }}
{{- $mount := $v.sharedVolume.mountPath }}
{{- range list "/tmp" "/home/jovyan" "/home/jovyan/work" (include "pyworker.pip.target" .) "/opt/venv" "/etc/pyworker/redis-tls" }}
{{- if or (eq $mount .) (hasPrefix (printf "%s/" $mount) .) }}
{{- $errors = append $errors (printf "sharedVolume.mountPath %s would hide %s, which the pods need: choose another path, e.g. /home/jovyan/shared" $mount .) }}
{{- end }}
{{- end }}
{{- if hasPrefix "/opt/venv/" $mount }}
{{- $errors = append $errors (printf "sharedVolume.mountPath %s is inside the image's Python (/opt/venv): choose another path, e.g. /home/jovyan/shared" $mount) }}
{{- end }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nInvalid values for the pyworker chart:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
