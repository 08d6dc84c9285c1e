"""Replica picking as small plugins: filters drop replicas, scorers rate them in [0, 1], the
picker takes the best weighted sum and lists the next best as fallbacks for Envoy's retries.

Two kinds of filter: exclusions (an ejected replica) leave a replica out altogether, fallbacks
included; the others (a load bound) only make it ineligible for the pick while it may still be
listed as a fallback.

Every plugin is registered once, beside its class, by the type name that the policy
(``picking.weights.<scorer>``, ``picking.picker``), explanations (``replicas.scores``) and metrics
use, with a factory, the settings it reads and, for a scorer, its default weight (as the Gateway
API Inference Extension's scheduling framework registers its plugins). ``build_picker`` builds
whatever is registered: a new behaviour is a new registered plugin, not a new branch here."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from extproc.policy.config import PickingSettings
from extproc.replicas.health import OutlierDetector
from extproc.replicas.kvindex import Mode
from extproc.replicas.load import LoadTracker
from extproc.replicas.prefix import PrefixIndex
from extproc.replicas.scrape import LoadReport


@dataclass(slots=True)
class PickRequest:
    model: str
    blocks: list[int]  # prefix chain hashes of the rendered conversation
    session: str | None = None
    matched: dict[str, int] | None = None  # blocks of the prefix each replica holds, computed once
    # From the replicas' KV events (models with kv_events): the fraction of the prompt's tokens each
    # replica holds, exact or (approximate) a lower bound.
    held: Mapping[str, tuple[float, Mode]] | None = None
    # In flight per replica as the load filters and scorers see it (LoadTracker.loads: this
    # router's own leases plus the other routers' requests its KV events show), set by the picker.
    inflight: Mapping[str, float] | None = None

    def load(self, tracker: LoadTracker) -> Mapping[str, float]:
        return self.inflight if self.inflight is not None else tracker.inflight

    def matched_blocks(self, index: PrefixIndex, endpoints: Sequence[str]) -> dict[str, int]:
        """Blocks of the prefix each replica holds, as well as the router knows: from its KV
        events where they are exact, else the router's own index (or the events' lower bound)."""
        if self.matched is None:
            matched = {e: index.matched_blocks(e, self.blocks) for e in endpoints} if self.blocks else {}
            if self.held and matched:
                n = len(self.blocks)
                for e in endpoints:
                    held = self.held.get(e)
                    if held is not None:
                        real = round(held[0] * n)
                        matched[e] = real if held[1] is Mode.EXACT else max(real, matched[e])
            self.matched = matched
        return self.matched


@dataclass(slots=True)
class Pick:
    endpoints: tuple[str, ...]  # the pick first, then fallbacks
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # endpoint -> scorer -> score
    excluded: dict[str, str] = field(default_factory=dict)  # endpoint -> the exclusion that left it out


class Filter(Protocol):
    name: ClassVar[str]

    def filter(self, request: PickRequest, endpoints: Sequence[str]) -> Sequence[str]: ...


class Scorer(Protocol):
    name: ClassVar[str]

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]: ...


# --- the registry ---------------------------------------------------------------------------------

Kind = Literal["exclusion", "filter", "scorer", "picker"]


@dataclass(frozen=True, slots=True)
class Deps:
    """What plugins are built with: the router's process-wide state."""

    tracker: LoadTracker
    index: PrefixIndex
    reports: Callable[[str], LoadReport | None] | None = None
    health: OutlierDetector | None = None


@dataclass(frozen=True, slots=True)
class PluginType:
    name: str  # the type name: in the policy, explanations and metrics
    kind: Kind
    # The plugin for these settings, or None where the settings turn it off.
    factory: Callable[[PickingSettings, Deps], Any]
    weight: float = 0.0  # a scorer's weight when picking.weights does not name it
    aliases: tuple[str, ...] = ()  # other names the policy may use for it (documented)
    settings: tuple[str, ...] = ()  # the PickingSettings fields (picking.<key>) it reads


PLUGINS: dict[str, PluginType] = {}  # by type name, in registration order (the order filters run)
ALIASES: dict[str, str] = {}  # alias -> type name

_T = TypeVar("_T")


