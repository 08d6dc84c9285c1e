"""A chained request's plan: the backends Envoy tries in order, and the metadata that tells it.

The plan is the decision's model's backends, then each fallback model's, leaving out hosted
backends in cooldown or ejected (extproc/cooldown.py) and pools without a ready replica, up to
``fallback.max_attempts``. Envoy walks it (extproc/envoy/render/chains.py): attempt N goes to
the N-th backend, with its model id spliced into the body by the cluster's upstream filter.

The happy path is most requests: every backend of the chain usable, so the plan is the one the
policy's ChainTable built for that chain, its metadata already serialized, and a request adds
only where its body names the model and its deadline.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc import headers as h
from extproc import protocol
from extproc.envoy.render.chains import CHAIN_NAMESPACE, chain_key
from extproc.policy.backends import POOL, Backend
from extproc.policy.config import Model, Policy


# Attempts and plans are built once per policy (ChainTable) and shared by the requests they
# serve, so they compare and hash by identity: a metadata cache lookup hashes a few pointers.
@dataclass(frozen=True, slots=True, eq=False)
class Attempt:
    model: str  # the policy's model name
    backend: str  # Backend.id: "groq/llama-3.3-70b-versatile", or "replicas"
    cluster: str  # the Envoy cluster this attempt goes to
    upstream_model: str  # the model id this backend is sent
    hosted: bool
    label: str = field(init=False)  # x-router-backend and the metric label: the backend, or "<model> replicas"

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.backend if self.hosted else f"{self.model} replicas")


@dataclass(frozen=True, slots=True, eq=False)
class Plan:
    attempts: tuple[Attempt, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (backend or model, why): for explanations
    per_try_timeout: float | None = None  # the first backend's (one per request: README)

    @property
    def chained(self) -> bool:
        return len(self.attempts) > 1 or (bool(self.attempts) and self.attempts[0].hosted)

    def fixed_metadata(self) -> bytes:
        """The part of a chained request's dynamic metadata that depends only on its backends,
        serialized: the priority groups Envoy's cluster specifier reads (one per attempt), and
        what a later attempt's upstream filter needs. Built once per plan shape."""
        return _fixed_metadata(self.attempts, self.per_try_timeout)

    def explain(self) -> dict[str, Any]:
        return {
            "attempts": [{"backend": a.label, "model": a.upstream_model, "cluster": a.cluster} for a in self.attempts],
            "skipped": dict(self.skipped) or None,
        }


def request_metadata(model_span: tuple[int, int], deadline: float) -> dict[str, str]:
    """The per-request part of a chained request's metadata (under METADATA_NAMESPACE): where a
    later attempt splices its model id, and the epoch ms after which none starts."""
    return {
        h.KEY_MODEL_SPAN: f"{model_span[0]}:{model_span[1]}",
        h.KEY_DEADLINE: str(int((time.time() + deadline) * 1000)),
    }


@functools.lru_cache(maxsize=1024)
def _fixed_metadata(attempts: tuple[Attempt, ...], per_try_timeout: float | None) -> bytes:
    # Converting nested lists to protobuf values cost ~30-160 us a request; parsing these bytes
    # into the response costs ~1 us. Few plan shapes exist: the policy's chains (ChainTable),
    # less the backends cooling down.
    groups = [{"name": str(i), "clusters": [{"cluster_name": a.cluster, "weight": 1}]} for i, a in enumerate(attempts)]
    struct = protocol.to_value(
        {
            CHAIN_NAMESPACE: {"priority_groups": groups},
            h.METADATA_NAMESPACE: {
                h.KEY_CHAIN: chain_key(per_try_timeout),
                h.KEY_RETRIES: str(len(attempts) - 1),
                h.KEY_PLAN: [orjson.dumps(a.upstream_model).decode() for a in attempts],
                h.KEY_BACKENDS: ", ".join(a.label for a in attempts),
                h.KEY_LABELS: [a.label for a in attempts],
                # x-router-backend until a later attempt's upstream filter names its own.
                h.KEY_FIRST_BACKEND: attempts[0].label,
            },
        }
    ).struct_value
    return struct.SerializeToString(deterministic=True)


