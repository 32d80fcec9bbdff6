{{/* PLACEHOLDER until branch s24-metrics lands (it defines pyworker.metricsName in _helpers.tpl): the
metrics exporter's Deployment and Service. Delete this file on merge. */}}
{{- define "pyworker.metricsName" -}}
{{- include "pyworker.fullname" . }}-metrics
{{- end }}