def register(
    kind: Kind,
    name: str,
    factory: Callable[[PickingSettings, Deps], Any],
    *,
    weight: float = 0.0,
    aliases: tuple[str, ...] = (),
    settings: tuple[str, ...] = (),
) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: registers the plugin type ``name`` and gives the class that name."""

    def decorate(cls: type[_T]) -> type[_T]:
        taken = PLUGINS.keys() | ALIASES.keys()
        for n in (name, *aliases):
            if n in taken:
                raise ValueError(f"picking plugin name {n!r} is registered twice")
        PLUGINS[name] = PluginType(name, kind, factory, weight, aliases, settings)
        ALIASES.update(dict.fromkeys(aliases, name))
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def plugins(kind: Kind) -> list[PluginType]:
    return [p for p in PLUGINS.values() if p.kind == kind]


def canonical(name: str) -> str:
    """The type name of a plugin named by its type name or an alias; KeyError if neither."""
    name = ALIASES.get(name, name)
    if name not in PLUGINS:
        known = ", ".join(sorted(PLUGINS.keys() | ALIASES.keys()))
        raise KeyError(f"no picking plugin {name!r}; registered: {known}")
    return name


def default_weights() -> dict[str, float]:
    """Every scorer's default weight, by type name."""
    return {p.name: p.weight for p in plugins("scorer")}


def weights(settings: PickingSettings) -> dict[str, float]:
    """Every scorer's weight: picking.weights (by type name or alias) over the defaults."""
    out = default_weights()
    for name, weight in settings.weights.items():
        out[canonical(name)] = weight
    return out


# --- filters --------------------------------------------------------------------------------------


@register(
    "exclusion",
    "outlier_detection",
    lambda s, d: OutlierEjection(d.health) if d.health is not None and s.outlier_detection.enabled else None,
    settings=("outlier_detection",),
)
@dataclass(slots=True)
class OutlierEjection:
    """Leaves out replicas that outlier detection ejected (extproc/replicas/health.py). If every
    replica is out (the pool shrank under its ejections), none is: errors beat an empty pool."""

    detector: OutlierDetector

    def filter(self, request: PickRequest, endpoints: Sequence[str]) -> Sequence[str]:
        if not self.detector.ejected:
            return endpoints
        healthy = [e for e in endpoints if not self.detector.is_ejected(e)]
        return healthy or endpoints


def _load_bound(settings: PickingSettings, deps: Deps) -> Filter:
    if settings.sticky_move_blocks is None:
        return BoundedLoad(
            deps.tracker, settings.load_bound, settings.load_floor, deps.index, settings.sticky_load_bound
        )
    # The sticky bound applies to the costly moves only, not to every request one replica leads on.
    sticky = settings.sticky_load_bound if settings.sticky_load_bound is not None else settings.load_bound
    plain = BoundedLoad(deps.tracker, settings.load_bound, settings.load_floor)
    return StickyHome(plain, deps.index, deps.tracker, sticky, settings.sticky_move_blocks, settings.load_floor)


@register(
    "filter",
    "bounded_load",
    _load_bound,
    settings=("load_bound", "sticky_load_bound", "sticky_move_blocks", "load_floor"),
)
@dataclass(slots=True)
class BoundedLoad:
    """Consistent hashing with bounded loads: no replica may exceed (1 + epsilon) x the mean
    in-flight count once this request is added, so affinity never piles work on one replica.

    The bound is cost-aware when given the prefix index: a request whose prompt one replica holds
    much more of than the others (a conversation's later turn) may go up to ``sticky_epsilon``,
    because moving it means prefilling its whole history again; a request that is as cheap on any
    replica (a new conversation, a shared system prompt) is held to ``epsilon`` and so fills the
    least loaded replicas, which keeps the balance the sticky ones stretch.

    Below ``floor`` requests in flight a replica is never "overloaded": model servers batch many
    requests at once, and at that load the relative bound would only break affinity (a
    conversation's next turn would be sent away while its previous turn is still finishing)."""

    tracker: LoadTracker
    epsilon: float
    floor: int = 2
    index: PrefixIndex | None = None
    sticky_epsilon: float | None = None  # None: the plain bound
    sticky_share: float = 0.25  # the prompt share one replica must hold beyond the others

    def filter(self, request: PickRequest, endpoints: Sequence[str]) -> Sequence[str]:
        inflight = request.load(self.tracker)
        total = sum(inflight[e] for e in endpoints) + 1
        epsilon = self.epsilon
        if self.sticky_epsilon is not None and self.index is not None and request.blocks and len(endpoints) > 1:
            matched = sorted(request.matched_blocks(self.index, endpoints).values(), reverse=True)
            if (matched[0] - matched[1]) >= self.sticky_share * len(request.blocks):
                epsilon = self.sticky_epsilon
        capacity = _capacity(epsilon, total, len(endpoints), self.floor)
        # A replica is eligible if taking this request keeps it within capacity.
        eligible = [e for e in endpoints if inflight[e] + 1 <= capacity]
        return eligible or [min(endpoints, key=lambda e: inflight[e])]


