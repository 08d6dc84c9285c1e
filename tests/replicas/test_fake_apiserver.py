"""The fake API server speaks the protocol the official ``kubernetes`` client expects: the same
list, watch, bookmark and 410 exchanges the sidecar's own client is tested with. If the fake
drifted from the real protocol, this fails, not only the sidecar's tests."""

from __future__ import annotations

import kubernetes.client
import kubernetes.watch
import pytest
from kubernetes.client.exceptions import ApiException

from tests.replicas.fake_apiserver import FakeApiServer, endpoint, endpoint_slice

SELECTOR = "kubernetes.io/service-name=vllm"


def test_the_official_client_lists_and_watches_the_fake() -> None:
    with FakeApiServer() as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm", endpoints=[endpoint("10.0.0.1")]))
        discovery = kubernetes.client.DiscoveryV1Api(api.official_client())
        listed = discovery.list_namespaced_endpoint_slice("llm", label_selector=SELECTOR)
        assert [s.endpoints[0].addresses for s in listed.items] == [["10.0.0.1"]]
        assert listed.metadata.resource_version == api.resource_version

        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm", endpoints=[endpoint("10.0.0.2")]))
        api.send_bookmark()
        watch = kubernetes.watch.Watch()
        seen = []
        for event in watch.stream(
            discovery.list_namespaced_endpoint_slice,
            "llm",
            label_selector=SELECTOR,
            resource_version=listed.metadata.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=1,
        ):
            seen.append(event["type"])
            if event["type"] == "MODIFIED":
                assert event["object"].endpoints[0].addresses == ["10.0.0.2"]
        assert seen == ["MODIFIED", "BOOKMARK"]
        assert watch.resource_version == api.resource_version


def test_the_official_client_sees_410_gone_for_a_compacted_version() -> None:
    with FakeApiServer() as api:
        api.apply(endpoint_slice("vllm-a", namespace="llm", service="vllm"))
        old = api.resource_version
        api.apply(endpoint_slice("vllm-b", namespace="llm", service="vllm"))
        api.compact()
        discovery = kubernetes.client.DiscoveryV1Api(api.official_client())
        with pytest.raises(ApiException) as error:
            for _ in kubernetes.watch.Watch().stream(
                discovery.list_namespaced_endpoint_slice,
                "llm",
                label_selector=SELECTOR,
                resource_version=old,
                timeout_seconds=1,
            ):
                pass
        assert error.value.status == 410
