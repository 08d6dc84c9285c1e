"""Every header and metadata name the router reads or writes, defined once."""

from __future__ import annotations

# Request headers we set (and strip when a client sends its own copy).
CLUSTER = "x-extproc-cluster"  # default; the policy may rename it
SELECTED_MODEL = "x-selected-model"
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
AFFINITY_KEY = "x-extproc-affinity"
DECISION = "x-router-decision"

# Response headers.
ROUTER_MODEL = "x-router-model"
ROUTER_DECISION = "x-router-decision"
ROUTER_EXPLAIN = "x-router-explain"

# Request headers we read.
REQUEST_ID = "x-request-id"
CONTENT_TYPE = "content-type"
CONTENT_ENCODING = "content-encoding"
CONTENT_LENGTH = "content-length"
DEBUG = "x-router-debug"

# Dynamic metadata namespaces. Envoy routes, balances and decorates on these when it runs
# the single-round-trip configuration (deploy/envoy/envoy.yaml).
METADATA_NAMESPACE = "extproc"
LB_NAMESPACE = "envoy.lb"  # the Gateway API Inference Extension's endpoint-picker protocol

# Headers a client must never be able to set for itself.
ROUTER_OWNED = (SELECTED_MODEL, DESTINATION_ENDPOINT, AFFINITY_KEY, DECISION, ROUTER_EXPLAIN)
