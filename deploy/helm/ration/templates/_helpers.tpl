{{/* Chart name, truncated to a DNS label. */}}
{{- define "ration.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The StatefulSet's name. Pod names are <fullname>-<ordinal>, and rationd takes its
node id from that trailing ordinal (--node-id-from-hostname / node_id_from_hostname).
*/}}
{{- define "ration.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else if contains (include "ration.name" .) .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "ration.name" .) | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The headless Service through which peers find each other. */}}
{{- define "ration.peers" -}}
{{- printf "%s-peers" (include "ration.fullname" .) }}
{{- end }}

{{/* One pod's peer address: ration.peerAddr (list $ ordinal). */}}
{{- define "ration.peerAddr" -}}
{{- $root := index . 0 }}
{{- printf "%s-%d.%s:%d" (include "ration.fullname" $root) (int (index . 1)) (include "ration.peers" $root) (int $root.Values.ports.peer) }}
{{- end }}

{{- define "ration.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ration.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ration.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ration.labels" -}}
helm.sh/chart: {{ include "ration.chart" . }}
{{ include "ration.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "ration.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret with the TLS files. */}}
{{- define "ration.tlsSecret" -}}
{{- default (printf "%s-tls" (include "ration.fullname" .)) .Values.tls.secretName }}
{{- end }}