@dataclass(slots=True)
class StickyHome:
    """Wraps a load bound: a conversation's later turn may stay on the replica that holds its
    longest prefix (its home) up to ``sticky_epsilon`` when moving it would re-prefill at least
    ``min_blocks`` blocks, counted against the best replica the bound keeps. A move to a replica
    that holds nearly as much (where the conversation went last time) or of a short conversation
    costs little, so those still move and keep the load even; only the costly moves, which make
    the slowest first tokens, are refused. Built by bounded_load when sticky_move_blocks is set."""

    name: ClassVar[str] = "sticky_home"

    bound: Filter
    index: PrefixIndex
    tracker: LoadTracker
    sticky_epsilon: float
    min_blocks: int
    floor: int = 2

    def filter(self, request: PickRequest, endpoints: Sequence[str]) -> Sequence[str]:
        eligible = self.bound.filter(request, endpoints)
        if not request.blocks or len(endpoints) < 2:
            return eligible
        matched = request.matched_blocks(self.index, endpoints)
        home = max(endpoints, key=lambda e: matched[e])
        if home in eligible:
            return eligible
        cost = matched[home] - max((matched[e] for e in eligible), default=0)
        inflight = request.load(self.tracker)
        total = sum(inflight[e] for e in endpoints) + 1
        capacity = _capacity(self.sticky_epsilon, total, len(endpoints), self.floor)
        if cost >= self.min_blocks and inflight[home] + 1 <= capacity:
            return [*eligible, home]
        return eligible


def _capacity(epsilon: float, total: float, replicas: int, floor: int) -> int:
    """In-flight requests a replica may hold: (1 + epsilon) x the mean, this request included."""
    return max(floor, math.ceil((1 + epsilon) * total / replicas))


# --- scorers --------------------------------------------------------------------------------------


@register("scorer", "prefix", lambda s, d: PrefixAffinity(d.index), weight=3.0)
@dataclass(slots=True)
class PrefixAffinity:
    """The router's own guess: the fraction of the prompt's blocks it sent each replica lately.
    Requests of models with KV events are scored by KvCacheAffinity instead."""

    index: PrefixIndex

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]:
        if not request.blocks or request.held is not None:
            return {}
        n = len(request.blocks)
        matched = request.matched_blocks(self.index, endpoints)
        return {e: matched[e] / n for e in endpoints}


@register("scorer", "kv_cache", lambda s, d: KvCacheAffinity(d.index), weight=3.0)
@dataclass(slots=True)
class KvCacheAffinity:
    """The fraction of the prompt's tokens a replica really holds, from its own KV events
    (extproc/replicas/kvindex.py): what every router replica sees alike. A replica whose events
    are not complete (just subscribed, or resyncing after a gap) gets the router's own guess, or
    what its events already show if that is more. Requests of models without KV events get no
    score here (PrefixAffinity scores them)."""

    index: PrefixIndex

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]:
        held = request.held
        if held is None or not request.blocks:
            return {}
        n = len(request.blocks)
        out = {}
        for e in endpoints:
            fraction, mode = held.get(e, (0.0, Mode.APPROXIMATE))
            if mode is not Mode.EXACT:
                fraction = max(fraction, self.index.matched_blocks(e, request.blocks) / n)
            out[e] = fraction
        return out


@register(
    "scorer",
    "load",
    lambda s, d: LeastLoad(d.tracker) if d.reports is None else LeastLoad(d.tracker, d.reports),
    weight=2.0,
)
@dataclass(slots=True)
class LeastLoad:
    """Fewer in-flight requests, a shorter queue and a freer KV cache score higher."""

    tracker: LoadTracker
    reports: Callable[[str], LoadReport | None] = lambda endpoint: None

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]:
        inflight = request.load(self.tracker)
        busiest = max(inflight[e] for e in endpoints) + 1
        out = {}
        for e in endpoints:
            load = 1.0 - inflight[e] / busiest
            report = self.reports(e)
            if report is None:
                out[e] = load
                continue
            parts = [load]
            if report.waiting is not None:
                parts.append(1.0 / (1.0 + report.waiting))
            if report.kv_cache_usage is not None:
                parts.append(1.0 - min(max(report.kv_cache_usage, 0.0), 1.0))
            out[e] = sum(parts) / len(parts)
        return out


