"""The chart with hosted providers: each API key a Secret mounted into Envoy alone, the policy
naming the mounted file, manifests valid for the oldest and newest Kubernetes."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import kubernetes_validate

from extproc.envoy.process import envoy_binary
from tests.helm.chart import render

KEY_FILE = "/etc/extproc/keys/groq/api-key"
VALUES = {
    "providerKeys": [
        {"name": "groq", "secretName": "llm-provider-keys", "key": "groq"},
        {"name": "openai", "secretName": "llm-provider-keys", "key": "openai"},
    ],
    "routing": {
        "version": 1,
        "default_model": "llama-70b",
        "providers": {
            "groq": {"base_url": "https://api.groq.com/openai/v1", "api_key": {"file": KEY_FILE}, "timeout": "10s"},
            "openai": {
                "base_url": "https://api.openai.com/v1",
                "api_key": {"file": "/etc/extproc/keys/openai/api-key"},
            },
        },
        "models": {
            "llama-70b": {
                "backends": [
                    {"provider": "groq", "model": "llama-3.3-70b-versatile"},
                    {"provider": "openai", "model": "gpt-4o-mini"},
                ]
            }
        },
        "decisions": [],
    },
}


def test_provider_keys_are_secrets_mounted_into_envoy_only_and_the_manifests_validate_strictly() -> None:
    rendered = render(VALUES)
    for manifest in rendered.manifests:
        if manifest["kind"] in ("ServiceMonitor", "PrometheusRule"):
            continue
        for version in ("1.25.0", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(manifest, version, strict=True)
    volumes = {v["name"]: v for v in rendered.pod["volumes"]}
    assert volumes["key-groq"]["secret"] == {
        "secretName": "llm-provider-keys",
        "items": [{"key": "groq", "path": "api-key"}],
        "defaultMode": 0o440,
    }
    envoy = {m["name"]: m for m in rendered.container("envoy")["volumeMounts"]}
    assert envoy["key-groq"] == {"name": "key-groq", "mountPath": "/etc/extproc/keys/groq", "readOnly": True}
    assert "subPath" not in envoy["key-groq"]  # a rotated key reaches Envoy (its watched directory)
    for name in ("extproc", "envoy-config"):
        assert not any(m["name"].startswith("key-") for m in rendered.container(name)["volumeMounts"])


def test_the_init_step_renders_the_providers_for_envoy_naming_the_key_file_not_the_key() -> None:
    rendered = render(VALUES)
    config = rendered.envoy_config
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    groq = clusters["groq"]
    tls = groq["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.groq.com"
    filters = groq["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    injector = next(f for f in filters["http_filters"] if f["name"] == "envoy.filters.http.credential_injector")
    secret = injector["typed_config"]["credential"]["typed_config"]["credential"]
    assert secret["sds_config"]["path_config_source"]["path"].endswith("/sds/groq.json")
    with tempfile.TemporaryDirectory() as tmp:
        code, _, err = rendered.init_step(f"--xds-dir={tmp}")
        assert code == 0, err
        sds = (Path(tmp) / "sds" / "groq.json").read_text()
        assert KEY_FILE in sds
        # Envoy accepts the files the init step wrote (the key itself is read only when running).
        result = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", str(Path(tmp) / "bootstrap.json"), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
