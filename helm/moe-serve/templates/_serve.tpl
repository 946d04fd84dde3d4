{{/*
serveConfigV2: one Serve application whose args are the serving config (deploy/config.py,
ServeConfig). The API key never goes here (the args are visible in the Serve config and the
Ray dashboard): the gateway reads MOE_SERVE_API_KEY from its pod's environment (_pod.tpl).
*/}}
{{- define "moe-serve.serveConfig" -}}
{{- $serve := .Values.serve -}}
{{- $args := dict
  "http" (dict "host" "0.0.0.0" "port" $serve.httpPort)
  "grpc" (dict "port" $serve.grpcPort "max_message_bytes" $serve.grpcMaxMessageBytes)
  "models" $serve.models -}}
{{- with $serve.limits }}{{ $_ := set $args "limits" . }}{{ end -}}
{{- with $serve.metrics }}{{ $_ := set $args "metrics" . }}{{ end -}}
{{- $app := dict
  "name" "moe-serve"
  "route_prefix" "/"
  "import_path" "moe_serve.deploy.app:build_app"
  "args" $args -}}
{{- $servicers := list
  "moe_serve.protos.moe_serving_pb2_grpc.add_MoEServingServicer_to_server"
  "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server" -}}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" "0.0.0.0" "port" $serve.httpPort)
  "grpc_options" (dict "port" $serve.grpcPort "grpc_servicer_functions" $servicers)
  "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}
