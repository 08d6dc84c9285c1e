"""Providers, backends and fallback settings: the policy reference, check-config's messages, the
schema's defaults against the code's, and the plan a request gets."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from extproc.cooldown import COOLDOWN, EJECTED, BackendHealth, Outcome, retry_after
from extproc.policy.backends import FallbackSettings, Provider, StoreSettings
from extproc.policy.load import ConfigError, parse_policy, schema
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState

BASE = """
default_model: llama
providers:
  groq: {base_url: "https://api.groq.com/openai/v1", api_key: {file: /etc/keys/groq/api-key}, timeout: 10s}
  together: {base_url: "https://api.together.xyz/v1", api_key: {env: TOGETHER_API_KEY}}
models:
  llama:
    backends:
      - {provider: groq, model: llama-3.3-70b-versatile}
      - {provider: together, model: meta-llama/Llama-3.3-70B-Instruct-Turbo}
  small:
    replicas: {static: ["10.0.0.1:8000"], envoy: override_host}
decisions:
  - {name: big, when: {keyword: [big]}, model: llama, fallbacks: [small]}
"""


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    return [str(p) for p in info.value.problems]


def test_a_backend_naming_an_unknown_provider_says_which_exist_and_guesses() -> None:
    (problem,) = _problems(BASE.replace("{provider: together,", "{provider: togther,"))
    assert "models.llama.backends[1].provider" in problem
    assert "did you mean 'together'" in problem and "defined: groq, together" in problem


def test_a_provider_replacing_authorization_needs_a_key() -> None:
    (problem,) = _problems(BASE.replace(", api_key: {env: TOGETHER_API_KEY}", ""))
    assert problem.startswith("providers.together") and "needs api_key" in problem


def test_keys_are_references_never_values_and_urls_must_be_https() -> None:
    problems = _problems(BASE.replace("{file: /etc/keys/groq/api-key}", '"gsk_abc"'))
    assert any("providers.groq.api_key" in p for p in problems)
    problems = _problems(BASE.replace("https://api.together.xyz/v1", "http://api.together.xyz/v1"))
    assert any("providers.together.base_url" in p for p in problems)


def test_a_store_url_with_a_password_is_refused() -> None:
    (problem,) = _problems(BASE + 'store: {url: "redis://:hunter2@redis:6379/0"}\n')
    assert problem.startswith("store.url") and "password" in problem
    assert "hunter2" not in problem


def test_a_backend_listed_twice_is_refused() -> None:
    text = BASE.replace(
        "      - {provider: together,",
        "      - {provider: groq, model: llama-3.3-70b-versatile}\n      - {provider: together,",
    )
    (problem,) = _problems(text)
    assert "listed twice" in problem


def test_providers_and_backends_load_with_their_defaults() -> None:
    policy = parse_policy(BASE)
    groq = policy.providers["groq"]
    assert (groq.host, groq.port, groq.path_prefix, groq.timeout) == ("api.groq.com", 443, "/openai/v1", 10.0)
    assert policy.providers["together"].api_key.env == "TOGETHER_API_KEY"
    assert [b.id for b in policy.models["llama"].backends] == [
        "groq/llama-3.3-70b-versatile",
        "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
    ]
    assert policy.fallback == FallbackSettings() and policy.store is None and policy.chains


@pytest.mark.parametrize(
    ("where", "cls", "durations"),
    [
        (("$defs", "provider"), Provider, ("timeout", "connect_timeout")),
        (
            ("properties", "fallback"),
            FallbackSettings,
            ("deadline", "cooldown", "max_cooldown", "base_ejection_time", "max_ejection_time"),
        ),
        (("properties", "store"), StoreSettings, ("timeout", "sync_interval")),
    ],
)
def test_schema_defaults_match_the_code(where: tuple[str, str], cls: type, durations: tuple[str, ...]) -> None:
    declared = schema()[where[0]][where[1]]["properties"]
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    checked = 0
    for name, spec in declared.items():
        if "default" not in spec:
            continue
        value = float(spec["default"][:-1]) if name in durations else spec["default"]
        assert defaults[name] == value, name
        checked += 1
    assert checked >= 2


def test_retry_after_reads_seconds_dates_and_milliseconds() -> None:
    assert retry_after({"retry-after": "7"}, 0) == 7
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}, 0) == 1.5
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 1445412470.0) == pytest.approx(10)
    assert retry_after({"retry-after": "soon"}, 0) is None
    assert retry_after({}, 0) is None


def test_a_429_cools_a_backend_down_for_its_retry_after_capped() -> None:
    now = [1000.0]
    health = BackendHealth(FallbackSettings(cooldown=30, max_cooldown=60), clock=lambda: now[0])
    assert health.observe("groq/x", Outcome.RATE_LIMITED, {"retry-after": "5"}) == COOLDOWN
    assert health.blocked("groq/x") == (COOLDOWN, 1005.0)
    health.observe("together/y", Outcome.RATE_LIMITED, {})
    assert health.blocked("together/y") == (COOLDOWN, 1030.0)  # no Retry-After: the configured cooldown
    health.observe("openai/z", Outcome.RATE_LIMITED, {"retry-after": "86400"})
    assert health.blocked("openai/z") == (COOLDOWN, 1060.0)  # a day is capped at max_cooldown
    now[0] = 1006.0
    assert health.blocked("groq/x") is None


def test_repeated_failures_eject_with_a_growing_backoff_and_a_success_resets_the_count() -> None:
    now = [0.0]
    health = BackendHealth(
        FallbackSettings(consecutive_failures=3, base_ejection_time=10, max_ejection_time=25), clock=lambda: now[0]
    )
    health.observe("b", Outcome.FAILURE)
    health.observe("b", Outcome.FAILURE)
    health.observe("b", Outcome.SUCCESS)
    health.observe("b", Outcome.FAILURE)
    assert health.blocked("b") is None
    health.observe("b", Outcome.FAILURE)
    assert health.observe("b", Outcome.FAILURE) == EJECTED
    assert health.blocked("b") == (EJECTED, 10.0)
    now[0] = 11.0
    for _ in range(3):
        health.observe("b", Outcome.FAILURE)
    assert health.blocked("b") == (EJECTED, 31.0)  # 2 x 10 s
    now[0] = 40.0
    for _ in range(3):
        health.observe("b", Outcome.FAILURE)
    assert health.blocked("b") == (EJECTED, 65.0)  # 3 x 10 s, capped at 25 s


def _router(text: str) -> Router:
    policy = parse_policy(text)
    return Router(RouterState(policy, Pools.build(policy, Discovery())))


def _route(router: Router, text: str = "a big question"):
    body = b'{"model": "auto", "messages": [{"role": "user", "content": "%s"}]}' % text.encode()
    return asyncio.run(router.route(Call("POST", "/v1/chat/completions", {}, body)))


def test_a_plan_is_the_models_backends_then_the_fallback_models_less_cooled_down_ones() -> None:
    router = _router(BASE)
    routed = _route(router)
    assert [a.cluster for a in routed.plan.attempts] == ["groq", "together", "small"]
    assert routed.cluster == "groq" and routed.upstream_model == "llama-3.3-70b-versatile"
    assert routed.body is not None and routed.body[slice(*routed.model_span)] == b'"llama-3.3-70b-versatile"'
    router.backends.observe("groq/llama-3.3-70b-versatile", Outcome.RATE_LIMITED, {"retry-after": "30"})
    routed = _route(router)
    assert [a.cluster for a in routed.plan.attempts] == ["together", "small"]
    assert dict(routed.plan.skipped) == {"groq/llama-3.3-70b-versatile": "cooldown"}
    assert routed.upstream_model == "meta-llama/Llama-3.3-70B-Instruct-Turbo"


def test_when_every_backend_cools_down_the_router_answers_429_with_retry_after() -> None:
    router = _router(BASE.replace("fallbacks: [small]", "fallbacks: []"))
    for backend in ("groq/llama-3.3-70b-versatile", "together/meta-llama/Llama-3.3-70B-Instruct-Turbo"):
        router.backends.observe(backend, Outcome.RATE_LIMITED, {"retry-after": "12"})
    from extproc.errors import RateLimited

    with pytest.raises(RateLimited) as info:
        _route(router)
    assert 11 <= info.value.retry_after <= 12 and info.value.status == 429


def test_max_attempts_caps_the_plan() -> None:
    router = _router(BASE + "fallback: {max_attempts: 2}\n")
    assert [a.cluster for a in _route(router).plan.attempts] == ["groq", "together"]


def test_a_policy_without_providers_or_retriable_fallbacks_renders_no_chains() -> None:
    text = """
