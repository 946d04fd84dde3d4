{{/* Names and labels. */}}

{{- define "moe-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/*
The RayService name. NOTE: 40 characters at most: KubeRay derives the RayCluster, its pods and
its Services from it by appending suffixes, and label values stop at 63.
*/}}
{{- define "moe-serve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe-serve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "moe-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moe-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "moe-serve.modelCacheClaim" -}}
{{- default (printf "%s-model-cache" (include "moe-serve.fullname" .)) .Values.modelCache.persistentVolumeClaim.existingClaim -}}
{{- end -}}

{{/* rayStartParams: KubeRay wants every value as a string (num-gpus: "4"). */}}
{{- define "moe-serve.rayStartParams" -}}
{{- $params := dict -}}
{{- range $key, $value := . -}}
{{- $_ := set $params $key (toString $value) -}}
{{- end -}}
{{- toYaml $params -}}
{{- end -}}
