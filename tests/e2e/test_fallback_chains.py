"""Fallback chains through the real Envoy: three stand-in providers over TLS (a CA made for the
test), Groq -> Together -> OpenAI as the README's worked policy, a pool of the router's own
replicas before and after providers, a decision's fallback model after its model's chain, and
what each one received."""

from __future__ import annotations

import http.client
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat, free_port, wait_for
from tests.providers import Provider, make_ca

pytestmark = pytest.mark.e2e

HOSTS = {"groq": "api.groq.test", "together": "api.together.test", "openai": "api.openai.test"}
KEYS = {"groq": "gsk_groq_SECRET_1f9a", "together": "tgp_together_SECRET_77c2", "openai": "sk-openai-SECRET-0b3e"}
MODELS = {
    "groq": "llama-3.3-70b-versatile",
    "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "openai": "gpt-4o-mini",
}
BACKENDS = {name: f"{name}/{model}" for name, model in MODELS.items()}  # as x-router-backend names them

POLICY = """
version: 1
default_model: llama-70b
debug: {explain: true}
fallback: {max_attempts: 4, deadline: 30s, cooldown: 30s}
providers:
  groq:
    base_url: https://api.groq.test/openai/v1
    address: ${groq_address}
    ca_file: ${ca}
    api_key: {file: ${keys}/groq/api-key}
    timeout: 1s
  together:
    base_url: https://api.together.test/v1
    address: ${together_address}
    ca_file: ${ca}
    api_key: {env: EXTPROC_TEST_TOGETHER_KEY}
  openai:
    base_url: https://api.openai.test/v1
    address: ${openai_address}
    ca_file: ${ca}
    api_key: {file: ${keys}/openai/api-key}
models:
  llama-70b:
    backends:
      - {provider: groq, model: llama-3.3-70b-versatile}
      - {provider: together, model: meta-llama/Llama-3.3-70B-Instruct-Turbo}
      - {provider: openai, model: gpt-4o-mini}
  small:                    # the decision's fallback model: the router's own replicas, after the chain
    upstream_model: llama-3.1-8b-instruct
    replicas: {static: ["${local}"], envoy: override_host}
  local-first:              # the router's own replicas first (ORIGINAL_DST), a provider after them
    upstream_model: qwen-2.5-7b-instruct
    replicas: {static: ["${local}"]}
    backends:
      - replicas
      - {provider: openai, model: gpt-4.1-nano}
decisions:
  - {name: code, when: {keyword: {any: [traceback]}}, model: llama-70b, fallbacks: [small]}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, Provider]]]:
    workdir = tmp_path_factory.mktemp("chains")
    ca, certs = make_ca(workdir / "pki", list(HOSTS.values()))
    providers = {name: Provider(host, *certs[host]).start() for name, host in HOSTS.items()}
    keys = workdir / "keys"
    for name in ("groq", "openai"):
        (keys / name).mkdir(parents=True)
        (keys / name / "api-key").write_text(KEYS[name])
    mp = pytest.MonkeyPatch()
    mp.setenv("EXTPROC_TEST_TOGETHER_KEY", KEYS["together"])  # Envoy inherits it, as from a Secret
    substitutions = {f"{n}_address": p.address for n, p in providers.items()}
    substitutions.update(ca=str(ca), keys=str(keys))
    stack = Stack(workdir, POLICY, [StandIn(name="local")], substitutions=substitutions, envoy_log_level="debug")
    with stack:
        yield stack, providers
    mp.undo()
    for provider in providers.values():
        provider.stop()


@pytest.fixture
def fresh(world: tuple[Stack, dict[str, Provider]]) -> Iterator[tuple[Stack, dict[str, Provider]]]:
    stack, providers = world
    for provider in providers.values():
        provider.mode, provider.retry_after = "ok", None
        provider.received.clear()
    local = stack.fleet["local"]
    local.status = 200
    local.received.clear()
    stack.sidecar.run(lambda: stack.sidecar.router.backends._states.clear())
    yield stack, providers


def _body() -> bytes:
    # Odd spacing and key order: every byte but the model must reach each provider as sent.
    return b'{"messages": [{"role": "user", "content": "say \\"model\\": hi"}],  "model":"auto", "temperature": 0.5}'


def _expected(model: str) -> bytes:
    return _body().replace(b'"model":"auto"', b'"model":' + orjson.dumps(model))


def test_the_first_provider_gets_its_model_its_key_its_sni_and_path(fresh) -> None:
    stack, providers = fresh
    response = stack.post(_body(), headers={"authorization": "Bearer client-own-key"})
    assert response.status == 200, response.body
    assert response.headers["x-router-backend"] == BACKENDS["groq"]
    assert response.headers["x-router-attempts"] == "1"
    (got,) = providers["groq"].received
    assert (got.sni, got.host, got.path) == ("api.groq.test", "api.groq.test", "/openai/v1/chat/completions")
    assert got.authorization == f"Bearer {KEYS['groq']}"  # the client's own never reaches a provider
    assert got.body == _expected(MODELS["groq"])
    assert not providers["together"].received and not providers["openai"].received


def test_429_falls_back_to_the_next_provider_with_its_model_and_key(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode, providers["groq"].retry_after = "429", "3"
    response = stack.post(_body(), headers={"authorization": "Bearer client-own-key"})
    assert response.status == 200, response.body
    assert response.json()["choices"][0]["message"]["content"] == "hello from api.together.test"
    assert (response.headers["x-router-backend"], response.headers["x-router-attempts"]) == (BACKENDS["together"], "2")
    (tried,) = providers["groq"].received
    (got,) = providers["together"].received
    assert tried.model == MODELS["groq"] and tried.authorization == f"Bearer {KEYS['groq']}"
    assert got.body == _expected(MODELS["together"])
    assert (got.sni, got.host, got.path) == ("api.together.test", "api.together.test", "/v1/chat/completions")
    assert got.authorization == f"Bearer {KEYS['together']}"
    assert got.headers["content-length"] == str(len(got.body))


def test_retry_after_keeps_a_rate_limited_provider_out_until_it_passes(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode, providers["groq"].retry_after = "429", "2"
    assert stack.post(chat("one")).status == 200
    blocked = wait_for(lambda: stack.sidecar.run(lambda: stack.sidecar.router.backends.current()))
    assert blocked == {"groq/llama-3.3-70b-versatile": "cooldown"}
    providers["groq"].mode = "ok"
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        response = stack.post(chat("while it cools down"))
        assert response.headers["x-router-backend"] == BACKENDS["together"]
        assert response.headers["x-router-attempts"] == "1"  # groq is not even tried
        time.sleep(0.1)
    assert len(providers["groq"].received) == 1
    gauge = f'extproc_backends_blocked{{backend="{BACKENDS["groq"]}",reason="cooldown"}} 1.0'
    assert gauge in stack.metrics_text()
    time.sleep(max(0.0, 2.2 - (time.monotonic() - started)))
    assert stack.post(chat("after")).headers["x-router-backend"] == BACKENDS["groq"]
    assert gauge not in stack.metrics_text()


def test_a_provider_failing_repeatedly_is_ejected_and_not_tried(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode = "500"
    for i in range(3):  # fallback.consecutive_failures
        response = stack.post(chat(f"try {i}"))
        assert (response.status, response.headers["x-router-backend"]) == (200, BACKENDS["together"])
    blocked = wait_for(lambda: stack.sidecar.run(lambda: stack.sidecar.router.backends.current()))
    assert blocked == {BACKENDS["groq"]: "ejected"}
    providers["groq"].mode = "ok"
    response = stack.post(chat("after"))
    assert (response.headers["x-router-backend"], response.headers["x-router-attempts"]) == (BACKENDS["together"], "1")
    assert len(providers["groq"].received) == 3
    text = stack.metrics_text()
    assert f'extproc_backends_blocked{{backend="{BACKENDS["groq"]}",reason="ejected"}} 1.0' in text
    assert f'extproc_backend_cooldowns_total{{backend="{BACKENDS["groq"]}",reason="ejected"}} 1.0' in text


def test_500_falls_back_and_a_hung_provider_is_left_after_its_timeout(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode = "500"
    response = stack.post(chat("x"))
    assert (response.status, response.headers["x-router-backend"]) == (200, BACKENDS["together"])
    providers["groq"].mode, providers["groq"].hang = "hang", 5.0
    providers["together"].mode = "500"
    started = time.monotonic()
    response = stack.post(chat("y"))
    took = time.monotonic() - started
    assert (response.status, response.headers["x-router-backend"], response.headers["x-router-attempts"]) == (
        200,
        BACKENDS["openai"],
        "3",
    )
    assert 1.0 <= took < 4.0  # groq's 1 s per-try timeout, not its 5 s hang
    assert providers["openai"].received[-1].model == MODELS["openai"]
    assert providers["openai"].received[-1].authorization == f"Bearer {KEYS['openai']}"


def test_every_provider_failing_is_one_openai_error_naming_no_secret(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode = "500"
    providers["together"].mode, providers["together"].retry_after = "429", "1"
    providers["openai"].mode = "500"
    response = stack.post(chat("x"))
    assert response.status == 500
    error = response.json()["error"]
    assert error["code"] == "all_backends_failed"
    assert set(error) == {"message", "type", "param", "code"}
    assert "groq/llama-3.3-70b-versatile" in error["message"] and "openai/gpt-4o-mini" in error["message"]
    assert response.headers["x-router-attempts"] == "3"
    assert not any(key in response.body.decode() for key in KEYS.values())
    assert [len(p.received) for p in providers.values()] == [1, 1, 1]


def test_a_stream_that_breaks_after_its_first_bytes_is_not_retried(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode = "stream_break"
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=orjson.dumps(chat("x", stream=True)))
    response = connection.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()
    time.sleep(0.3)
    assert len(providers["groq"].received) == 1
    assert not providers["together"].received and not providers["openai"].received


def test_all_providers_cooling_down_is_a_429_with_retry_after(fresh) -> None:
    stack, providers = fresh
    for provider in providers.values():
        provider.mode, provider.retry_after = "429", "5"
    first = stack.post(chat("x"))
    assert first.status == 429 and first.json()["error"]["code"] == "all_backends_rate_limited"
    wait_for(lambda: len(stack.sidecar.run(lambda: stack.sidecar.router.backends.current())) == 3)
    response = stack.post(chat("again"))
    assert response.status == 429
    assert response.json()["error"]["code"] == "all_backends_cooling_down"
    assert 1 <= int(response.headers["retry-after"]) <= 5
    assert [len(p.received) for p in providers.values()] == [1, 1, 1]  # nothing more was sent


def test_fallback_metrics_count_attempts_and_reasons(fresh) -> None:
    stack, providers = fresh
    providers["groq"].mode = "500"
    assert stack.post(chat("x")).status == 200

    def counted() -> bool:
        text = stack.metrics_text()
        return 'extproc_fallbacks_total{model="llama-70b",reason="5xx"}' in text and (
            'extproc_backend_attempts_total{backend="together/meta-llama/Llama-3.3-70B-Instruct-Turbo",'
            'model="llama-70b",result="success"}' in text
        )

    wait_for(counted)
    assert "extproc_chain_attempts_bucket" in stack.metrics_text()


def test_no_output_of_a_run_contains_an_api_key(fresh, caplog: pytest.LogCaptureFixture) -> None:
    stack, providers = fresh
    caplog.set_level(logging.DEBUG)
    providers["groq"].mode = "429"
    outputs = [stack.post(chat("a"), headers={"x-router-debug": "true"})]
    providers["together"].mode = "500"
    providers["openai"].mode = "500"
    outputs.append(stack.post(chat("b"), headers={"x-router-debug": "true"}))
    providers["openai"].mode = "ok"
    outputs.append(stack.post(chat("c"), headers={"x-router-debug": "true"}))
    assert any("x-router-explain" in r.headers for r in outputs)
    time.sleep(0.3)
    texts = {f"response {i}": f"{r.headers}{r.body!r}" for i, r in enumerate(outputs)}
    texts["metrics"] = stack.metrics_text()
    texts["sidecar log"] = caplog.text
    texts["envoy log (debug)"] = Path(stack.envoy.log_path).read_text(errors="replace")
    for path in Path(stack.xds_dir).rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    texts["envoy-config"] = orjson.dumps(stack.envoy_config).decode()
    for path in ("/config_dump?include_eds", "/stats", "/clusters", "/certs"):
        texts[f"envoy admin {path}"] = _admin(stack, path)
    for name, text in texts.items():
        for provider, key in KEYS.items():
            assert key not in text, f"{provider}'s key appears in {name}"
    assert "debug" in texts["envoy log (debug)"]  # the log was at debug level


def test_a_decisions_fallback_model_comes_after_its_models_whole_chain(fresh) -> None:
    stack, providers = fresh
    for provider in providers.values():
        provider.mode = "500"
    body = b'{"model":"auto",  "messages": [{"role": "user", "content": "a traceback: boom"}]}'
    response = stack.post(body, headers={"authorization": "Bearer client-own-key"})
    assert response.status == 200, response.body
    assert response.headers["x-router-attempts"] == "4"
    assert response.headers["x-router-backend"] == "small replicas"
    assert [len(p.received) for p in providers.values()] == [1, 1, 1]
    assert [p.received[0].model for p in providers.values()] == list(MODELS.values())
    (got,) = stack.fleet["local"].received
    assert got.path == "/v1/chat/completions"
    assert got.body == body.replace(b'"model":"auto"', b'"model":"llama-3.1-8b-instruct"')
    # The client's key was replaced for the providers: the replica after them gets none, and
    # certainly not the last provider's.
    assert "authorization" not in got.headers
    # Its tokens (and cost) count for the model that answered, not the one decided.
    wait_for(lambda: 'extproc_tokens_total{kind="input",model="small"}' in stack.metrics_text())


def test_the_routers_own_replicas_first_then_a_provider(fresh) -> None:
    stack, providers = fresh
    body = b'{"model": "local-first", "messages": [{"role": "user", "content": "hi"}]}'
    client = {"authorization": "Bearer client-own-key"}
    response = stack.post(body, headers=client)
    assert response.status == 200, response.body
    assert (response.headers["x-router-backend"], response.headers["x-router-attempts"]) == (
        "local-first replicas",
        "1",
    )
    (got,) = stack.fleet["local"].received
    assert got.body == body.replace(b'"local-first"', b'"qwen-2.5-7b-instruct"')
    assert got.headers["authorization"] == "Bearer client-own-key"  # the router's own replicas: forwarded

    stack.fleet["local"].status = 503
    response = stack.post(body, headers=client)
    assert response.status == 200, response.body
    assert (response.headers["x-router-backend"], response.headers["x-router-attempts"]) == ("openai/gpt-4.1-nano", "2")
    (got,) = providers["openai"].received
    assert got.body == body.replace(b'"local-first"', b'"gpt-4.1-nano"')
    assert got.authorization == f"Bearer {KEYS['openai']}"
    assert got.path == "/v1/chat/completions" and got.sni == "api.openai.test"


def test_no_new_attempt_starts_after_the_fallback_deadline(world, tmp_path: Path) -> None:
    stack, providers = world
    for provider in providers.values():
        provider.mode, provider.retry_after = "ok", None
        provider.received.clear()
    providers["groq"].mode, providers["groq"].hang = "hang", 3.0
    policy = POLICY.replace("deadline: 30s", "deadline: 0.5s")
    with Stack(tmp_path, policy, [StandIn(name="local")], substitutions=stack.substitutions) as short:
        started = time.monotonic()
        response = short.post(chat("x"))
        took = time.monotonic() - started
    providers["groq"].mode = "ok"
    assert response.status == 504, (
        response.headers,
        response.body,
        [len(p.received) for p in providers.values()],
        took,
    )
    assert response.json()["error"]["code"] == "fallback_deadline"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert 1.0 <= took < 2.9  # groq's 1 s per-try timeout, then no second attempt
    assert len(providers["groq"].received) == 1
    assert not providers["together"].received and not providers["openai"].received


def test_a_provider_refusing_connections_falls_back_to_the_next(world, tmp_path: Path) -> None:
    stack, providers = world
    for provider in providers.values():
        provider.mode, provider.retry_after = "ok", None
        provider.received.clear()
    closed = {**stack.substitutions, "groq_address": f"127.0.0.1:{free_port()}"}  # nothing listens there
    with Stack(tmp_path, POLICY, [StandIn(name="local")], substitutions=closed) as refused:
        response = refused.post(chat("x"))
        assert response.status == 200, response.body
        assert (response.headers["x-router-backend"], response.headers["x-router-attempts"]) == (
            BACKENDS["together"],
            "2",
        )
        (got,) = providers["together"].received
        assert got.model == MODELS["together"] and got.authorization == f"Bearer {KEYS['together']}"
        wait_for(
            lambda: 'extproc_fallbacks_total{model="llama-70b",reason="connect_failure"}' in refused.metrics_text()
        )


def _admin(stack: Stack, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.envoy.admin_port}{path}", timeout=10) as r:
        return r.read().decode(errors="replace")


def _cli(*args: str, stdin: bytes | None = None) -> str:
    """``extproc ARGS`` in a process of its own, with Together's key in its environment (as
    Envoy's container has it): stdout and stderr together."""
    env = {**os.environ, "EXTPROC_TEST_TOGETHER_KEY": KEYS["together"]}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "extproc"), *args], input=stdin, capture_output=True, env=env, timeout=120
    )
    return done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")


