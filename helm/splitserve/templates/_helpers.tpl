{{/* Names and labels. */}}
{{- define "splitserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayService's name: short, because KubeRay derives its cluster and pod names from it. */}}
{{- define "splitserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "splitserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "splitserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "splitserve.labels" -}}
{{ include "splitserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "splitserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "splitserve.secretName" -}}
{{- .Values.secret.existingSecret | default (printf "%s-secret" (include "splitserve.fullname" .)) -}}
{{- end -}}

{{- define "splitserve.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "splitserve.fullname" .) -}}
{{- end -}}

{{/* The Ray resource a pool's workers ask for, and its worker groups offer. */}}
{{- define "splitserve.poolResource" -}}
splitserve-{{ . }}
{{- end -}}

{{/*
The Serve application's args: .Values.config plus the pools' placement resources and the
autoscaler's settings. ServeConfig.from_dict (splitserve/platform/config.py) checks them.
*/}}
{{- define "splitserve.appArgs" -}}
{{- $args := deepCopy (.Values.config | default dict) -}}
{{- range $pool := list "prefill" "decode" -}}
{{- $pc := deepCopy (get $args $pool | default dict) -}}
{{- $placement := dict (include "splitserve.poolResource" $pool) 1 -}}
{{- $_ := set $pc "resources" (merge (deepCopy ($pc.resources | default dict)) $placement) -}}
{{- $_ := set $args $pool $pc -}}
{{- end -}}
{{- /* decode workers listen on every interface of their pod, on kv.port; each advertises its pod IP */ -}}
{{- $_ := set $args "kv_host" "0.0.0.0" -}}
{{- $_ := set $args "kv_port" (int .Values.kv.port) -}}
{{- $auto := .Values.autoscaling.splitserve -}}
{{- if $auto.enabled -}}
{{- $kuberay := dict "namespace" .Release.Namespace "rayservice" (include "splitserve.fullname" .) -}}
{{- if $auto.groups -}}
{{- $_ := set $kuberay "groups" $auto.groups -}}
{{- end -}}
{{- $a := dict "catalog" "/etc/splitserve/catalog/catalog.yaml" "nodes" $auto.nodes "period_s" $auto.period_s "objectives" $auto.objectives -}}
{{- if eq $auto.nodes "kuberay" -}}
{{- $_ := set $a "kuberay" $kuberay -}}
{{- end -}}
{{- $_ := set $args "autoscale" $a -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* serveConfigV2: Ray Serve's declarative config (ray.serve.schema.ServeDeploySchema). */}}
{{- define "splitserve.serveConfig" -}}
proxy_location: HeadOnly
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.httpPort }}
grpc_options:
  port: {{ .Values.serve.grpcPort }}
  # = splitserve.platform.server's SERVICER and HEALTH_SERVICER (KServe v2, grpc.health.v1)
  grpc_servicer_functions:
    - splitserve.platform.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server
    - grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server
  enable_reflection: true
applications:
  - name: splitserve
    route_prefix: /
    import_path: splitserve.platform.app:build
    args:
{{ include "splitserve.appArgs" . | indent 6 }}
{{- end -}}

{{/* Environment of every Ray container: the cluster token, and the KV plane's TLS files if any. */}}
{{- define "splitserve.commonEnv" -}}
- name: SPLITSERVE_CLUSTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "splitserve.secretName" . }}
      key: {{ .Values.secret.clusterTokenKey }}
{{- with .Values.kv.tls.secretName }}
- {name: SPLITSERVE_KV_TLS_CERT, value: /etc/splitserve/kv-tls/tls.crt}
- {name: SPLITSERVE_KV_TLS_KEY, value: /etc/splitserve/kv-tls/tls.key}
- {name: SPLITSERVE_KV_TLS_CA, value: /etc/splitserve/kv-tls/ca.crt}
{{- with $.Values.kv.tls.serverName }}
- {name: SPLITSERVE_KV_TLS_SERVER_NAME, value: {{ . | quote }}}
{{- end }}
{{- end }}
{{- end -}}

{{- define "splitserve.kvTLSMount" -}}
{{- if .Values.kv.tls.secretName }}
- {name: kv-tls, mountPath: /etc/splitserve/kv-tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "splitserve.kvTLSVolume" -}}
{{- with .Values.kv.tls.secretName }}
- name: kv-tls
  secret: {secretName: {{ . }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{- define "splitserve.probes" -}}
livenessProbe:
  httpGet: {path: /api/healthz, port: {{ .Values.probes.agentPort }}}
  {{- toYaml .Values.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /api/healthz, port: {{ .Values.probes.agentPort }}}
  {{- toYaml .Values.probes.readiness | nindent 2 }}
{{- end -}}

{{/* Refuse combinations that cannot work, naming what is wrong and what is allowed. */}}
{{- define "splitserve.validate" -}}
{{- $auto := .Values.autoscaling -}}
{{- if $auto.splitserve.enabled -}}
{{- if not (has $auto.splitserve.nodes (list "kuberay" "ray")) -}}
{{- fail (printf "autoscaling.splitserve.nodes must be kuberay or ray, got %v" $auto.splitserve.nodes) -}}
{{- end -}}
{{- if and (eq $auto.splitserve.nodes "kuberay") $auto.inTree.enabled -}}
{{- fail "autoscaling.splitserve.nodes=kuberay sets the worker groups' replicas itself: set autoscaling.inTree.enabled=false (or nodes=ray to go through KubeRay's in-tree autoscaler)" -}}
{{- end -}}
{{- if and (eq $auto.splitserve.nodes "ray") (not $auto.inTree.enabled) -}}
{{- fail "autoscaling.splitserve.nodes=ray asks Ray's autoscaler for nodes: set autoscaling.inTree.enabled=true" -}}
{{- end -}}
{{- if not (kindIs "string" $auto.splitserve.catalog) -}}
{{- fail "autoscaling.splitserve.catalog must be the catalog as a YAML string (catalog: | ..., or --set-file autoscaling.splitserve.catalog=catalog.yaml)" -}}
{{- end -}}
{{- if not (fromYaml $auto.splitserve.catalog).instance_types -}}
{{- fail "autoscaling.splitserve.catalog has no instance_types: the autoscaler needs at least one instance type" -}}
{{- end -}}
{{- end -}}
{{- $pools := dict -}}
{{- range .Values.workerGroups -}}
{{- if not (has .pool (list "prefill" "decode")) -}}
{{- fail (printf "workerGroups %s: pool must be prefill or decode, got %v" .name .pool) -}}
{{- end -}}
{{- if or (lt (int .minReplicas) 0) (lt (int .maxReplicas) (int .minReplicas)) (lt (int .replicas) (int .minReplicas)) (gt (int .replicas) (int .maxReplicas)) -}}
{{- fail (printf "workerGroups %s: need 0 <= minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" .name .minReplicas .replicas .maxReplicas) -}}
{{- end -}}
{{- if and (eq .pool "decode") (gt (int (.workersPerPod | default 1)) 1) (ne ($.Values.config.mode | default "disaggregated") "colocated") -}}
{{- fail (printf "workerGroups %s: a decode pod serves KV on one port (kv.port), so workersPerPod must be 1, got %v" .name .workersPerPod) -}}
{{- end -}}
{{- $_ := set $pools .pool true -}}
{{- end -}}
{{- $need := list "decode" -}}
{{- if ne (.Values.config.mode | default "disaggregated") "colocated" -}}
{{- $need = list "prefill" "decode" -}}
{{- end -}}
{{- range $need -}}
{{- if not (hasKey $pools .) -}}
{{- fail (printf "no worker group serves the %s pool: add a workerGroups entry with pool: %s" . .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
