"""The semantic cache end to end through a real Envoy: a paraphrase answered by the sidecar (JSON
and SSE), the upstream asked once, the scope (tenant, system prompt, model) kept apart, errors and
cut streams never stored, and two sidecars sharing answers through a real redis-server."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack, free_port, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
debug: {explain: true}
cache: {tenant_header: x-tenant}
models:
  small:
    upstream_model: small-8b
    pricing: {input_per_million: 1.0, output_per_million: 2.0}
    replicas: {static: ["$s1"], envoy: original_dst}
  broken:
    upstream_model: broken-8b
    replicas: {static: ["$b1"], envoy: original_dst}
  cut:
    upstream_model: cut-8b
    replicas: {static: ["$c1"], envoy: original_dst}
decisions:
  - name: broken
    when: {keyword: ["outage"]}
    model: broken
    cache: true
  - name: cut
    when: {keyword: ["interrupted"]}
    model: cut
    cache: true
  - name: sampled
    when: {keyword: ["poem"]}
    model: small
    cache: {sampled: true}
  - name: faq
    model: small
    cache: true
"""

QUESTION = "How do I reset my account password?"
PARAPHRASE = "How can I reset the password of my account?"


def ask(text: str, *, system: str | None = None, stream: bool = False, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    body = {"model": "auto", "messages": messages, "temperature": 0, **extra}
    if stream:
        body["stream"] = True
    return body


def events(body: bytes) -> list:
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("cache")
    replicas = [StandIn(name="s1"), StandIn(name="b1", status=500), StandIn(name="c1", fault="cut")]
    with Stack(tmp, POLICY, replicas) as s:
        yield s


def served(stack: Stack, name: str) -> int:
    return sum(1 for r in stack.fleet[name].received if r.path.startswith("/v1/"))


def stores(stack: Stack) -> float:
    text = stack.metrics_text()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("extproc_cache_stores_total{")
    )


def test_a_paraphrase_is_answered_from_the_cache_and_the_upstream_sees_one_request(cached: Stack) -> None:
    tenant = {"x-tenant": "acme"}
    before, stored = served(cached, "s1"), stores(cached)
    first = cached.post(ask(QUESTION), headers=tenant)
    assert first.status == 200, first.body
    assert first.headers.get("x-cache") == "miss"
    wait_for(lambda: stores(cached) > stored)
    again = cached.post(ask(PARAPHRASE), headers={**tenant, "x-router-debug": "true"})
    assert again.status == 200, again.body
    assert again.headers.get("x-cache") == "hit"
    assert served(cached, "s1") == before + 1
    body = again.json()
    assert body["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] == first.json()["usage"]["completion_tokens"]
    explain = orjson.loads(again.headers["x-router-explain"])
    assert explain["cache"]["result"] == "hit"
    assert explain["cache"]["similarity"] >= explain["cache"]["threshold"]
    assert again.headers["x-router-model"] == "small"

    streamed = cached.post(ask(PARAPHRASE, stream=True, stream_options={"include_usage": True}), headers=tenant)
    assert streamed.status == 200
    assert streamed.headers.get("x-cache") == "hit"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    got = events(streamed.body)
    assert got[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in got[:-1] if e["choices"])
    assert text == first.json()["choices"][0]["message"]["content"]
    assert got[-2]["usage"]["completion_tokens"] == usage["completion_tokens"]
    assert served(cached, "s1") == before + 1


def test_another_tenant_a_changed_system_prompt_or_sampling_miss(cached: Stack) -> None:
    tenant = {"x-tenant": "globex"}
    stored = stores(cached)
    cached.post(ask("What are your opening hours on Sunday?"), headers=tenant)
    wait_for(lambda: stores(cached) > stored)
    before = served(cached, "s1")
    other = cached.post(ask("What are your opening hours on Sunday?"), headers={"x-tenant": "initech"})
    assert other.headers.get("x-cache") == "miss"
    system = cached.post(ask("What are your opening hours on Sunday?", system="Answer in French."), headers=tenant)
    assert system.headers.get("x-cache") == "miss"
    hot = cached.post(ask("What are your opening hours on Sunday?", temperature=0.7), headers=tenant)
    assert "x-cache" not in hot.headers  # sampled, and the decision did not opt in: not looked up
    untenanted = cached.post(ask("What are your opening hours on Sunday?"))
    assert "x-cache" not in untenanted.headers
    assert served(cached, "s1") == before + 4
    same = cached.post(ask("What are your opening hours on Sunday?"), headers=tenant)
    assert same.headers.get("x-cache") == "hit"


def test_a_streamed_answer_is_stored_and_served_as_json_too(cached: Stack) -> None:
    tenant = {"x-tenant": "stream-co"}
    stored = stores(cached)
    first = cached.post(ask("Explain what a mutex is.", stream=True), headers=tenant)
    assert first.status == 200 and first.headers.get("x-cache") == "miss"
    streamed_text = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events(first.body)[:-1] if e["choices"]
    )
    wait_for(lambda: stores(cached) > stored)
    hit = cached.post(ask("Please explain what a mutex is."), headers=tenant)
    assert hit.headers.get("x-cache") == "hit"
    assert hit.json()["choices"][0]["message"]["content"] == streamed_text