def test_the_command_line_shows_no_api_key(world) -> None:
    stack, _ = world
    policy = str(stack.config_path)
    outputs = {
        "extproc check-config": _cli("check-config", policy),
        "extproc envoy-config": _cli("envoy-config", "--config", policy),
        "extproc route": _cli(
            "route",
            "--config",
            policy,
            "-H",
            "authorization:Bearer client-own-key",
            "-",
            stdin=orjson.dumps(chat("a traceback")),
        ),
    }
    route = orjson.loads(outputs["extproc route"])
    assert [a["backend"] for a in route["chain"]["attempts"]] == [*BACKENDS.values(), "small replicas"]
    assert "credential_injector" in outputs["extproc envoy-config"]
    for name, text in outputs.items():
        for provider, key in KEYS.items():
            assert key not in text, f"{provider}'s key appears in {name}"


AUTH_MODES = """
version: 1
default_model: forwarded
fallback: {max_attempts: 3, deadline: 30s, cooldown: 30s}
providers:
  groq:
    base_url: https://api.groq.test/openai/v1
    address: ${groq_address}
    ca_file: ${ca}
    authorization: forward      # the client's own header, as sent
  together:
    base_url: https://api.together.test/v1
    address: ${together_address}
    ca_file: ${ca}
    api_key: {env: EXTPROC_TEST_TOGETHER_KEY}
  openai:
    base_url: https://api.openai.test/v1
    address: ${openai_address}
    ca_file: ${ca}
    authorization: strip        # none at all
models:
  forwarded: {backends: [{provider: groq, model: llama-3.3-70b-versatile}]}
  stripped: {backends: [{provider: openai, model: gpt-4o-mini}]}
  replaced-then-forwarded:
    backends:
      - {provider: together, model: meta-llama/Llama-3.3-70B-Instruct-Turbo}
      - {provider: groq, model: llama-3.3-70b-versatile}
"""


