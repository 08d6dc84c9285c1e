"""The sidecar's Kubernetes client: credentials in a pod and from kubeconfigs, over real TLS
(certificates made with openssl) against the fake API server."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.policy.config import KubernetesReplicas
from extproc.replicas.kubeapi import ApiClient, ApiError, KubernetesConfigError, load_api_client
from extproc.replicas.pool import Discovery
from tests.replicas.fake_apiserver import FakeApiServer, endpoint, endpoint_slice, port

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")

SLICES = "/apis/discovery.k8s.io/v1/namespaces/llm/endpointslices"
TIMEOUT = (5.0, 10.0)


def _certificate(directory: Path, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={name}"),
            *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: _certificate(directory, name) for name in ("server", "client")}


@pytest.fixture
def no_cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)


def b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def kubeconfig(path: Path, server: str, user: dict, cluster: dict | None = None, namespace: str | None = None) -> Path:
    import yaml

    context = {"cluster": "c", "user": "u", **({"namespace": namespace} if namespace else {})}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server, **(cluster or {})}}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "ctx", "context": context}],
                "current-context": "ctx",
            }
        )
    )
    return path


def listed(client: ApiClient) -> list[str]:
    items = client.get(SLICES, {"labelSelector": "kubernetes.io/service-name=vllm"}, TIMEOUT)["items"]
    return [item["metadata"]["name"] for item in items]


@pytest.fixture
def tls_api(certs) -> Iterator[FakeApiServer]:
    with FakeApiServer(token="token-1", tls=certs["server"]) as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm", endpoints=[endpoint("10.0.0.1")]))
        yield api


def test_in_a_pod_the_service_account_token_ca_and_namespace_are_used_and_a_rotated_token_is_reread(
    tls_api: FakeApiServer, certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("token-1\n")
    shutil.copy(certs["server"][0], account / "ca.crt")
    (account / "namespace").write_text("llm")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_api.port))

    client = load_api_client(service_account=account)

    assert client.namespace == "llm"
    assert listed(client) == ["vllm-a"]
    assert tls_api.authorizations[-1] == "Bearer token-1"
    # The kubelet rotates the projected token; the old one is refused, and the next request reads the new one.
    (account / "token").write_text("token-2\n")
    tls_api.token = "token-2"
    with pytest.raises(ApiError) as refused:
        listed(client)
    assert refused.value.status == 401
    assert listed(client) == ["vllm-a"]


def test_in_a_pod_without_a_mounted_token_the_error_names_the_chart_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    with pytest.raises(KubernetesConfigError, match=r"serviceAccount\.automount"):
        load_api_client(service_account=tmp_path / "none")


def test_kubeconfig_with_ca_data_token_and_context_namespace(
    tls_api: FakeApiServer, certs, tmp_path: Path, no_cluster_env
) -> None:
    path = kubeconfig(
        tmp_path / "config",
        tls_api.url,
        {"token": "token-1"},
        {"certificate-authority-data": b64(certs["server"][0])},
        namespace="llm",
    )
    client = load_api_client(str(path))
    assert client.namespace == "llm"
    assert listed(client) == ["vllm-a"]


def test_kubeconfig_ca_file_is_relative_to_the_kubeconfig_and_an_unknown_ca_is_refused(
    tls_api: FakeApiServer, certs, tmp_path: Path, no_cluster_env
) -> None:
    shutil.copy(certs["server"][0], tmp_path / "ca.crt")
    good = kubeconfig(tmp_path / "good", tls_api.url, {"token": "token-1"}, {"certificate-authority": "ca.crt"})
    assert listed(load_api_client(str(good))) == ["vllm-a"]
    assert load_api_client(str(good)).namespace == "default"
    wrong = kubeconfig(
        tmp_path / "wrong", tls_api.url, {"token": "token-1"}, {"certificate-authority-data": b64(certs["client"][0])}
    )
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        listed(load_api_client(str(wrong)))


def test_kubeconfig_client_certificate_data(certs, tmp_path: Path, no_cluster_env) -> None:
    with FakeApiServer(tls=certs["server"], client_ca=certs["client"][0]) as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm"))
        cluster = {"certificate-authority-data": b64(certs["server"][0])}
        user = {"client-certificate-data": b64(certs["client"][0]), "client-key-data": b64(certs["client"][1])}
        assert listed(load_api_client(str(kubeconfig(tmp_path / "config", api.url, user, cluster)))) == ["vllm-a"]
        without = kubeconfig(tmp_path / "anonymous", api.url, {}, cluster)
        with pytest.raises(Exception):  # noqa: B017 - the TLS handshake fails; its error type is urllib3's
            listed(load_api_client(str(without)))


def test_kubeconfig_exec_plugin_supplies_the_token(tmp_path: Path, no_cluster_env) -> None:
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json, os, sys\n"
        "info = json.loads(os.environ['KUBERNETES_EXEC_INFO'])\n"
        "assert info['kind'] == 'ExecCredential' and info['spec']['interactive'] is False\n"
        "print(json.dumps({'apiVersion': info['apiVersion'], 'kind': 'ExecCredential',\n"
        "    'status': {'token': os.environ['PLUGIN_TOKEN'], 'expirationTimestamp': '2999-01-01T00:00:00Z'}}))\n"
    )
    exec_spec = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(plugin)],
        "env": [{"name": "PLUGIN_TOKEN", "value": "from-plugin"}],
        "interactiveMode": "Never",
    }
    with FakeApiServer(token="from-plugin") as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm"))
        client = load_api_client(str(kubeconfig(tmp_path / "config", api.url, {"exec": exec_spec})))
        assert listed(client) == ["vllm-a"]
        assert listed(client) == ["vllm-a"]  # the credential is cached until it expires


def test_kubeconfig_list_is_merged_first_file_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with FakeApiServer(token="right") as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm"))
        first = tmp_path / "first"
        first.write_text(
            f"current-context: ctx\nusers: [{{name: u, user: {{token: right}}}}]\n"
            f"clusters: [{{name: c, cluster: {{server: '{api.url}'}}}}]\n"
        )
        second = kubeconfig(tmp_path / "second", "http://127.0.0.1:1", {"token": "wrong"})
        monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(first), str(tmp_path / "missing"), str(second)]))
        assert listed(load_api_client()) == ["vllm-a"]


@pytest.mark.parametrize(
    ("user", "cluster", "message"),
    [
        ({"auth-provider": {"name": "gcp"}}, {}, "auth-provider plugins are not supported"),
        ({}, {"proxy-url": "http://proxy:3128"}, "proxy-url is not supported"),
    ],
    ids=["auth-provider", "proxy-url"],
)
def test_unsupported_kubeconfig_features_fail_with_a_clear_error(
    user: dict, cluster: dict, message: str, tmp_path: Path, no_cluster_env
) -> None:
    with pytest.raises(KubernetesConfigError, match=message):
        load_api_client(str(kubeconfig(tmp_path / "config", "https://127.0.0.1:6443", user, cluster)))


def test_a_missing_kubeconfig_says_how_to_give_one(tmp_path: Path, no_cluster_env) -> None:
    with pytest.raises(KubernetesConfigError, match="pass --kubeconfig or set KUBECONFIG"):
        load_api_client(str(tmp_path / "nope"))


def test_a_policy_without_namespace_watches_the_clients_namespace() -> None:
    with FakeApiServer() as api:
        api.apply(
            endpoint_slice(
                "vllm-a", namespace="llm", service="vllm", endpoints=[endpoint("10.0.0.1")], ports=[port(8000)]
            )
        )
        api.apply(
            endpoint_slice(
                "vllm-b", namespace="default", service="vllm", endpoints=[endpoint("10.0.0.2")], ports=[port(8000)]
            )
        )
        discovery = Discovery(api_client=ApiClient(api.url, namespace="llm"), sync_timeout=10)
        try:
            source = discovery.source(KubernetesReplicas(service="vllm", port=8000))
            assert source() == ("10.0.0.1:8000",)
        finally:
            discovery.close()
