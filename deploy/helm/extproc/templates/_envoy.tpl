{{/*
The Envoy bootstrap, rendered from values.routing and values.envoy in the shape extproc/envoy.py
defines (`extproc envoy-config`; README "How Envoy is wired"). The parts no value changes are
cut from extproc/envoy.py's output into files/envoy/ by deploy/helm/generate.py; this template
renders the rest, and tests/helm compares the whole with extproc/envoy.py's for a matrix of
values, so a change there must be mirrored here. The one addition is the readiness listener.

Routing answers come back as dynamic metadata: routes match `extproc.cluster`, one per cluster;
ORIGINAL_DST and override_host clusters read the picked replica from metadata.
*/}}

{{- define "extproc.envoy.llmPathRegex" -}}
^(\/v1\/chat\/completions|\/v1\/completions|\/v1\/responses)(\?.*)?$
{{- end }}

{{- /* extproc/envoy.py lookalike_regex(): an LLM path in any case, with anything after it. */}}
{{- define "extproc.envoy.llmLookalikeRegex" -}}
(?i)(/v1/chat/completions|/v1/completions|/v1/responses).*
{{- end }}

{{/*
The clusters Envoy routes LLM requests to, as YAML: {routed: [cluster names in route order],
clusters: [{name, endpoints, dns, lb, balance}], retries: {cluster: n}, hashed: [names]}.
Mirrors extproc/envoy.py render() and _model_endpoints().
*/}}
{{- define "extproc.envoy.plan" -}}
{{- $r := include "extproc.routing" . | fromYaml }}
{{- $e := .Values.envoy }}
{{- $originalDst := $r.original_dst_cluster | default "original_dst" }}
{{- $picking := $r.picking | default dict }}
{{- $fallbacks := hasKey $picking "fallbacks" | ternary $picking.fallbacks 2 }}
{{- /* Envoy's ring hash keeps every request with its key's host, like the picker's later turns:
     it gets their bound, the sticky one unless that is null. Defaults as in PickingSettings. */}}
{{- $loadBound := hasKey $picking "load_bound" | ternary $picking.load_bound 0 }}
{{- $hashBound := hasKey $picking "sticky_load_bound" | ternary $picking.sticky_load_bound 1.0 }}
{{- if kindIs "invalid" $hashBound }}{{ $hashBound = $loadBound }}{{ end }}
{{- /* Outlier detection of the clusters whose hosts Envoy chooses (hash, override_host): the
     policy's picking.outlier_detection over its defaults (files/envoy/outlier-detection.yaml);
     extproc/envoy.py _outlier_detection(). */}}
{{- $od := $picking.outlier_detection | default dict }}
{{- $envoyOd := dict }}
{{- if hasKey $od "enabled" | ternary $od.enabled true }}
{{- $envoyOd = .Files.Get "files/envoy/outlier-detection.yaml" | fromYaml }}
{{- range list "consecutive_5xx" "consecutive_local_origin_failure" "max_ejection_percent" }}
{{- if hasKey $od . }}{{ $_ := set $envoyOd . (index $od .) }}{{ end }}
{{- end }}
{{- range list "interval" "base_ejection_time" "max_ejection_time" }}
{{- if hasKey $od . }}{{ $_ := set $envoyOd . (printf "%gs" (index $od . | trimSuffix "s" | float64)) }}{{ end }}
{{- end }}
{{- if and (hasKey $od "base_ejection_time") (not (hasKey $od "max_ejection_time")) }}
{{- /* As Envoy: an unset cap is the default or the base, whichever is longer. */}}
{{- $cap := .Files.Get "files/envoy/outlier-detection.yaml" | fromYaml | dig "max_ejection_time" "" | trimSuffix "s" | float64 }}
{{- $_ := set $envoyOd "max_ejection_time" (printf "%gs" (maxf $cap ($od.base_ejection_time | trimSuffix "s" | float64))) }}
{{- end }}
{{- end }}
{{- $routed := list }}
{{- $clusters := list }}
{{- $names := list }}
{{- $retries := dict }}
{{- $hashed := list }}
{{- range $name, $model := $r.models }}
{{- $model = $model | default dict }}
{{- $replicas := $model.replicas }}
{{- $mode := "" }}
{{- if $replicas }}{{ $mode = $replicas.envoy | default "original_dst" }}{{ end }}
{{- if eq $mode "original_dst" }}
{{- if not (has $originalDst $routed) }}{{ $routed = append $routed $originalDst }}{{ end }}
{{- $_ := set $retries $originalDst 0 }}
{{- else }}
{{- $cluster := $model.cluster | default $name }}
{{- if has $cluster (list "extproc" "envoy_admin") }}
{{- fail (printf "routing.models.%s.cluster: %q is reserved for the chart's own Envoy clusters; name it differently" $name $cluster) }}
{{- end }}
{{- $endpoints := list }}
{{- if hasKey $e.clusterEndpoints $cluster }}
{{- $endpoints = index $e.clusterEndpoints $cluster }}
{{- else if and $replicas $replicas.static }}
{{- $endpoints = $replicas.static }}
{{- else if and $replicas $replicas.kubernetes $replicas.kubernetes.service (not (kindIs "string" $replicas.kubernetes.port)) $replicas.kubernetes.port }}
{{- $k := $replicas.kubernetes }}
{{- /* A headless Service resolves to the ready pod IPs: the same set the router watches. */}}
{{- $endpoints = list (printf "%s.%s.svc.cluster.local:%d" $k.service $k.namespace (int $k.port)) }}
{{- else }}
{{- fail (printf "routing.models.%s: Envoy needs endpoints for cluster %q; give static replicas, a Kubernetes service with a numeric port, or envoy.clusterEndpoints.%s" $name $cluster $cluster) }}
{{- end }}
{{- $balance := 0 }}
{{- if eq $mode "hash" }}{{ $balance = max 100 (round (mulf 100 (addf 1 $hashBound)) 0 | int) }}{{ end }}
{{- if not (has $cluster $names) }}
{{- $names = append $names $cluster }}
{{- $outlier := has $mode (list "hash" "override_host") | ternary $envoyOd dict }}
{{- $clusters = append $clusters (dict "name" $cluster "endpoints" $endpoints "mode" $mode "balance" $balance "outlier" $outlier) }}
{{- end }}
{{- if not (has $cluster $routed) }}{{ $routed = append $routed $cluster }}{{ end }}
{{- if eq $mode "hash" }}{{ $hashed = append $hashed $cluster }}{{ end }}
{{- $_ := set $retries $cluster (eq $mode "override_host" | ternary $fallbacks 1) }}
{{- end }}
{{- end }}
{{- if has $originalDst $routed }}
{{- $names = append $names $originalDst }}
{{- $clusters = append $clusters (dict "name" $originalDst "mode" "ORIGINAL_DST") }}
{{- end }}
{{- if $r.passthrough_cluster }}
{{- $passthrough := $r.passthrough_cluster }}
{{- if not (index $e.clusterEndpoints $passthrough) }}
{{- fail (printf "routing.passthrough_cluster %q needs its endpoints in envoy.clusterEndpoints.%s" $passthrough $passthrough) }}
{{- end }}
{{- if not (has $passthrough $names) }}
{{- $names = append $names $passthrough }}
{{- $clusters = append $clusters (dict "name" $passthrough "endpoints" (index $e.clusterEndpoints $passthrough) "mode" "" "balance" 0) }}
{{- end }}
{{- if not (has $passthrough $routed) }}{{ $routed = append $routed $passthrough }}{{ end }}
{{- end }}
{{- /* envoy.forwardPaths go to the default model's cluster, else the first one Envoy balances, else nowhere (404). */}}
{{- $default := $e.defaultCluster | default ((index $r.models $r.default_model | default dict).cluster | default $r.default_model) }}
{{- if not (has $default $names) }}
{{- $default = "" }}
{{- range $names }}{{ if and (not $default) (ne . $originalDst) }}{{ $default = . }}{{ end }}{{ end }}
{{- end }}
{{- toYaml (dict "routed" $routed "clusters" $clusters "retries" $retries "hashed" $hashed "default" $default) }}
{{- end }}

