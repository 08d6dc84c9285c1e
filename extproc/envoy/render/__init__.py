"""Envoy's configuration for a routing policy, rendered in one place: the listener, the route
configuration and the clusters the sidecar serves Envoy as its control plane (extproc/xds.py),
the tiny static bootstrap that points Envoy at them, and the whole resolved configuration for
review (`extproc envoy-config`, deploy/envoy/envoy.yaml). The demo, the tests, the benchmarks
and the Helm chart all run Envoy on this output. Every function here is pure: policy and
EnvoyOptions in, dicts out.

Where each part is rendered:

* ``resources.py``: render_resources, a policy's listener, routes and clusters (Resources);
* ``listener.py``: the client listener's HTTP connection manager, and the admin-proxy listeners;
* ``filters.py``: its HTTP filters (ext_proc, buffer, usage) and the access log;
* ``routes.py``: its route configuration;
* ``local_replies.py``: Envoy's own replies as OpenAI-style errors;
* ``clusters.py``: the model clusters;
* ``bootstrap.py``: render_bootstrap, and render / inline, the whole configuration as one.

The shape (see README, "How Envoy is wired"):

* the ext_proc filter gets the buffered body once (request headers skipped; path, method and
  the headers the policy reads come as attributes) and answers with the rewritten body and the
  decision as dynamic metadata under ``extproc`` (and ``envoy.lb``, as the Gateway API
  Inference Extension defines it);
* a buffer filter holds the request headers until that answer is in, so routing happens on it;
* routes match on ``extproc.cluster`` metadata, one per cluster; ORIGINAL_DST and override_host
  clusters read the picked replica from metadata;
* with usage accounting on, json_to_metadata and sse_to_metadata read token usage from response
  bodies into metadata (Envoy parses; nothing is copied to the sidecar);
* a gRPC access log sends the sidecar one entry per finished request, batched: it ends the
  replica lease on every ending and carries the status and the usage;
* paths are normalised; only the exact LLM paths reach the router, near misses are refused,
  and of the rest only ``forward_paths`` reach a model server (README "Paths");
* local replies Envoy makes itself (router unreachable, body too large, no upstream, every
  refusal of its HTTP/1 codec) are turned into OpenAI-style JSON errors; the router's own
  errors already are.

What depends on the policy is split by the xDS resource it lives in, so a change touches only
what it must: clusters (CDS) per model cluster, one route per cluster (RDS), and the listener
(LDS) only for the header names the policy reads and the Envoy settings.
"""
