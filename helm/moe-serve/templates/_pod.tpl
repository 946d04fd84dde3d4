{{/*
Pod pieces shared by the head and the worker group. Called with
(dict "root" $ "group" .Values.head|.Values.worker "name" container-name "gpus" N "head" bool).
*/}}

{{- define "moe-serve.podTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "moe-serve.selectorLabels" $root | nindent 4 }}
    {{- with .group.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .group.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - {{ include "moe-serve.rayContainer" . | indent 6 | trim }}
  volumes:
    - name: model-cache
      {{- if $root.Values.modelCache.persistentVolumeClaim.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "moe-serve.modelCacheClaim" $root }}
      {{- else }}
      emptyDir:
        {{- toYaml $root.Values.modelCache.emptyDir | nindent 8 }}
      {{- end }}
    {{- with $root.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The Ray container: KubeRay turns rayStartParams into its `ray start` command. */}}
{{- define "moe-serve.rayContainer" -}}
{{- $root := .root -}}
{{- $values := $root.Values -}}
name: {{ .name }}
image: {{ include "moe-serve.image" $root }}
imagePullPolicy: {{ $values.image.pullPolicy }}
securityContext:
  {{- toYaml $values.containerSecurityContext | nindent 2 }}
env:
  - name: HF_HOME
    value: {{ $values.modelCache.mountPath | quote }}
  - name: MOE_SERVE_CACHE  # generated tiny:<arch> checkpoints
    value: {{ printf "%s/moe-serve" $values.modelCache.mountPath | quote }}
  - name: RAY_SERVE_GRPC_MAX_MESSAGE_SIZE  # read by Serve's gRPC proxy when it starts
    value: {{ $values.serve.grpcMaxMessageBytes | int64 | toString | quote }}
  - name: RAY_worker_niceness  # Ray's default 15 puts the engine actors below Ray's own processes
    value: "0"
  # Serve's HAProxy ingress and high-throughput mode, as `moe-serve run` (deploy/ingress.py)
  - name: RAY_SERVE_ENABLE_HA_PROXY
    value: "1"
  - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
    value: "1"
  - name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP  # handles usable outside an event loop
    value: "1"
  - name: RAY_SERVE_LOG_TO_STDERR  # replicas' output and Serve's warnings as they happen
    value: "1"
  - name: RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE
    value: "1"
  {{- with $values.huggingface.existingSecret }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $values.huggingface.secretKey }}
        optional: true  # public models download without it
  {{- end }}
  {{- with $values.auth.existingSecret }}
  - name: MOE_SERVE_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $values.auth.secretKey }}
  {{- end }}
  {{- with $values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  {{- if .head }}
  - {name: gcs-server, containerPort: 6379}
  - {name: dashboard, containerPort: 8265}
  - {name: client, containerPort: 10001}
  - {name: metrics, containerPort: 8080}
  {{- end }}
  - name: serve
    containerPort: {{ $values.serve.httpPort }}
  - name: serve-grpc
    containerPort: {{ $values.serve.grpcPort }}
resources:
  {{- include "moe-serve.resources" . | nindent 2 }}
volumeMounts:
  - name: model-cache
    mountPath: {{ $values.modelCache.mountPath }}
  {{- with $values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .group.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The group's resources, with nvidia.com/gpu set in requests and limits when gpus > 0. */}}
{{- define "moe-serve.resources" -}}
{{- $resources := deepCopy (.group.resources | default (dict)) -}}
{{- $gpus := int (default 0 .gpus) -}}
{{- if gt $gpus 0 -}}
{{- range $kind := list "requests" "limits" -}}
{{- $amounts := get $resources $kind | default (dict) -}}
{{- $_ := set $amounts "nvidia.com/gpu" $gpus -}}
{{- $_ := set $resources $kind $amounts -}}
{{- end -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}