{{/*
A model's cluster: Envoy balances it, or follows the router's pick (override_host, ring hash);
extproc/envoy.py _cluster(). Or the shared ORIGINAL_DST cluster, which sends each request to the
replica the router put in metadata.
*/}}
{{- define "extproc.envoy.cluster" -}}
{{- if eq .mode "ORIGINAL_DST" }}
- name: {{ .name | toJson }}
  type: ORIGINAL_DST
  lb_policy: CLUSTER_PROVIDED
  connect_timeout: 1s
  original_dst_lb_config:
    use_http_header: true
    http_header_name: x-gateway-destination-endpoint
    metadata_key:
      key: extproc
      path:
      - key: endpoint
{{- else }}
{{- $dns := false }}
{{- range .endpoints }}
{{- if not (regexMatch "^(\\[|[0-9.]*[0-9][0-9.]*:)" .) }}{{ $dns = true }}{{ end }}
{{- end }}
- name: {{ .name | toJson }}
  type: {{ $dns | ternary "STRICT_DNS" "STATIC" }}
  connect_timeout: 1s
  load_assignment:
    cluster_name: {{ .name | toJson }}
    endpoints:
    - lb_endpoints:
      {{- range .endpoints }}
      {{- $host := regexReplaceAll ":[0-9]+$" . "" | trimPrefix "[" | trimSuffix "]" }}
      - endpoint:
          address:
            socket_address:
              address: {{ $host | toJson }}
              port_value: {{ regexFind "[0-9]+$" . }}
      {{- end }}
  {{- if .outlier }}
  outlier_detection:
    {{- toYaml .outlier | nindent 4 }}
  {{- end }}
  load_balancing_policy:
    policies:
    {{- if eq .mode "override_host" }}
    - typed_extension_config:
        name: envoy.load_balancing_policies.override_host
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost
          override_host_sources:
          - metadata:
              key: envoy.lb
              path:
              - key: x-gateway-destination-endpoint
          - header: x-gateway-destination-endpoint
          fallback_policy:
            policies:
            - {{ include "extproc.envoy.leastRequest" . | indent 14 | trim }}
    {{- else if eq .mode "hash" }}
    - typed_extension_config:
        name: envoy.load_balancing_policies.ring_hash
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash
          {{- /* Consistent hashing on the router's affinity key, load bounded (percent of the mean). */}}
          hash_balance_factor: {{ .balance }}
    {{- else }}
    - {{ include "extproc.envoy.leastRequest" . | indent 6 | trim }}
    {{- end }}
{{- end }}
{{- end }}

