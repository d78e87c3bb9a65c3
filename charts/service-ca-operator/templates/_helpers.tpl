{{/* The labels every object carries (the same as manifests/: no helm labels). */}}
{{- define "sco.labels" -}}
app.kubernetes.io/name: {{ include "sco.name" . }}
{{- end -}}

{{/* The name of every object (and of the cluster-wide RBAC objects). */}}
{{- define "sco.name" -}}
{{- .Values.name | default "service-ca-operator" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The port of operator.metricsAddr. */}}
{{- define "sco.metricsPort" -}}
{{- splitList ":" (toString .Values.operator.metricsAddr) | last | int -}}
{{- end -}}

{{/* The serving Secret of the metrics Service: the metrics server's certificate. */}}
{{- define "sco.metricsCertSecret" -}}
{{ include "sco.name" . }}-metrics-tls
{{- end -}}

{{/* The port of operator.adminAddr. */}}
{{- define "sco.adminPort" -}}
{{- splitList ":" (toString .Values.operator.adminAddr) | last | int -}}
{{- end -}}
