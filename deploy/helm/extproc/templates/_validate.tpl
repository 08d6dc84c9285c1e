{{/*
Checks across values that values.schema.json cannot express; each failure says what to change.
Included by deployment.yaml, so `helm template` and `helm install` both run it.
*/}}
{{- define "extproc.validate" -}}
{{- $ports := dict }}
{{- range $name, $port := dict "envoy.port" .Values.envoy.port "envoy.readinessPort" .Values.envoy.readinessPort "envoy.statsPort" .Values.envoy.statsPort "envoy.adminPort" .Values.envoy.adminPort "sidecar.healthPort" .Values.sidecar.healthPort "sidecar.metricsPort" .Values.sidecar.metricsPort "sidecar.tcpPort" (eq .Values.sidecar.transport "tcp" | ternary .Values.sidecar.tcpPort 0) }}
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
{{- $drain := include "extproc.drainSeconds" . | int }}
{{- if le (include "extproc.terminationGracePeriodSeconds" . | int) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be above preStopSleepSeconds + drainTimeoutSeconds (%d), or the kubelet kills the pod while requests still drain; lower drainTimeoutSeconds instead, or leave terminationGracePeriodSeconds empty (null) to derive it" (include "extproc.terminationGracePeriodSeconds" . | int) $drain) }}
{{- end }}
{{- $volumes := list "routing" "envoy-config" "socket" "tmp" }}
{{- range .Values.extraVolumes }}
{{- if has .name $volumes }}
{{- fail (printf "extraVolumes: a volume is named %q, as one of the chart's (routing, envoy-config, socket, tmp); rename it" .name) }}
{{- end }}
{{- $volumes = append $volumes .name }}
{{- end }}
{{- range $key, $mounts := dict "sidecar.extraVolumeMounts" .Values.sidecar.extraVolumeMounts "envoy.extraVolumeMounts" .Values.envoy.extraVolumeMounts }}
{{- range $mounts }}
{{- if not (has .name $volumes) }}
{{- fail (printf "%s: %q is not a volume of the pod; add it to extraVolumes" $key .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.gateway.httpRoute }}
{{- if and .enabled (not .parentRefs) }}
{{- fail "gateway.httpRoute.enabled needs gateway.httpRoute.parentRefs: the Gateway to attach to, e.g. [{name: my-gateway, namespace: gateway-system}]" }}
{{- end }}
{{- end }}
{{- $models := (include "extproc.routing" . | fromYaml).models | default dict }}
{{- $expensive := include "extproc.expensiveModel" . }}
{{- if and $expensive (not (hasKey $models $expensive)) }}
{{- fail (printf "monitoring.expensiveModel %q is not a model in routing.models (%s)" $expensive (keys $models | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
