"""KV-event awareness for the router: tokenizers per model, the exact index, its subscriptions.

One place joins the parts (prompt_tokens, kvindex, kvsubscribe) for the models whose policy
has ``replicas.kv_events``, so the router only asks two questions: this request's prompt blocks
for a model, and how much of them each replica holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from extproc.policy.config import KvEvents, Model, Policy
from extproc.replicas.kvindex import KvIndex, Mode, PromptBlocks, held_fractions
from extproc.replicas.kvsubscribe import KvEventSubscriber, Target
from extproc.replicas.load import LoadTracker
from extproc.replicas.peerload import PeerLoad
from extproc.replicas.prompt_tokens import PromptTokenizer, TemplateError
from extproc.request import Api, LLMRequest

log = logging.getLogger("extproc.replicas")


class Tokenizers:
    """The served models' prompt tokenizers for one policy, loaded when the policy is built (a
    missing or broken file is logged and the model falls back to the router's own guess)."""

    def __init__(self, policy: Policy, cache: dict[tuple[str, str | None], PromptTokenizer] | None = None) -> None:
        self._by_model: dict[str, PromptTokenizer] = {}
        cache = cache if cache is not None else {}
        for name, model in policy.models.items():
            spec = model.replicas.kv_events if model.replicas else None
            if spec is None:
                continue
            key = (spec.tokenizer, spec.chat_template)
            if key not in cache:
                try:
                    cache[key] = PromptTokenizer.from_files(Path(spec.tokenizer), spec.chat_template)
                except (TemplateError, OSError, ValueError) as exc:
                    log.error("model %s: KV events off, its prompt tokens cannot be computed: %s", name, exc)
                    continue
            self._by_model[name] = cache[key]
        self.cache = cache

    def get(self, model: str) -> PromptTokenizer | None:
        return self._by_model.get(model)


def prompt_tokens(tokenizer: PromptTokenizer, parsed: LLMRequest) -> list[int] | None:
    """The token ids the model server prefills for this request (None: not a chat or completion
    body the tokenizer can reproduce)."""
    body = parsed.body
    try:
        if parsed.api is Api.CHAT and isinstance(body.get("messages"), list):
            return tokenizer.chat([m for m in body["messages"] if isinstance(m, dict)])
        if parsed.api is Api.COMPLETIONS and isinstance(body.get("prompt"), str):
            return tokenizer.completion(body["prompt"])
    except TemplateError as exc:
        log.debug("prompt tokens not computed: %s", exc)
    return None


class KvAwareness:
    """Process-wide: the index and its subscriptions outlive policy reloads."""

    def __init__(
        self,
        on_event: Callable[[str, str], None] | None = None,
        on_lag: Callable[[str, float], None] | None = None,
        tracker: LoadTracker | None = None,
    ) -> None:
        self.index = KvIndex()
        # The other routers' requests, from the stored runs of live batches (picking.peer_load).
        self.peers = PeerLoad(tracker or LoadTracker())
        self.index.on_stored = self.peers.stored
        self.subscriber = KvEventSubscriber(self.index, on_event=on_event, on_lag=on_lag)
        self._cache: dict[tuple[str, str | None], PromptTokenizer] = {}
        self._models: dict[str, str] = {}  # replica address -> model, for the gauges

    def tokenizers(self, policy: Policy) -> Tokenizers:
        return Tokenizers(policy, self._cache)

    def follow(self, models: Mapping[str, Model], endpoints: Callable[[str], Sequence[str]]) -> None:
        """Subscribe to the publishers of every replica of the models with kv_events."""
        targets: dict[str, Target] = {}
        warm = None
        for name, model in models.items():
            spec: KvEvents | None = model.replicas.kv_events if model.replicas else None
            if spec is None:
                continue
            warm = spec.warm_seconds if warm is None else min(warm, spec.warm_seconds)
            for address in endpoints(name):
                endpoint, replay = spec.publisher(address)
                targets[address] = Target(endpoint, replay, spec.topic, name)
        if warm is not None:
            self.index.warm_seconds = warm
        self._models = {address: target.model for address, target in targets.items()}
        self.peers.forget(set(targets))
        self.subscriber.set_targets(targets)

    def held(self, prompt: PromptBlocks, endpoints: Sequence[str]) -> dict[str, tuple[float, Mode]]:
        return held_fractions(self.index, prompt, endpoints)

    def picked(self, endpoint: str, prompt: PromptBlocks, fraction: float) -> None:
        """This router sent the prompt to endpoint, which held that fraction of it: its stored
        runs there are ours, not another router's."""
        size = self.index.block_size(endpoint)
        if size is None:  # it has published nothing yet: its model's block size, from another replica
            model = self._models.get(endpoint)
            size = next(
                (b for a, m in self._models.items() if m == model and (b := self.index.block_size(a)) is not None),
                None,
            )
        if size is not None:
            keys = prompt.keys(size)
            self.peers.expect(endpoint, keys, round(fraction * len(prompt.tokens) / size))

    def modes(self) -> dict[tuple[str, str], int]:
        """(model, mode) -> replicas, for the gauge."""
        out: dict[tuple[str, str], int] = {}
        for address, model in self._models.items():
            key = (model, self.index.mode(address).value)
            out[key] = out.get(key, 0) + 1
        return out

    def close(self) -> None:
        self.subscriber.stop()
