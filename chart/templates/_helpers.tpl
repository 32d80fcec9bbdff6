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

{{/* pyworker.worker.pdb.fullname: the workers' PodDisruptionBudget. */}}
{{- define "pyworker.worker.pdb.fullname" -}}
{{- include "pyworker.fullname" . }}-worker-pdb
{{- end }}

{{/* pyworker.lab.fullname: the JupyterLab Deployment, Service, Ingress and PVC. */}}
{{- define "pyworker.lab.fullname" -}}
{{- include "pyworker.fullname" . }}-lab
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

{{/* pyworker.redis.image: "<repository>:<tag>" of the Redis image. */}}
{{- define "pyworker.redis.image" -}}
{{- printf "%s:%s" .Values.redis.image.repository (toString .Values.redis.image.tag) }}
{{- end }}

{{/* pyworker.redis.enabled: "true" when the chart deploys Redis (no externalRedis.url), else "". */}}
{{- define "pyworker.redis.enabled" -}}
{{- if not .Values.externalRedis.url }}true{{ end }}
{{- end }}

{{/* pyworker.redis.url: what PYWORKER_REDIS_URL is: the chart's Redis Service, or externalRedis.url. */}}
{{- define "pyworker.redis.url" -}}
{{- if .Values.externalRedis.url }}
{{- .Values.externalRedis.url }}
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
{{- if and (not $v.externalRedis.url) (or $v.externalRedis.password $v.externalRedis.existingSecret) }}
{{- $errors = append $errors "externalRedis.password/existingSecret are set but externalRedis.url is empty: set the URL, or use redis.password for the chart's Redis" }}
{{- end }}
{{- if and $v.lab.service.nodePort (eq $v.lab.service.type "ClusterIP") }}
{{- $errors = append $errors "lab.service.nodePort needs lab.service.type NodePort or LoadBalancer" }}
{{- end }}
{{- if and $v.lab.ingress.enabled (not $v.lab.enabled) }}
{{- $errors = append $errors "lab.ingress.enabled needs lab.enabled" }}
{{- end }}
{{- if $errors }}
{{- fail (printf "\n\nInvalid values for the pyworker chart:\n  - %s\n" (join "\n  - " $errors)) }}
{{- end }}
{{- end }}
