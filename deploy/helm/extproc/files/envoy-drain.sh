# The Envoy container's preStop hook: drain Envoy before the kubelet sends it SIGTERM, on which
# Envoy exits at once, cutting whatever is in flight (an LLM answer may stream for minutes).
# Bash built-ins only (and sleep): Envoy's image has no curl; the admin interface is on loopback.
#
#   envoy-drain.sh ADMIN_PORT DELAY_SECONDS TIMEOUT_SECONDS
#
# 1. /healthcheck/fail: Envoy's /ready answers 503, so the readiness probe fails, and every
#    response from now on asks its client to go (connection: close on HTTP/1, GOAWAY on HTTP/2);
#    drain_listeners?graceful&inboundonly starts Envoy's own drain sequence on the client listener.
#    New connections are still accepted for DELAY seconds, while the Service's endpoints drop the
#    pod, and told to go too.
# 2. drain_listeners?inboundonly: the client listener stops accepting (a refused connection is
#    safe to retry on another pod); the readiness and stats listeners are not inbound and stay.
# 3. Wait until no request is in flight on the client listener, at most TIMEOUT seconds; then one
#    second for the last access-log batch to reach the sidecar (which keeps serving until Envoy
#    has exited: serve --wait-for-envoy).
set -u
port=$1 delay=$2 timeout=$3

admin() {  # METHOD PATH: the admin's answer on stdout; fails when the admin does not answer
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf '%s %s HTTP/1.1\r\nhost: envoy-admin\r\nconnection: close\r\ncontent-length: 0\r\n\r\n' "$1" "$2" >&3
  local line
  while IFS= read -r line <&3; do printf '%s\n' "${line%$'\r'}"; done
  exec 3<&-
}

in_flight() {  # requests in flight on the client listener; nothing when the admin does not answer
  local name value
  admin GET '/stats?filter=downstream_rq_active' | while read -r name value; do
    if [ "$name" = "http.llm.downstream_rq_active:" ]; then printf '%s\n' "$value"; fi
  done
}

say() { printf 'envoy-drain: %s\n' "$*"; }

admin POST /healthcheck/fail >/dev/null 2>&1 || { say "no admin on port $port: nothing to drain"; exit 0; }
admin POST '/drain_listeners?graceful&inboundonly' >/dev/null
say "failing readiness, asking clients to go, accepting for ${delay}s"
sleep "$delay"
admin POST '/drain_listeners?inboundonly' >/dev/null
say "no longer accepting connections"
end=$((SECONDS + timeout))
while n=$(in_flight 2>/dev/null) && [ -n "$n" ] && [ "$n" != 0 ]; do
  if [ "$SECONDS" -ge "$end" ]; then
    say "$n requests still in flight after ${timeout}s: Envoy stops now and cuts them"
    exit 0
  fi
  sleep 1
done
sleep 1
say "no request in flight after ${SECONDS}s: Envoy may stop"
