{{/*
Checks that need more than one value (values.schema.json checks each value on its own).
*/}}
{{- define "moe-serve.validate" -}}
{{- $gpus := int .Values.worker.gpus -}}
{{- $seen := dict -}}
{{- range .Values.serve.models -}}
{{- if hasKey $seen .name -}}
{{- fail (printf "serve.models: model name %q is used twice; names must be unique" .name) -}}
{{- end -}}
{{- $_ := set $seen .name true -}}
{{- $scaling := .autoscaling | default (dict) -}}
{{- $min := ternary (int $scaling.min_replicas) 1 (hasKey $scaling "min_replicas") -}}
{{- $max := ternary (int $scaling.max_replicas) 1 (hasKey $scaling "max_replicas") -}}
{{- if gt $min $max -}}
{{- fail (printf "serve.models[%s].autoscaling: min_replicas (%d) exceeds max_replicas (%d)" .name $min $max) -}}
{{- end -}}
{{- $device := default "auto" .device -}}
{{- if and (eq $device "auto") (gt $gpus 0) -}}
{{- fail (printf "serve.models[%s]: set device to cuda (or cpu): auto is decided when the app starts, possibly before any GPU worker has joined" .name) -}}
{{- end -}}
{{- if eq $device "cuda" -}}
{{- if eq $gpus 0 -}}
{{- fail (printf "serve.models[%s]: device cuda needs GPU workers, but worker.gpus is 0" .name) -}}
{{- end -}}
{{- /* A replica: the engine actor's GPU, plus one per expert shard when there are shards. */ -}}
{{- $shards := int (default 1 .expert_parallel_size) -}}
{{- $gang := ternary 1 (add1 $shards) (eq $shards 1) -}}
{{- if gt $gang $gpus -}}
{{- fail (printf "serve.models[%s]: a replica is a gang of %d GPUs (expert_parallel_size + 1) packed on one node, but worker.gpus is %d" .name $gang $gpus) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.worker -}}
{{- if or (gt (int .minReplicas) (int .replicas)) (gt (int .replicas) (int .maxReplicas)) -}}
{{- fail (printf "worker: need minReplicas (%d) <= replicas (%d) <= maxReplicas (%d)" (int .minReplicas) (int .replicas) (int .maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- if eq (int .Values.serve.httpPort) (int .Values.serve.grpcPort) -}}
{{- fail "serve: httpPort and grpcPort must differ" -}}
{{- end -}}
{{- end -}}
