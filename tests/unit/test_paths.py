"""Which paths the router treats as LLM calls, and that this agrees with Envoy's route regexes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.bootstrap import render
from extproc.envoy.render.routes import lookalike_regex
from extproc.policy.load import parse_policy
from extproc.request import API_PATHS, api_for_path, looks_like_llm_path

POLICY = parse_policy("version: 1\ndefault_model: m\nmodels:\n  m: {replicas: {static: ['10.0.0.1:80']}}\n")
ROUTES = {
    r["name"]: r
    for r in render(POLICY, EnvoyOptions())["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
}


def envoy_regex(route: str) -> re.Pattern[str]:
    # RE2 and Python agree on this subset (groups, alternation, escapes, (?i)).
    return re.compile(ROUTES[route]["match"]["safe_regex"]["regex"])


@pytest.mark.parametrize(
    "path",
    [
        "/V1/chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions;x=1",
        "/v1/%63hat/completions",
        "/v1/%2563hat/completions",
        "/v1//chat/completions",
        "//v1/completions",
        "/v1/./responses",
        "/v1/x/../chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1\\chat\\completions",
        "/v1/chat/completions%00",
        "/v1/chat/completions%20",
        "/v1/chat/completions#x",
        "/v1/chat/completions%3Fx=1",
        "/v1/chat;p/completions",
        "/v1/responses/resp_1",
    ],
)
def test_lookalike_paths_are_recognised_so_the_router_refuses_them(path: str) -> None:
    assert api_for_path(path) is None
    assert looks_like_llm_path(path)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/embeddings", "/", "", "*", "/v1/chat", "/v2/chat/completions"])
def test_other_paths_are_not_llm_calls(path: str) -> None:
    assert api_for_path(path) is None and not looks_like_llm_path(path)


@pytest.mark.parametrize("path", [*API_PATHS, "/v1/chat/completions?stream=true"])
def test_exact_paths_are_calls_not_lookalikes(path: str) -> None:
    assert api_for_path(path) is not None and not looks_like_llm_path(path)


PATHS = st.one_of(
    st.sampled_from(sorted(API_PATHS)),
    st.text(st.sampled_from("/v1chatcompletionsresponsesCV%2F3.;?#x\\ "), max_size=30),
).flatmap(lambda p: st.tuples(st.just(p), st.sampled_from(["", "?a=1", "/", ";x", "X"])).map("".join))


@given(PATHS)
def test_envoy_sends_the_router_exactly_the_paths_it_calls_llm_paths(path: str) -> None:
    """Envoy matches a route's safe_regex against the path without its query, after
    normalising; the router reads the same path. They agree on what an LLM call is, and
    anything Envoy's variant route refuses the router would refuse too."""
    bare = path.split("?", 1)[0]
    exact = envoy_regex("llm-no-decision").fullmatch(bare) is not None
    assert exact == (api_for_path(path) is not None)
    if not exact and envoy_regex("llm-path-variant").fullmatch(bare):
        assert looks_like_llm_path(path)


def test_the_variant_regex_is_the_one_envoy_is_given() -> None:
    assert ROUTES["llm-path-variant"]["match"]["safe_regex"]["regex"] == lookalike_regex(sorted(API_PATHS))
