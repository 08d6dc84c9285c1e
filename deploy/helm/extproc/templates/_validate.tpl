{{/*
Checks across values that values.schema.json cannot express; each failure says what to change.
Included by deployment.yaml, so `helm template` and `helm install` both run it.
*/}}
{{- define "extproc.validate" -}}
{{- $ports := dict }}
{{- range $name, $port := dict "envoy.port" .Values.envoy.port "envoy.readinessPort" .Values.envoy.readinessPort "envoy.adminPort" .Values.envoy.adminPort "sidecar.healthPort" .Values.sidecar.healthPort "sidecar.metricsPort" .Values.sidecar.metricsPort "sidecar.tcpPort" (eq .Values.sidecar.transport "tcp" | ternary .Values.sidecar.tcpPort 0) }}
{{- if $port }}
{{- $key := toString (int $port) }}
{{- if hasKey $ports $key }}
{{- fail (printf "%s and %s are both %s: the pod's containers share one network namespace, give each port its own number" (get $ports $key) $name $key) }}
{{- end }}
{{- $_ := set $ports $key $name }}
{{- end }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- with .Values.podDisruptionBudget }}
{{- if and .enabled (ne (toString .minAvailable) "") (ne (toString .maxUnavailable) "") }}
{{- fail (printf "podDisruptionBudget sets both minAvailable (%v) and maxUnavailable (%v); keep one and set the other to \"\"" .minAvailable .maxUnavailable) }}
{{- end }}
{{- end }}
{{- if and .Values.preStopSleepSeconds (le (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds (%d), or the kubelet kills the pod before it stops cleanly" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds)) }}
{{- end }}
{{- $models := (include "extproc.routing" . | fromYaml).models | default dict }}
{{- $expensive := include "extproc.expensiveModel" . }}
{{- if and $expensive (not (hasKey $models $expensive)) }}
{{- fail (printf "monitoring.expensiveModel %q is not a model in routing.models (%s)" $expensive (keys $models | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