@dataclass(frozen=True, slots=True)
class Step:
    """One backend of a chain, as the router walks it, and the attempt it becomes."""

    model: Model
    backend: Backend
    attempt: Attempt


@dataclass(frozen=True, slots=True)
class Chain:
    """A model's backends, then each fallback model's, in order, with the plan of a request
    none of whose backends is skipped (the happy path): built once per policy and chain."""

    steps: tuple[Step, ...]
    plan: Plan  # the first max_attempts steps, nothing skipped


class ChainTable:
    """The chains of one policy by (model, fallback models), built on first use and kept with
    the policy's router state (a hot reload starts a new table). Bounded: sessions may reorder
    fallbacks, so the table is cleared rather than grown past ``capacity``."""

    def __init__(self, policy: Policy, capacity: int = 4096) -> None:
        self.policy = policy
        self.capacity = capacity
        self._chains: dict[tuple[str, tuple[str, ...]], Chain] = {}

    def get(self, model: str, fallbacks: tuple[str, ...]) -> Chain:
        key = (model, fallbacks)
        chain = self._chains.get(key)
        if chain is None:
            if len(self._chains) >= self.capacity:
                self._chains.clear()
            chain = self._chains[key] = self._build(model, fallbacks)
        return chain

    def _build(self, model: str, fallbacks: tuple[str, ...]) -> Chain:
        policy = self.policy
        steps = []
        for name in (model, *fallbacks):
            candidate = policy.models[name]
            for backend in candidate.backends or (Backend(None, candidate.upstream_model),):
                if backend.provider is not None:
                    attempt = Attempt(name, backend.id, backend.provider, backend.upstream_model, True)
                else:
                    replicas = candidate.replicas
                    direct = replicas is not None and replicas.envoy == "original_dst"
                    cluster = policy.original_dst_cluster if direct else candidate.cluster
                    attempt = Attempt(name, POOL, cluster, candidate.upstream_model, False)
                steps.append(Step(candidate, backend, attempt))
        attempts = tuple(s.attempt for s in steps[: policy.fallback.max_attempts])
        return Chain(tuple(steps), Plan(attempts, (), self.per_try_timeout(attempts)))

    def per_try_timeout(self, attempts: tuple[Attempt, ...]) -> float | None:
        """The first backend's timeout: a provider's own, or the replicas' (fallback.replica_timeout)."""
        hosted = self.policy.providers.get(attempts[0].cluster) if attempts and attempts[0].hosted else None
        return hosted.timeout if hosted is not None else self.policy.fallback.replica_timeout


class RecentPlans:
    """The plans of recent chained requests by Envoy's request id: Envoy's per-attempt access
    log entries carry none of a request's metadata, only its id and the attempt number.

    Two generations of a dict: remembering is one insertion (the plans themselves are shared,
    so an entry holds no object of its own for the garbage collector to walk). A plan is kept
    at least ``max_age / 2`` seconds unless ``capacity / 2`` newer ones came; at most
    ``capacity`` are kept."""

    def __init__(self, capacity: int = 65536, max_age: float = 900.0, clock=time.monotonic) -> None:  # type: ignore[no-untyped-def]
        self.capacity = capacity
        self.max_age = max_age
        self._clock = clock
        self._current: dict[str, Plan] = {}
        self._previous: dict[str, Plan] = {}
        self._rotated = clock()

    def remember(self, request_id: str, plan: Plan) -> None:
        if not request_id:
            return
        current = self._current
        current[request_id] = plan
        if len(current) >= self.capacity // 2:
            self._rotate()

    def get(self, request_id: str) -> Plan | None:
        if self._clock() - self._rotated > self.max_age / 2:
            self._rotate()
        plan = self._current.get(request_id)
        return plan if plan is not None else self._previous.get(request_id)

    def _rotate(self) -> None:
        now = self._clock()
        # Both generations are past max_age when nothing rotated them for that long.
        self._previous = {} if now - self._rotated > self.max_age else self._current
        self._current = {}
        self._rotated = now

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
