"""Every header and metadata name the router reads or writes, defined once."""

from __future__ import annotations

# Request headers we set (and strip when a client sends its own copy).
CLUSTER = "x-extproc-cluster"  # default; the policy may rename it
SELECTED_MODEL = "x-selected-model"
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
AFFINITY_KEY = "x-extproc-affinity"
ROUTER_DECISION = "x-router-decision"  # upstream (two round trips) and to the client

# Response headers.
ROUTER_MODEL = "x-router-model"
ROUTER_EXPLAIN = "x-router-explain"
CACHE = "x-cache"  # hit (answered by the sidecar's semantic cache) or miss (looked up, routed)
# The backend that answered a chained request: "groq/<model id>", or "<model> replicas".
ROUTER_BACKEND = "x-router-backend"
ROUTER_ATTEMPTS = "x-router-attempts"  # how many backends Envoy tried for it

# Request headers we read.
REQUEST_ID = "x-request-id"
CONTENT_TYPE = "content-type"
CONTENT_ENCODING = "content-encoding"
CONTENT_LENGTH = "content-length"
DEBUG = "x-router-debug"
SESSION_ID = "x-session-id"  # the policy's default session header (headers.session)
USER_ID = "x-user-id"  # the policy's default user header (headers.user)
PRIORITY = "x-user-tier"  # the policy's default priority header (admission.priority_header)
TENANT_ID = "x-tenant-id"  # the policy's default tenant header (admission.tenant_header)

# Dynamic metadata namespaces. Envoy routes, balances and decorates on these when it runs
# the single-round-trip configuration (deploy/envoy/envoy.yaml).
METADATA_NAMESPACE = "extproc"
LB_NAMESPACE = "envoy.lb"  # the Gateway API Inference Extension's endpoint-picker protocol
USAGE_NAMESPACE = "extproc.usage"  # token usage Envoy reads from response bodies

# Keys of the decision under METADATA_NAMESPACE: the router writes them (server.py); Envoy's
# routes, clusters, headers and access log read them, and the access log brings them back.
KEY_CLUSTER = "cluster"
KEY_MODEL = "model"
KEY_DECISION = "decision"
KEY_UPSTREAM_MODEL = "upstream_model"
KEY_ENDPOINT = "endpoint"
KEY_AFFINITY = "affinity"
KEY_LEASE = "lease"
KEY_EXPLAIN = "explain"
KEY_CACHE = "cache"  # "miss" when the semantic cache was looked up (the x-cache response header)
KEY_CACHE_STORE = "cache_store"  # a miss's token: its route mirrors the response to the sidecar
# A chained request (several backends): the chain route to take, Envoy's retry count, and per
# attempt the body's model (JSON), with what the upstream Lua filter needs to splice it in.
KEY_CHAIN = "chain"
KEY_RETRIES = "retries"
KEY_PLAN = "plan"  # list: attempt N's model id, JSON-quoted
KEY_BACKENDS = "backends"  # "groq/llama-3.3-70b-versatile, together/...": for errors and the access log
KEY_LABELS = "labels"  # list: attempt N's backend, as x-router-backend names it
KEY_FIRST_BACKEND = "first_backend"  # x-router-backend of the first attempt (later ones name theirs)
KEY_MODEL_SPAN = "model_span"  # "start:end" of the model value in the body the router sent
KEY_DEADLINE = "deadline"  # epoch ms after which no further attempt starts
# Keys of the token counts under USAGE_NAMESPACE.
KEY_INPUT_TOKENS = "input"
KEY_OUTPUT_TOKENS = "output"

# Headers a client must never be able to set for itself.
ROUTER_OWNED = (SELECTED_MODEL, DESTINATION_ENDPOINT, AFFINITY_KEY, ROUTER_DECISION, ROUTER_EXPLAIN)