def test_upstream_errors_and_cut_streams_are_not_stored(cached: Stack) -> None:
    tenant = {"x-tenant": "acme"}
    for _ in range(2):
        failed = cached.post(ask("Is there an outage right now?"), headers=tenant)
        assert failed.status == 500
    assert served(cached, "b1") == 2
    for _ in range(2):
        with contextlib.suppress(Exception):
            cached.post(ask("Why was my download interrupted?", stream=True), headers=tenant)
    wait_for(lambda: served(cached, "c1") == 2)
    assert 'extproc_cache_not_stored_total{reason="status"}' in cached.metrics_text()
    # A cut stream's mirror ends when Envoy closes it (observability mode defers that by 5 s).
    wait_for(lambda: 'extproc_cache_not_stored_total{reason="truncated"} 2.0' in cached.metrics_text())
    with contextlib.suppress(Exception):
        cached.post(ask("Why was my download interrupted?", stream=True), headers=tenant)
    assert served(cached, "c1") == 3
    assert cached.post(ask("Is there an outage right now?"), headers=tenant).status == 500
    assert served(cached, "b1") == 3


def test_requests_with_personal_data_are_never_cached(cached: Stack) -> None:
    tenant = {"x-tenant": "acme", "x-router-debug": "true"}
    question = ask("My SSN is 460-89-9847, can you check my tax status?")
    before = served(cached, "s1")
    for _ in range(2):
        answer = cached.post(question, headers=tenant)
        assert answer.status == 200 and "x-cache" not in answer.headers
        assert orjson.loads(answer.headers["x-router-explain"])["cache"] == {"result": "skipped", "reason": "pii"}
    assert served(cached, "s1") == before + 2


def test_a_decision_may_opt_in_to_sampled_requests(cached: Stack) -> None:
    tenant = {"x-tenant": "poets"}
    stored = stores(cached)
    first = cached.post(ask("Write a poem about the sea.", temperature=1), headers=tenant)
    assert first.headers.get("x-cache") == "miss"
    wait_for(lambda: stores(cached) > stored)
    assert cached.post(ask("Write a poem about the sea.", temperature=1), headers=tenant).headers["x-cache"] == "hit"


def test_requests_that_may_not_be_stored_open_no_mirror_stream(cached: Stack) -> None:
    """The non-caching path is Envoy's as before: the cache mirror filter sends nothing."""
    started = "http.llm.ext_proc.cache_mirror.streams_started"
    before = cached.envoy.stats(started)[started]
    assert cached.post(ask("Tell me about the sea.", temperature=1), headers={"x-tenant": "a"}).status == 200
    assert cached.post(ask("Is there an outage?"), headers={}).status == 500  # no tenant: not cached
    assert cached.envoy.stats(started)[started] == before
    assert cached.post(ask("A question to store, please."), headers={"x-tenant": "a"}).status == 200
    wait_for(lambda: cached.envoy.stats(started)[started] == before + 1)


# --- two sidecars, one Redis ----------------------------------------------------------------------


@pytest.fixture
def redis_url(tmp_path: Path):
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        wait_for(lambda: _pings(client), timeout=10)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


SHARED = """
version: 1
default_model: small
cache: {backend: redis, redis_url: "$redis"}
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1"], envoy: original_dst}
decisions:
  - name: faq
    model: small
    cache: true
"""


def test_two_sidecars_share_answers_through_redis(tmp_path: Path, redis_url: str) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    subs = {"redis": redis_url}
    with (
        Stack(one, SHARED, [StandIn(name="s1")], substitutions=subs) as a,
        Stack(two, SHARED, [StandIn(name="s1")], substitutions=subs) as b,
    ):
        first = a.post(ask(QUESTION))
        assert first.headers.get("x-cache") == "miss"
        wait_for(lambda: b.sidecar.run(lambda: b.sidecar.router.cache.entries) >= 1)
        hit = b.post(ask(PARAPHRASE))
        assert hit.headers.get("x-cache") == "hit"
        assert hit.json()["choices"][0]["message"]["content"] == "answer from s1"
        assert served(b, "s1") == 0 and served(a, "s1") == 1
        # The invalidation command, sent to one sidecar, reaches both: the next ask goes upstream.
        command = [sys.executable, "-m", "extproc.cli", "cache", "invalidate", "--uds", a.uds, "--model", "small"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "dropped 1 stored answers (model 'small')" in done.stdout
        wait_for(lambda: b.sidecar.run(lambda: b.sidecar.router.cache.entries) == 0)
        time.sleep(0.05)
        assert b.post(ask(PARAPHRASE)).headers.get("x-cache") == "miss"
        assert served(b, "s1") == 1
