"""The router's answer is built once, from the state the request started with, and never
changed: a reload while a request is routed does not reach into that request."""

from __future__ import annotations

import asyncio
import dataclasses

import orjson
import pytest

from extproc.policy import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState
from extproc.server import Exchange

POLICY = """
version: 1
default_model: small
headers: {cluster: %s}
models:
  small: {replicas: {static: ["10.0.0.1:8000", "10.0.0.2:8000"]}}
"""
BODY = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hello"}]})


def _router(header: str) -> Router:
    policy = parse_policy(POLICY % header)
    return Router(RouterState(policy, Pools.build(policy, Discovery())))


def test_the_answer_is_immutable() -> None:
    routed = asyncio.run(_router("x-a").route(Call("POST", "/v1/chat/completions", {}, BODY)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        routed.model = "other"  # type: ignore[misc]
    assert routed.endpoints and routed.lease is not None and routed.cluster_header == "x-a"


def test_a_reload_after_routing_does_not_change_the_requests_headers() -> None:
    router = _router("x-a")
    exchange = Exchange(router)
    exchange.saw_headers = True  # two round trips: the decision goes back as header mutations
    routed = asyncio.run(router.route(Call("POST", "/v1/chat/completions", {}, BODY)))
    newer = parse_policy(POLICY % "x-b")
    router.swap(router.build_state(newer))  # the policy renames the cluster header meanwhile
    response = exchange._mutations(routed)
    names = [h.header.key for h in response.request_body.response.header_mutation.set_headers]
    assert "x-a" in names and "x-b" not in names
    routed_after = asyncio.run(router.route(Call("POST", "/v1/chat/completions", {}, BODY)))
    assert routed_after.cluster_header == "x-b"  # the next request has the new policy's


def test_a_request_picks_with_the_picker_of_the_policy_it_started_with() -> None:
    router = _router("x-a")
    state = router.state
    router.swap(router.build_state(parse_policy(POLICY % "x-b")))
    assert state.picker is not None and router.state.picker is not None
    assert state.picker is not router.state.picker  # each state keeps its own