@register("scorer", "session", lambda s, d: SessionAffinity(), weight=4.0)
@dataclass(slots=True)
class SessionAffinity:
    """Rendezvous hashing of the session id: a session keeps its replica, and only the sessions
    of a replica that leaves move elsewhere. It stands in for knowing where a conversation is
    cached, so it steps back where every replica's KV events say exactly that: there it would
    only pull a moved conversation back to a replica that lacks its newest turns
    (bench/RESULTS-affinity.md)."""

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]:
        if not request.session:
            return {}
        held = request.held
        if held is not None and all(held.get(e, (0.0, Mode.APPROXIMATE))[1] is Mode.EXACT for e in endpoints):
            return {}
        key = request.session.encode()
        best = max(endpoints, key=lambda e: hashlib.blake2b(key + e.encode(), digest_size=8).digest())
        return {e: 1.0 if e == best else 0.0 for e in endpoints}


@register("scorer", "prefix_leader", lambda s, d: PrefixLeader(d.index), weight=0.0, aliases=("leader",))
@dataclass(slots=True)
class PrefixLeader:
    """The replica holding the longest prefix of the prompt scores 1: after a move, a conversation
    stays where its newest turn is instead of being pulled back to its session's rendezvous
    replica, which lacks that turn. Each router knows only the turns it sent, so with several
    routers the leader may be stale (another router has since sent newer turns home): in the
    simulation it helps with one router and costs hit rate with three."""

    index: PrefixIndex

    def score(self, request: PickRequest, endpoints: Sequence[str]) -> Mapping[str, float]:
        if not request.blocks:
            return {}
        matched = request.matched_blocks(self.index, endpoints)
        best = max(matched[e] for e in endpoints)
        if best == 0:
            return {}
        return {e: 1.0 if matched[e] == best else 0.0 for e in endpoints}


# --- picker ---------------------------------------------------------------------------------------


def _max_score(settings: PickingSettings, deps: Deps) -> Picker:
    def built(kind: Kind) -> list[Any]:
        return [p for p in (t.factory(settings, deps) for t in plugins(kind)) if p is not None]

    weight = weights(settings)
    return Picker(
        filters=built("filter"),
        scorers=[(scorer, weight[scorer.name]) for scorer in built("scorer")],
        fallbacks=settings.fallbacks,
        tracker=deps.tracker,
        exclusions=built("exclusion"),
    )


@register("picker", "max_score", _max_score, settings=("fallbacks", "peer_load"))
@dataclass(slots=True)
class Picker:
    """The replica with the highest weighted sum of scores among those every filter kept, then
    the next best as fallbacks."""

    filters: Sequence[Filter]
    scorers: Sequence[tuple[Scorer, float]]  # (scorer, weight)
    fallbacks: int
    tracker: LoadTracker
    exclusions: Sequence[Filter] = ()  # what these drop is neither picked nor listed as a fallback
    _turns: dict[str, int] = field(default_factory=dict)  # per model, so models don't share a rhythm

    def pick(self, request: PickRequest, endpoints: Sequence[str], explain: bool = False) -> Pick | None:
        if not endpoints:
            return None
        excluded: dict[str, str] = {}
        for exclusion in self.exclusions:
            kept = exclusion.filter(request, endpoints)
            if len(kept) < len(endpoints):
                excluded.update((e, exclusion.name) for e in set(endpoints).difference(kept))
                endpoints = kept
        if request.inflight is None:
            request.inflight = self.tracker.loads(endpoints)
        candidates: Sequence[str] = endpoints
        for f in self.filters:
            candidates = f.filter(request, candidates)
        totals = dict.fromkeys(endpoints, 0.0)
        detail: dict[str, dict[str, float]] = {}
        for scorer, weight in self.scorers:
            if weight <= 0:
                continue
            for endpoint, value in scorer.score(request, endpoints).items():
                totals[endpoint] += weight * value
                if explain:
                    detail.setdefault(endpoint, {})[scorer.name] = round(value, 4)
        # Ties (a cold start, no session) rotate, so equal replicas share the work.
        turn = self._turns[request.model] = self._turns.get(request.model, 0) + 1
        n = len(endpoints)
        inflight = request.inflight
        eligible = set(candidates)
        # Eligible first, then the higher total, fewer in flight, the rotating turn (unique, so the
        # index after it never decides).
        ranked = sorted(
            (e not in eligible, -totals[e], inflight[e], (i - turn) % n, i) for i, e in enumerate(endpoints)
        )
        return Pick(tuple(endpoints[r[4]] for r in ranked[: 1 + self.fallbacks]), detail, excluded)


def build_picker(
    settings: PickingSettings,
    tracker: LoadTracker,
    index: PrefixIndex,
    reports: Callable[[str], LoadReport | None] | None = None,
    health: OutlierDetector | None = None,
) -> Picker:
    """The picker the settings name (picking.picker), with every registered exclusion, filter
    and scorer: the one definition the router and the simulation share."""
    picker: Picker = PLUGINS[canonical(settings.picker)].factory(settings, Deps(tracker, index, reports, health))
    return picker