{{- define "extproc.envoy.leastRequest" -}}
typed_extension_config:
  name: envoy.load_balancing_policies.least_request
  typed_config:
    '@type': type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest
{{- end }}

{{/* An OpenAI-style JSON error Envoy answers itself. */}}
{{- define "extproc.envoy.jsonError" -}}
status: {{ .status }}
body:
  inline_string: {{ printf `{"error":{"message":%s,"type":%s,"param":null,"code":%s}}` (toJson .message) (toJson .type) (toJson .code) | toJson }}
{{- end }}

{{- define "extproc.envoy.bootstrap" -}}
{{- $e := .Values.envoy }}
{{- $r := include "extproc.routing" . | fromYaml }}
{{- $plan := include "extproc.envoy.plan" . | fromYaml }}
{{- $headers := $r.headers | default dict }}
{{- $pathRegex := include "extproc.envoy.llmPathRegex" . }}
{{- $disabled := .Files.Get "files/envoy/per-route-disabled.yaml" | trim -}}
admin:
  address:
    socket_address:
      # Loopback only: the admin interface can stop Envoy and change its state.
      address: 127.0.0.1
      port_value: {{ $e.adminPort }}
static_resources:
  listeners:
  - name: llm
    address:
      socket_address:
        address: {{ $e.listenAddress | toJson }}
        port_value: {{ $e.port }}
    per_connection_buffer_limit_bytes: {{ $e.maxRequestBytes | int64 }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: llm
          codec_type: AUTO
          # Paths are canonical before routing (README "Paths"): dot segments resolved, escapes of
          # unreserved characters decoded, backslashes and repeated slashes made single; an
          # escaped slash or backslash, NUL or a fragment is refused with 400.
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          # The request id is always Envoy's own (a client's x-request-id is removed below), so
          # logs never carry a value the client chose; the client gets it back in the response.
          generate_request_id: true
          preserve_external_request_id: false
          always_set_request_id_in_response: true
          # HTTP/1.0 clients are served like HTTP/1.1 ones instead of a text 426.
          http_protocol_options:
            accept_http_10: true
            default_host_for_http_10: extproc
          early_header_mutation_extensions:
          - name: strip-router-headers
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
              # A client must not pick a replica or a cluster by sending the router's headers,
              # nor choose the request id the logs carry.
              mutations:
              {{- range list "x-selected-model" "x-gateway-destination-endpoint" "x-extproc-affinity" "x-router-decision" "x-router-explain" ($headers.cluster | default "x-extproc-cluster") "x-request-id" }}
              - remove: {{ . | toJson }}
              {{- end }}
          route_config:
            name: llm
            virtual_hosts:
            - name: llm
              domains: ['*']
              routes:
              # CONNECT carries no path, so no other route matches it, and unanswered it held a
              # stream open until the idle timeout. Matched here, Envoy refuses it at once (403).
              - name: connect
                match:
                  connect_matcher: {}
                direct_response:
                  {{- include "extproc.envoy.jsonError" (dict "status" 405 "message" "CONNECT is not supported" "type" "invalid_request_error" "code" "method_not_allowed") | nindent 18 }}
                typed_per_filter_config:
                  {{- $disabled | nindent 18 }}
              - name: llm-method-not-allowed
                match:
                  safe_regex:
                    regex: {{ $pathRegex | toJson }}
                  headers:
                  - name: :method
                    string_match:
                      exact: POST
                    invert_match: true
                direct_response:
                  {{- include "extproc.envoy.jsonError" (dict "status" 405 "message" "LLM API paths only accept POST" "type" "invalid_request_error" "code" "method_not_allowed") | nindent 18 }}
                # Never sent to the sidecar (files/envoy/per-route-disabled.yaml).
                typed_per_filter_config:
                  {{- $disabled | nindent 18 }}
              {{- range $plan.routed }}
              {{- $attempts := 1 }}
              {{- if hasKey $plan.retries . }}{{ $attempts = index $plan.retries . | int }}{{ end }}
              - name: {{ printf "llm-%s" . | toJson }}
                match:
                  safe_regex:
                    regex: {{ $pathRegex | toJson }}
                  dynamic_metadata:
                  - filter: extproc
                    path:
                    - key: cluster
                    value:
                      string_match:
                        exact: {{ . | toJson }}
                route:
                  cluster: {{ . | toJson }}
                  timeout: {{ $e.upstreamTimeout }}
                  {{- if $attempts }}
                  retry_policy:
                    retry_on: connect-failure,refused-stream,reset-before-request
                    num_retries: {{ $attempts }}
                    {{- if has . $plan.hashed }}
                    {{- $.Files.Get "files/envoy/hash-retry-hosts.yaml" | trim | nindent 20 }}
                    {{- end }}
                  {{- end }}
                  {{- if has . $plan.hashed }}
                  # The ring hash reads the router's affinity key; the header is added before hashing.
                  hash_policy:
                  - header:
                      header_name: x-extproc-affinity
                {{- end }}
                {{- if has . $plan.hashed }}
                request_headers_to_add:
                - header:
                    key: x-extproc-affinity
                    value: '%DYNAMIC_METADATA(extproc:affinity)%'
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                {{- end }}
              {{- end }}
              # Reached only when the router made no decision: Envoy skips ext_proc for a POST
              # without a body, so the client gets the same error the router would have sent.
              - name: llm-no-decision
                match:
                  safe_regex:
                    regex: {{ $pathRegex | toJson }}
                direct_response:
                  {{- include "extproc.envoy.jsonError" (dict "status" 400 "message" "request body is empty; send a JSON object with a 'model' field" "type" "invalid_request_error" "code" "invalid_request") | nindent 18 }}
              # Paths that only resemble an LLM path once Envoy has normalised them (any case, a
              # trailing slash or anything after it, ;params, escapes Envoy keeps): some servers
              # would serve them as the LLM call, so none is forwarded.
              - name: llm-path-variant
                match:
                  safe_regex:
                    regex: {{ include "extproc.envoy.llmLookalikeRegex" . | toJson }}
                direct_response:
                  {{- include "extproc.envoy.jsonError" (dict "status" 404 "message" "unknown path; LLM calls go to exactly /v1/chat/completions, /v1/completions, /v1/responses (lower case, no trailing slash, path parameters or escapes)" "type" "invalid_request_error" "code" "unknown_path") | nindent 18 }}
                typed_per_filter_config:
                  {{- $disabled | nindent 18 }}
              {{- if $plan.default }}
              {{- range $e.forwardPaths }}
              - name: {{ printf "forward %s" . | toJson }}
                match:
                  path: {{ . | toJson }}
                route:
                  cluster: {{ $plan.default | toJson }}
                  timeout: {{ $e.upstreamTimeout }}
                typed_per_filter_config:
                  {{- $disabled | nindent 18 }}
              {{- end }}
              {{- end }}
              # Everything else: never forwarded, so no model-server endpoint is reachable past
              # the router unless envoy.forwardPaths names it.
              - name: other
                match:
                  prefix: /
                direct_response:
                  {{- include "extproc.envoy.jsonError" (dict "status" 404 "message" "not found" "type" "invalid_request_error" "code" "not_found") | nindent 18 }}
                # Never sent to the sidecar (files/envoy/per-route-disabled.yaml).
                typed_per_filter_config:
                  {{- $disabled | nindent 18 }}
              request_headers_to_add:
              - header:
                  key: x-selected-model
                  value: '%DYNAMIC_METADATA(extproc:upstream_model)%'
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              response_headers_to_add:
              {{- range list "model" "decision" "explain" }}
              - header:
                  key: x-router-{{ . }}
                  value: '%DYNAMIC_METADATA(extproc:{{ . }})%'
                append_action: OVERWRITE_IF_EXISTS_OR_ADD
              {{- end }}
          http_filters:
          {{- include "extproc.envoy.extProcFilters" . | nindent 10 }}
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          local_reply_config:
            mappers:
            {{- .Files.Get "files/envoy/local-reply-mappers.yaml" | trim | nindent 12 }}
          access_log:
          {{- .Files.Get "files/envoy/access-log.yaml" | trim | replace "__ACCESS_LOG_FLUSH__" $e.accessLogFlushInterval | nindent 10 }}
  {{- /*
  Readiness for the kubelet without exposing the admin interface on the pod IP: this listener's
  only route proxies GET /ready to the admin on loopback, so the probe sees Envoy's own state
  (503 until initialized and while draining) while /quitquitquit, /runtime_modify and the rest
  stay unreachable. A health_check filter on the client listener would not say whether Envoy
  finished initializing and would add a filter to the chain extproc/envoy.py defines.
  */}}
  - name: readiness
    address:
      socket_address:
        address: {{ $e.listenAddress | toJson }}
        port_value: {{ $e.readinessPort }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          '@type': type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: readiness
          route_config:
            name: readiness
            virtual_hosts:
            - name: readiness
              domains: ['*']
              routes:
              - name: ready
                match:
                  path: /ready
                  headers:
                  - name: :method
                    string_match:
                      exact: GET
                route:
                  cluster: envoy_admin
                  timeout: 2s
              - name: nothing-else
                match:
                  prefix: /
                direct_response:
                  status: 404
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              '@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  {{- range $plan.clusters }}
  {{- include "extproc.envoy.cluster" . | nindent 2 }}
  {{- end }}
  - name: extproc
    type: STATIC
    connect_timeout: 0.25s
    typed_extension_protocol_options:
      {{- .Files.Get "files/envoy/extproc-cluster-options.yaml" | trim | nindent 6 }}
    load_assignment:
      cluster_name: extproc
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              {{- if eq .Values.sidecar.transport "tcp" }}
              socket_address:
                address: 127.0.0.1
                port_value: {{ .Values.sidecar.tcpPort }}
              {{- else }}
              pipe:
                path: {{ include "extproc.socketPath" . | toJson }}
              {{- end }}
  - name: envoy_admin
    type: STATIC
    connect_timeout: 0.25s
    load_assignment:
      cluster_name: envoy_admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address:
                address: 127.0.0.1
                port_value: {{ $e.adminPort }}
overload_manager:
  {{- .Files.Get "files/envoy/overload-manager.yaml" | trim | nindent 2 }}
{{- end }}

{{/* The routing ext_proc filter, the buffer filter and the usage filters: extproc/envoy.py _ext_proc_filters(). */}}
{{- define "extproc.envoy.extProcFilters" -}}
{{- $e := .Values.envoy }}
{{- $r := include "extproc.routing" . | fromYaml }}
{{- $headers := $r.headers | default dict }}
{{- $read := concat $e.forwardHeaders (list ($headers.session | default "x-session-id") ($headers.user | default "x-user-id") "content-type" "content-encoding" "x-router-debug") | uniq | sortAlpha -}}
- name: envoy.filters.http.ext_proc
  typed_config:
    '@type': type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
    grpc_service:
      envoy_grpc:
        cluster_name: extproc
      timeout: {{ $e.messageTimeout }}
    # An unrouted request cannot be served correctly: fail closed, with a fast 503.
    failure_mode_allow: false
    status_on_error:
      code: 503
    message_timeout: {{ $e.messageTimeout }}
    allow_mode_override: false
    processing_mode:
      request_header_mode: {{ $e.twoRoundTrips | ternary "SEND" "SKIP" }}
      response_header_mode: SKIP
      request_body_mode: BUFFERED
      response_body_mode: NONE
    metadata_options:
      receiving_namespaces:
        untyped:
        - extproc
        - envoy.lb
    {{- if not $e.twoRoundTrips }}
    # One round trip: path, method, id and the headers the policy reads come as attributes.
    request_attributes:
    - request.path
    - request.method
    - request.id
    {{- range $read }}
    - {{ printf "request.headers['%s']" . | toJson }}
    {{- end }}
    {{- end }}
- name: envoy.filters.http.buffer
  typed_config:
    '@type': type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer
    max_request_bytes: {{ $e.maxRequestBytes | int64 }}
{{- if $e.usage }}
{{ .Files.Get "files/envoy/usage-filters.yaml" | trim }}
{{- end }}
{{- end }}
