{{/* Names, labels and the values every template shares. */}}

{{- define "extproc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; DNS labels are at most 63 characters. */}}
{{- define "extproc.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "extproc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "extproc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "extproc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "extproc.labels" -}}
helm.sh/chart: {{ include "extproc.chart" . }}
{{ include "extproc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: router
app.kubernetes.io/part-of: extproc
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "extproc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "extproc.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository[:tag][@digest]; a digest pins the image whatever the tag says. */}}
{{- define "extproc.imageRef" -}}
{{- $ref := printf "%s:%s" .repository .tag }}
{{- if .digest }}{{ $ref = printf "%s@%s" .repository .digest }}{{ end }}
{{- $ref }}
{{- end }}

{{- define "extproc.sidecarImage" -}}
{{- include "extproc.imageRef" (dict "repository" .Values.image.repository "tag" (.Values.image.tag | default .Chart.AppVersion) "digest" .Values.image.digest) }}
{{- end }}

{{- define "extproc.envoyImage" -}}
{{- include "extproc.imageRef" .Values.envoy.image }}
{{- end }}

{{/*
How a pod stops (README "Stopping a pod"): Envoy's preStop hook drains it (files/envoy-drain.sh)
for at most preStopSleepSeconds + drainTimeoutSeconds; the sidecar serves until Envoy has exited,
a little longer than that; the grace period covers both and the sidecar's own stop.
*/}}
{{- define "extproc.drainSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int .Values.drainTimeoutSeconds) }}
{{- end }}

{{- define "extproc.sidecarWaitSeconds" -}}
{{- add (include "extproc.drainSeconds" . | int) 10 }}
{{- end }}

{{- define "extproc.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (include "extproc.sidecarWaitSeconds" . | int) 15 }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{- define "extproc.socketPath" -}}
{{- printf "%s/extproc.sock" (.Values.sidecar.socketDir | trimSuffix "/") }}
{{- end }}

{{/*
The routing policy as the sidecar reads it: values.routing (files/routing-example.yaml when it
is empty), with the release's namespace filled into Kubernetes replica sources that leave it
out. The routing ConfigMap, RBAC, the NetworkPolicy and the alerts all read this one document.
Returns YAML (use fromYaml).
*/}}
{{- define "extproc.routing" -}}
{{- $routing := deepCopy .Values.routing }}
{{- if not $routing }}
{{- $routing = .Files.Get "files/routing-example.yaml" | fromYaml }}
{{- end }}
{{- range $name, $model := ($routing.models | default dict) }}
{{- if and $model $model.replicas $model.replicas.kubernetes }}
{{- if not $model.replicas.kubernetes.namespace }}
{{- $_ := set $model.replicas.kubernetes "namespace" $.Release.Namespace }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $routing }}
{{- end }}

{{/* Namespaces whose EndpointSlices the sidecar may watch, sorted, one per line. */}}
{{- define "extproc.watchedNamespaces" -}}
{{- $routing := include "extproc.routing" . | fromYaml }}
{{- $namespaces := list }}
{{- range $name, $model := $routing.models }}
{{- if and $model $model.replicas $model.replicas.kubernetes }}
{{- $namespaces = append $namespaces $model.replicas.kubernetes.namespace }}
{{- end }}
{{- end }}
{{- range .Values.rbac.extraNamespaces }}
{{- $namespaces = append $namespaces . }}
{{- end }}
{{- $namespaces | uniq | sortAlpha | join "\n" }}
{{- end }}

{{/* The model the expensive-share alert and dashboard panel watch ("" when there is none). */}}
{{- define "extproc.expensiveModel" -}}
{{- $cost := (include "extproc.routing" . | fromYaml).cost | default dict }}
{{- .Values.monitoring.expensiveModel | default $cost.baseline_model | default "" }}
{{- end }}

{{/* Probe timing from values with the handler the chart owns. */}}
{{- define "extproc.probe" -}}
{{- $probe := merge (deepCopy .handler) (deepCopy .timing) }}
{{- toYaml $probe }}
{{- end }}

{{/*
The Envoy settings the sidecar applies live (LIVE_SETTINGS in extproc/envoy/options.py), from values.envoy:
written beside the policy in the routing ConfigMap, so changing them needs no rollout.
*/}}
{{- define "extproc.envoySettings" -}}
{{- $e := .Values.envoy }}
{{- $settings := dict "message_timeout" $e.messageTimeout "max_message_timeout" $e.maxMessageTimeout "upstream_timeout" $e.upstreamTimeout "max_request_bytes" ($e.maxRequestBytes | int64) "usage" $e.usage "access_log_flush" $e.accessLogFlushInterval "two_round_trips" $e.twoRoundTrips "forward_headers" $e.forwardHeaders "cluster_endpoints" $e.clusterEndpoints "forward_paths" $e.forwardPaths }}
{{- with $e.defaultCluster }}{{ $_ := set $settings "default_cluster" . }}{{ end }}
{{- toYaml $settings }}
{{- end }}
