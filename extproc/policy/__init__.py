"""The routing policy: schema, loading, condition kinds, decision evaluation, PII enforcement."""

from extproc.policy.config import Decision, Model, Policy
from extproc.policy.load import ConfigError, load_policy, parse_policy

__all__ = ["ConfigError", "Decision", "Model", "Policy", "load_policy", "parse_policy"]
