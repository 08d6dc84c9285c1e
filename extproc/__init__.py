"""extproc: an LLM routing sidecar for Envoy.

Envoy hands every OpenAI-style request to this external processor; it picks the model (by
policy: rules, and an encoder's domain, complexity and PII signals) and the replica (KV-cache
affinity within a load bound), then rewrites the request so Envoy sends it there.
"""

from extproc.errors import RouterError
from extproc.policy import ConfigError, Policy, load_policy, parse_policy
from extproc.router import Call, Routed, Router

__version__ = "0.1.0"

__all__ = ["Call", "ConfigError", "Policy", "Routed", "Router", "RouterError", "load_policy", "parse_policy"]
