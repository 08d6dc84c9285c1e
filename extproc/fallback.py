"""A chained request's plan: the backends Envoy tries in order, and the metadata that tells it.

The plan is the decision's model's backends, then each fallback model's, leaving out hosted
backends in cooldown or ejected (extproc/cooldown.py) and pools without a ready replica, up to
``fallback.max_attempts``. Envoy walks it (extproc/envoy/render/chains.py): attempt N goes to
the N-th backend, with its model id spliced into the body by the cluster's upstream filter.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass
from typing import Any

import orjson

from extproc import headers as h
from extproc import protocol
from extproc.envoy.render.chains import CHAIN_NAMESPACE, chain_key


@dataclass(frozen=True, slots=True)
class Attempt:
    model: str  # the policy's model name
    backend: str  # Backend.id: "groq/llama-3.3-70b-versatile", or "replicas"
    cluster: str  # the Envoy cluster this attempt goes to
    upstream_model: str  # the model id this backend is sent
    hosted: bool

    @property
    def label(self) -> str:
        return self.backend if self.hosted else f"{self.model} replicas"


@dataclass(frozen=True, slots=True)
class Plan:
    attempts: tuple[Attempt, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (backend or model, why): for explanations
    per_try_timeout: float | None = None  # the first backend's (one per request: README)

    @property
    def chained(self) -> bool:
        return len(self.attempts) > 1 or (bool(self.attempts) and self.attempts[0].hosted)

    def metadata(self, model_span: tuple[int, int], path: str, deadline: float) -> dict[str, dict[str, Any]]:
        """The dynamic metadata of a chained request: the priority groups Envoy's cluster
        specifier reads (one per attempt), and what each attempt's upstream filter needs. The
        parts that depend only on the backends are built (as protobuf values) once per plan shape."""
        fixed = _fixed_metadata(self.attempts, self.per_try_timeout)
        return {
            CHAIN_NAMESPACE: fixed[CHAIN_NAMESPACE],
            h.METADATA_NAMESPACE: {
                **fixed[h.METADATA_NAMESPACE],
                h.KEY_MODEL_SPAN: list(model_span),
                h.KEY_PATH: path,
                h.KEY_DEADLINE: str(int((time.time() + deadline) * 1000)),
            },
        }

    def explain(self) -> dict[str, Any]:
        return {
            "attempts": [{"backend": a.label, "model": a.upstream_model, "cluster": a.cluster} for a in self.attempts],
            "skipped": dict(self.skipped) or None,
        }


@functools.lru_cache(maxsize=1024)
def _fixed_metadata(attempts: tuple[Attempt, ...], per_try_timeout: float | None) -> dict[str, dict[str, Any]]:
    # Converting nested lists to protobuf values cost ~30-160 us a request (most of a chained
    # request's extra sidecar CPU); a copy of a built value costs ~1 us. Few plan shapes exist:
    # the policy's chains, less the backends cooling down.
    groups = [{"name": str(i), "clusters": [{"cluster_name": a.cluster, "weight": 1}]} for i, a in enumerate(attempts)]
    return {
        CHAIN_NAMESPACE: {"priority_groups": protocol.to_value(groups)},
        h.METADATA_NAMESPACE: {
            h.KEY_CHAIN: chain_key(per_try_timeout),
            h.KEY_RETRIES: str(len(attempts) - 1),
            h.KEY_PLAN: protocol.to_value([orjson.dumps(a.upstream_model).decode() for a in attempts]),
            h.KEY_BACKENDS: ", ".join(a.label for a in attempts),
            h.KEY_LABELS: protocol.to_value([a.label for a in attempts]),
        },
    }


class RecentPlans:
    """The plans of recent chained requests by Envoy's request id: Envoy's per-attempt access
    log entries carry none of a request's metadata, only its id and the attempt number. Bounded:
    the oldest go first, and an entry that outlived ``max_age`` is of no use."""

    def __init__(self, capacity: int = 65536, max_age: float = 900.0) -> None:
        self.capacity = capacity
        self.max_age = max_age
        self._plans: dict[str, tuple[float, Plan]] = {}

    def remember(self, request_id: str, plan: Plan) -> None:
        if not request_id:
            return
        plans = self._plans
        plans[request_id] = (time.monotonic(), plan)
        if len(plans) > self.capacity:
            for key in list(itertools.islice(plans, len(plans) - self.capacity)):
                del plans[key]

    def get(self, request_id: str) -> Plan | None:
        found = self._plans.get(request_id)
        if found is None:
            return None
        if time.monotonic() - found[0] > self.max_age:
            del self._plans[request_id]
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._plans)