default_model: small
models:
  small: {replicas: {static: ["10.0.0.1:8000"]}}
  large: {replicas: {static: ["10.0.0.2:8000"]}}
decisions:
  - {name: x, model: large, fallbacks: [small]}
"""
    policy = parse_policy(text)
    assert not policy.chains  # small is ORIGINAL_DST: it can only be a first attempt
    routed = _route(_router(text))
    assert routed.plan is None


def test_a_later_attempt_finds_the_model_in_a_body_serialized_again_that_names_model_twice() -> None:
    from extproc.request import Api, model_span, parse

    raw = b'{"metadata": {"model": "mine"}, "model": "auto", "messages": [{"role": "user", "content": "hi"}]}'
    parsed = parse(Api.CHAT, raw)
    body = orjson.dumps({**orjson.loads(raw), "model": "llama-3.3-70b-versatile"})  # as a redaction writes it
    assert body.count(b'"model"') == 2  # a nested key of the same name
    start, end = model_span(parsed, body, "llama-3.3-70b-versatile")
    assert body[start:end] == b'"llama-3.3-70b-versatile"'
    spliced = orjson.loads(body[:start] + b'"gpt-4o-mini"' + body[end:])
    assert (spliced["model"], spliced["metadata"]) == ("gpt-4o-mini", {"model": "mine"})


def test_a_providers_cluster_has_its_own_tls_timeouts_and_connection_limits() -> None:
    from extproc.envoy.options import EnvoyOptions
    from extproc.envoy.render.chains import provider_cluster

    text = BASE.replace(
        "api_key: {env: TOGETHER_API_KEY}}",
        "api_key: {env: TOGETHER_API_KEY}, ca_file: /etc/ca/together.pem, connect_timeout: 2s,"
        " max_connections: 7, max_pending_requests: 3, max_requests: 20}",
    )
    together = provider_cluster(parse_policy(text).providers["together"], EnvoyOptions())
    assert together["connect_timeout"] == "2s"
    (limits,) = together["circuit_breakers"]["thresholds"]
    assert (limits["max_connections"], limits["max_pending_requests"], limits["max_requests"]) == (7, 3, 20)
    tls = together["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.together.xyz"
    validation = tls["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": "/etc/ca/together.pem"}
    assert validation["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": "api.together.xyz"}}
    ]
    groq = provider_cluster(parse_policy(text).providers["groq"], EnvoyOptions())
    assert groq["connect_timeout"] == "5s" and groq["circuit_breakers"]["thresholds"][0]["max_connections"] == 1024
    assert groq["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]["trusted_ca"] == {
        "filename": EnvoyOptions().ca_file
    }


def test_replicas_at_capacity_give_way_to_the_next_backend_without_queueing() -> None:
    text = BASE.replace(
        "  small:\n    replicas:",
        '  local:\n    capacity: {max_inflight: 1}\n    replicas: {static: ["10.0.0.9:8000"], envoy: override_host}\n'
        "    backends: [replicas, {provider: groq, model: llama-3.1-8b-instant}]\n  small:\n    replicas:",
    ).replace("decisions:\n", "decisions:\n  - {name: local, when: {keyword: [local]}, model: local}\n")
    router = _router(text)
    routed = _route(router, "a local question")
    assert [a.label for a in routed.plan.attempts] == ["local replicas", "groq/llama-3.1-8b-instant"]
    assert routed.endpoints == ("10.0.0.9:8000",)
    # Now the one replica is full: the provider answers at once (no admission queue), and the
    # replicas are left out of this request's plan.
    routed = _route(router, "another local question")
    assert [a.label for a in routed.plan.attempts] == ["groq/llama-3.1-8b-instant"]
    assert dict(routed.plan.skipped) == {"local replicas": "full"}
    assert routed.cluster == "groq" and routed.upstream_model == "llama-3.1-8b-instant"


def test_chain_routes_keep_the_model_routes_timeouts() -> None:
    from extproc.envoy.options import EnvoyOptions
    from extproc.envoy.render.bootstrap import render

    config = render(parse_policy(BASE), EnvoyOptions(upstream_timeout="900s"))
    listeners = config["static_resources"]["listeners"]
    (manager,) = [
        f["typed_config"]
        for lst in listeners
        for c in lst["filter_chains"]
        for f in c["filters"]
        if "route_config" in f.get("typed_config", {})
    ]
    routes = [r for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"] if "route" in r]
    chains = [r for r in routes if r["name"].startswith("llm-chain-")]
    assert chains and all((r["route"]["timeout"], r["route"]["idle_timeout"]) == ("900s", "900s") for r in chains)
    assert all(r["per_request_buffer_limit_bytes"] == EnvoyOptions().max_response_bytes for r in chains)


def test_a_chained_cache_miss_has_a_route_that_stores_its_answer() -> None:
    from extproc.envoy.options import EnvoyOptions
    from extproc.envoy.render.bootstrap import render

    text = BASE.replace("model: llama, fallbacks: [small]}", "model: llama, fallbacks: [small], cache: {}}")
    config = render(parse_policy(text), EnvoyOptions())
    listeners = config["static_resources"]["listeners"]
    (manager,) = [
        f["typed_config"]
        for lst in listeners
        for c in lst["filter_chains"]
        for f in c["filters"]
        if "route_config" in f.get("typed_config", {})
    ]
    names = [r["name"] for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"]]
    chained = [n for n in names if n.startswith("llm-chain-")]
    assert chained and all(f"{n}-cache-store" in names for n in chained if not n.endswith("-cache-store"))


def test_the_happy_path_reuses_the_chains_plan_and_a_cooldown_gets_its_own() -> None:
    router = _router(BASE)
    first, second = _route(router), _route(router)
    assert first.plan is second.plan  # built once with the policy, shared by its requests
    router.backends.observe("groq/llama-3.3-70b-versatile", Outcome.RATE_LIMITED, {"retry-after": "30"})
    cooled = _route(router)
    assert cooled.plan is not first.plan and [a.cluster for a in cooled.plan.attempts] == ["together", "small"]
    # The attempts it keeps are the chain's own objects: its metadata is cached by their identity.
    assert cooled.plan.attempts == first.plan.attempts[1:]
    assert cooled.plan.fixed_metadata() is _route(router).plan.fixed_metadata()


def test_a_reload_builds_new_chains() -> None:
    router = _router(BASE)
    before = _route(router).plan
    router.swap(
        RouterState(parse_policy(BASE + "fallback: {max_attempts: 2}\n"), Pools.build(parse_policy(BASE), Discovery()))
    )
    after = _route(router).plan
    assert [a.cluster for a in after.attempts] == ["groq", "together"] and before is not after


def test_a_chained_requests_metadata_is_the_plans_and_its_own_span_and_deadline() -> None:
    from google.protobuf import json_format

    from extproc import headers as h
    from extproc import protocol
    from extproc.envoy.render.chains import CHAIN_NAMESPACE
    from extproc.fallback import request_metadata

    routed = _route(_router(BASE))
    per_request = request_metadata(routed.model_span, 60.0)
    response = protocol.body_response(
        protocol.EMPTY_MUTATION,
        routed.body,
        {h.METADATA_NAMESPACE: {h.KEY_MODEL: "llama", **per_request}},
        routed.plan.fixed_metadata(),
    )
    meta = json_format.MessageToDict(response.dynamic_metadata)
    groups = meta[CHAIN_NAMESPACE]["priority_groups"]
    assert [g["clusters"][0]["cluster_name"] for g in groups] == ["groq", "together", "small"]
    ours = meta[h.METADATA_NAMESPACE]
    assert ours[h.KEY_MODEL] == "llama" and ours[h.KEY_RETRIES] == "2"  # the plan's fields and the request's
    assert ours[h.KEY_FIRST_BACKEND] == "groq/llama-3.3-70b-versatile"
    assert ours[h.KEY_LABELS] == [
        "groq/llama-3.3-70b-versatile",
        "together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "small replicas",
    ]
    start, end = map(int, ours[h.KEY_MODEL_SPAN].split(":"))
    assert routed.body[start:end] == b'"llama-3.3-70b-versatile"'
    assert orjson.loads(ours[h.KEY_PLAN][1]) == "meta-llama/Llama-3.3-70B-Instruct-Turbo"


def test_recent_plans_keep_a_plan_for_half_their_age_and_stay_bounded() -> None:
    from extproc.fallback import Plan, RecentPlans

    now = [0.0]
    plans = RecentPlans(capacity=8, max_age=10.0, clock=lambda: now[0])
    plan = Plan(())
    plans.remember("a", plan)
    now[0] = 4.9
    assert plans.get("a") is plan
    now[0] = 5.1  # one rotation: still there
    assert plans.get("a") is plan
    now[0] = 10.2  # a second: gone
    assert plans.get("a") is None
    for i in range(100):
        plans.remember(str(i), plan)
    assert len(plans) <= 8 and plans.get("99") is plan
    plans.remember("", plan)  # no request id: nothing to find it by
    assert plans.get("") is None
