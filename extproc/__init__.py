"""extproc: an LLM routing sidecar for Envoy.

Envoy hands every OpenAI-style request to this external processor; it picks the model (by
policy: rules, and an encoder's domain, complexity and PII signals) and the replica (KV-cache
affinity within a load bound), then rewrites the request so Envoy sends it there.
"""

import os

# numpy's OpenBLAS starts a thread per core and spins them for every product large enough, such
# as the semantic cache's search over thousands of vectors; beside Envoy and the encoder on two
# cores that made the search's p99 ~100x its median (bench/cache_lookup.py). One thread, unless
# the operator says otherwise; set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from extproc.errors import RouterError
from extproc.policy import ConfigError, Policy, load_policy, parse_policy
from extproc.router import Call, Routed, Router

__version__ = "0.1.0"

__all__ = ["Call", "ConfigError", "Policy", "Routed", "Router", "RouterError", "load_policy", "parse_policy"]