def test_authorization_forward_and_strip_and_never_a_previous_providers_key(world, tmp_path: Path) -> None:
    stack, providers = world
    for provider in providers.values():
        provider.mode, provider.retry_after = "ok", None
        provider.received.clear()
    client = {"authorization": "Bearer client-own-key"}
    with Stack(tmp_path, AUTH_MODES, [StandIn(name="local")], substitutions=stack.substitutions) as modes:
        response = modes.post(chat("x", model="forwarded"), headers=client)
        assert response.status == 200, response.body
        (got,) = providers["groq"].received
        assert got.authorization == "Bearer client-own-key" and got.model == MODELS["groq"]

        response = modes.post(chat("x", model="stripped"), headers=client)
        assert response.status == 200, response.body
        (got,) = providers["openai"].received
        assert got.authorization is None and got.model == MODELS["openai"]

        # Together replaces the client's header with its key and answers 429; the next attempt,
        # to a provider that forwards the client's header, gets none: never Together's key, and
        # not the client's either (the attempts share one set of request headers).
        providers["groq"].received.clear()
        providers["together"].mode = "429"
        response = modes.post(chat("x", model="replaced-then-forwarded"), headers=client)
        providers["together"].mode = "ok"
        assert response.status == 200, response.body
        assert response.headers["x-router-attempts"] == "2"
        (first,) = providers["together"].received
        assert first.authorization == f"Bearer {KEYS['together']}"
        (second,) = providers["groq"].received
        assert second.authorization is None and second.model == MODELS["groq"]
