"""EndpointSlice discovery through the sidecar's own API client (extproc/replicas/kubeapi.py)
against a local server that speaks the list + watch protocol (``fake_apiserver``; the official
``kubernetes`` client is run against the same server in test_fake_apiserver.py)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from extproc.replicas.kubernetes import (
    EndpointSliceWatcher,
    KubernetesConfigError,
    KubernetesSource,
    KubernetesSourceError,
    load_api_client,
)
from tests.replicas.fake_apiserver import FakeApiServer, Obj, endpoint, endpoint_slice, port
from tests.replicas.waiting import wait_until

NS = "models"
VLLM = KubernetesSource(namespace=NS, service="vllm")

MakeWatcher = Callable[..., EndpointSliceWatcher]


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with FakeApiServer() as server:
        yield server


@pytest.fixture
def changes() -> list[tuple[str, ...]]:
    """Every ready set passed to on_change, in order."""
    return []


@pytest.fixture
def make_watcher(api: FakeApiServer, changes: list[tuple[str, ...]]) -> Iterator[MakeWatcher]:
    started: list[EndpointSliceWatcher] = []

    def make(
        source: KubernetesSource = VLLM,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 0.5,
        watch_timeout_seconds: int = 300,
    ) -> EndpointSliceWatcher:
        watcher = EndpointSliceWatcher(
            source,
            api_client=api.api_client(),
            on_change=changes.append,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            watch_timeout_seconds=watch_timeout_seconds,
        )
        watcher.start()
        started.append(watcher)
        assert watcher.wait_synced(15.0), "the first list never completed"
        return watcher

    yield make
    for watcher in started:
        watcher.stop()


def vllm_slice(
    name: str,
    *addresses: str,
    ports: Sequence[Obj] | None = (port(8000, "http"),),
    address_type: str = "IPv4",
) -> Obj:
    """A slice of the vllm service in NS whose endpoints are all ready."""
    return endpoint_slice(
        name,
        namespace=NS,
        service="vllm",
        endpoints=[endpoint(a) for a in addresses],
        ports=ports,
        address_type=address_type,
    )


def wait_for_endpoints(watcher: EndpointSliceWatcher, *expected: str) -> None:
    wait_until(
        lambda: watcher.endpoints == expected,
        message=lambda: f"endpoints {expected}, have {watcher.endpoints}",
    )


def watcher_threads(source: KubernetesSource) -> list[str]:
    name = f"extproc-k8s-{source.describe()}"
    return [thread.name for thread in threading.enumerate() if thread.name == name]


# --- what counts as a ready endpoint -------------------------------------------------------


def test_lists_ready_endpoints_of_the_service_only(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.2", "10.0.0.1"))
    api.apply(endpoint_slice("other-a", namespace=NS, service="other", endpoints=[endpoint("10.0.9.9")]))
    api.apply(endpoint_slice("vllm-elsewhere", namespace="default", service="vllm", endpoints=[endpoint("10.0.8.8")]))

    watcher = make_watcher()

    assert watcher.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert watcher.connected


def test_added_endpoint_appears_and_removed_one_disappears(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher()

    api.apply(vllm_slice("vllm-a", "10.0.0.1", "10.0.0.2"))
    wait_for_endpoints(watcher, "10.0.0.1:8000", "10.0.0.2:8000")

    api.apply(vllm_slice("vllm-a", "10.0.0.2"))
    wait_for_endpoints(watcher, "10.0.0.2:8000")

    api.delete("vllm-a", NS)
    wait_for_endpoints(watcher)


def test_not_ready_endpoint_is_left_out_until_it_becomes_ready(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(
        endpoint_slice(
            "vllm-a",
            namespace=NS,
            service="vllm",
            endpoints=[
                endpoint("10.0.0.1", ready=True),
                endpoint("10.0.0.2", ready=False),
                endpoint("10.0.0.3", ready=None),  # nil: an unknown state, read as ready per the API
            ],
        )
    )
    watcher = make_watcher()
    assert watcher.endpoints == ("10.0.0.1:8000", "10.0.0.3:8000")

    api.apply(vllm_slice("vllm-a", "10.0.0.1", "10.0.0.2", "10.0.0.3"))
    wait_for_endpoints(watcher, "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")


def test_terminating_endpoint_is_left_out_even_when_marked_ready(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1", "10.0.0.2"))
    watcher = make_watcher()

    # ready=true while terminating is what publishNotReadyAddresses produces.
    api.apply(
        endpoint_slice(
            "vllm-a",
            namespace=NS,
            service="vllm",
            endpoints=[
                endpoint("10.0.0.1"),
                endpoint("10.0.0.2", ready=True, serving=True, terminating=True),
            ],
        )
    )
    wait_for_endpoints(watcher, "10.0.0.1:8000")


def test_endpoint_without_conditions_counts_as_ready(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(endpoint_slice("vllm-a", namespace=NS, service="vllm", endpoints=[{"addresses": ["10.0.0.1"]}]))
    assert make_watcher().endpoints == ("10.0.0.1:8000",)


def test_slices_of_one_service_are_merged_and_deduplicated(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1", "10.0.0.2"))
    # An endpoint can sit in two slices for a moment while the controller moves it.
    api.apply(vllm_slice("vllm-b", "10.0.0.2", "10.0.0.3"))
    watcher = make_watcher()
    assert watcher.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000")

    api.delete("vllm-a", NS)
    wait_for_endpoints(watcher, "10.0.0.2:8000", "10.0.0.3:8000")


def test_label_selector_source_watches_the_matching_slices(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(
        endpoint_slice(
            "a",
            namespace=NS,
            labels={"app": "vllm", "track": "stable"},
            endpoints=[endpoint("10.0.0.1")],
        )
    )
    api.apply(
        endpoint_slice(
            "b",
            namespace=NS,
            labels={"app": "vllm", "track": "canary"},
            endpoints=[endpoint("10.0.0.2")],
        )
    )
    watcher = make_watcher(KubernetesSource(namespace=NS, selector="app=vllm,track!=canary"))
    assert watcher.endpoints == ("10.0.0.1:8000",)

    assert api.requests[0].label_selector == "app=vllm,track!=canary"


# --- ports and address formats -------------------------------------------------------------


def test_named_port_is_resolved_in_each_slice(
    api: FakeApiServer, make_watcher: MakeWatcher, caplog: pytest.LogCaptureFixture
):
    # Two slices can map the same port name to different numbers during a rollout.
    api.apply(vllm_slice("vllm-a", "10.0.0.1", ports=[port(9090, "metrics"), port(8000, "http")]))
    api.apply(vllm_slice("vllm-b", "10.0.0.2", ports=[port(8001, "http")]))
    api.apply(vllm_slice("vllm-c", "10.0.0.3", ports=[port(9090, "metrics")]))

    with caplog.at_level(logging.WARNING, logger="extproc.replicas"):
        watcher = make_watcher(KubernetesSource(namespace=NS, service="vllm", port="http"))

    assert watcher.endpoints == ("10.0.0.1:8000", "10.0.0.2:8001")
    assert any("vllm-c" in r.getMessage() and "'http'" in r.getMessage() for r in caplog.records)


def test_without_a_port_the_first_port_of_the_slice_is_used(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1", ports=[port(8000, "http"), port(9090, "metrics")]))
    assert make_watcher().endpoints == ("10.0.0.1:8000",)


def test_port_number_must_be_one_the_slice_exposes_unless_it_lists_none(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1", ports=[port(8000, "http"), port(9090, "m")]))
    api.apply(vllm_slice("vllm-b", "10.0.0.2", ports=[port(8000, "http")]))
    api.apply(vllm_slice("vllm-c", "10.0.0.3", ports=None))  # a headless service without ports
    watcher = make_watcher(KubernetesSource(namespace=NS, service="vllm", port=9090))
    assert watcher.endpoints == ("10.0.0.1:9090", "10.0.0.3:9090")


def test_ipv6_endpoints_are_bracketed_and_fqdn_slices_ignored(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-v6", "fd00::1", address_type="IPv6"))
    api.apply(vllm_slice("vllm-fqdn", "vllm.example.com", address_type="FQDN"))
    assert make_watcher().endpoints == ("[fd00::1]:8000",)


# --- change notifications ------------------------------------------------------------------


def test_on_change_fires_only_when_the_ready_set_changes(
    api: FakeApiServer, make_watcher: MakeWatcher, changes: list[tuple[str, ...]]
):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher()

    # Neither of these changes the ready set...
    api.apply(
        endpoint_slice(
            "vllm-a",
            namespace=NS,
            service="vllm",
            endpoints=[endpoint("10.0.0.1"), endpoint("10.0.0.9", ready=False)],
        )
    )
    api.apply(vllm_slice("vllm-b", "10.0.0.1"))
    # ...this one does; events arrive in order, so once it is seen the others were too.
    api.apply(vllm_slice("vllm-b", "10.0.0.1", "10.0.0.2"))
    wait_for_endpoints(watcher, "10.0.0.1:8000", "10.0.0.2:8000")

    assert changes == [("10.0.0.1:8000",), ("10.0.0.1:8000", "10.0.0.2:8000")]


def test_a_failing_on_change_does_not_stop_discovery(api: FakeApiServer):
    def explode(endpoints: tuple[str, ...]) -> None:
        raise RuntimeError("consumer bug")

    watcher = EndpointSliceWatcher(VLLM, api_client=api.api_client(), on_change=explode)
    watcher.start()
    try:
        api.apply(vllm_slice("vllm-a", "10.0.0.1"))
        wait_for_endpoints(watcher, "10.0.0.1:8000")
        api.apply(vllm_slice("vllm-a", "10.0.0.2"))
        wait_for_endpoints(watcher, "10.0.0.2:8000")
    finally:
        watcher.stop()


def test_bookmarks_move_the_version_and_change_nothing(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher(watch_timeout_seconds=1)
    api.send_bookmark()
    bookmark_version = api.resource_version

    # The next watch, after the server ends this one, resumes from the bookmark.
    wait_until(lambda: api.count("watch") >= 2, message="a second watch")
    assert api.requests[-1].resource_version == bookmark_version
    assert watcher.endpoints == ("10.0.0.1:8000",)
    assert api.count("list") == 1


# --- list, watch, 410 and reconnects -------------------------------------------------------


def test_watch_starts_at_the_list_version_and_resumes_without_relisting(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    listed_version = api.resource_version
    watcher = make_watcher(watch_timeout_seconds=1)
    wait_until(lambda: api.count("watch") >= 1, message="the first watch")
    first_watch = api.requests[1]
    assert (first_watch.kind, first_watch.resource_version) == ("watch", listed_version)
    assert first_watch.timeout_seconds == 1

    api.apply(vllm_slice("vllm-a", "10.0.0.2"))
    wait_for_endpoints(watcher, "10.0.0.2:8000")
    seen_version = api.resource_version

    # The server ends each watch after 1 s; the next one picks up where the last stopped.
    wait_until(lambda: api.count("watch") >= 3, message="two more watches")
    assert [r.resource_version for r in api.requests if r.kind == "watch"][-1] == seen_version
    assert api.count("list") == 1


def test_410_error_event_relists_and_catches_up(api: FakeApiServer, make_watcher: MakeWatcher):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher()
    wait_until(lambda: api.open_watches == 1, message="an open watch")

    # A change no watch will ever deliver: only a new list can reveal it.
    api.apply(vllm_slice("vllm-a", "10.0.0.2"), emit=False)
    api.expire_watches()

    wait_for_endpoints(watcher, "10.0.0.2:8000")
    assert api.count("list") == 2
    assert watcher.connected
    # And the watch after the relist works.
    api.apply(vllm_slice("vllm-b", "10.0.0.3"))
    wait_for_endpoints(watcher, "10.0.0.2:8000", "10.0.0.3:8000")


def test_410_status_on_resume_relists_and_catches_up():
    with FakeApiServer(gone_as_status=True) as api:
        api.apply(vllm_slice("vllm-a", "10.0.0.1"))
        watcher = EndpointSliceWatcher(VLLM, api_client=api.api_client(), watch_timeout_seconds=1)
        watcher.start()
        try:
            assert watcher.wait_synced(15.0)
            wait_until(lambda: api.open_watches == 1, message="an open watch")

            api.apply(vllm_slice("vllm-a", "10.0.0.2"), emit=False)
            api.compact()  # the version the watcher resumes from is now too old

            wait_for_endpoints(watcher, "10.0.0.2:8000")
            assert api.count("list") == 2
        finally:
            watcher.stop()


def test_dropped_watch_relists_quietly(api: FakeApiServer, make_watcher: MakeWatcher, caplog: pytest.LogCaptureFixture):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher()
    wait_until(lambda: api.open_watches == 1, message="an open watch")

    with caplog.at_level(logging.INFO, logger="extproc.replicas"):
        api.apply(vllm_slice("vllm-a", "10.0.0.2"), emit=False)
        api.drop_watches()
        wait_for_endpoints(watcher, "10.0.0.2:8000")

    api.apply(vllm_slice("vllm-a", "10.0.0.3"))
    wait_for_endpoints(watcher, "10.0.0.3:8000")
    # A cut watch is routine (load balancers do it), not an outage worth a warning.
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_api_outage_keeps_last_endpoints_then_updates_resume(
    api: FakeApiServer, make_watcher: MakeWatcher, changes: list[tuple[str, ...]]
):
    api.apply(vllm_slice("vllm-a", "10.0.0.1", "10.0.0.2"))
    watcher = make_watcher()
    wait_until(lambda: api.open_watches == 1, message="an open watch")

    api.go_down()
    wait_until(lambda: not watcher.connected, message="the watcher to notice the outage")
    lists_before = api.count("list")
    assert watcher.endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    # Changes made while the API was unreachable to the watcher.
    api.apply(vllm_slice("vllm-a", "10.0.0.2", "10.0.0.3"), emit=False)

    api.come_back()
    wait_until(lambda: watcher.connected, message="the watcher to reconnect")
    wait_for_endpoints(watcher, "10.0.0.2:8000", "10.0.0.3:8000")
    assert api.count("list") == lists_before + 1
    api.apply(vllm_slice("vllm-b", "10.0.0.4"))
    wait_for_endpoints(watcher, "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000")
    # The outage itself never reached the consumer as an empty or shrunken pool.
    assert () not in changes[1:]
    assert changes[0] == ("10.0.0.1:8000", "10.0.0.2:8000")


def test_outage_before_the_first_list_keeps_trying(api: FakeApiServer):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    api.go_down()
    watcher = EndpointSliceWatcher(VLLM, api_client=api.api_client(), backoff_initial=0.05, backoff_max=0.2)
    watcher.start()
    try:
        assert not watcher.wait_synced(0.3)
        assert not watcher.connected and watcher.endpoints == ()
        api.come_back()
        assert watcher.wait_synced(15.0)
        assert watcher.endpoints == ("10.0.0.1:8000",)
    finally:
        watcher.stop()


def test_a_long_outage_logs_one_warning_not_one_per_retry(
    api: FakeApiServer, make_watcher: MakeWatcher, caplog: pytest.LogCaptureFixture
):
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))
    watcher = make_watcher(backoff_initial=0.01, backoff_max=0.02)

    def unavailable() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "API unavailable" in r.getMessage()]

    with caplog.at_level(logging.DEBUG, logger="extproc.replicas"):
        api.go_down()
        wait_until(lambda: len(unavailable()) >= 5, message="several failed attempts")
        api.come_back()
        wait_until(lambda: watcher.connected, message="the watcher to reconnect")

    assert [r.levelno for r in unavailable()].count(logging.WARNING) == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records)


# --- stopping ------------------------------------------------------------------------------


def test_stop_during_a_watch_closes_it_and_joins_the_thread(api: FakeApiServer, make_watcher: MakeWatcher):
    source = KubernetesSource(namespace="stop-during-watch", service="vllm")
    watcher = make_watcher(source)  # the default 300 s watch: stop() must not wait for it
    wait_until(lambda: api.open_watches == 1, message="an open watch")

    watcher.stop()

    assert watcher_threads(source) == []
    wait_until(lambda: api.open_watches == 0, message="the server to see the watch closed")


def test_stop_during_backoff_does_not_wait_for_it(api: FakeApiServer, caplog: pytest.LogCaptureFixture):
    api.go_down()
    source = KubernetesSource(namespace="stop-during-backoff", service="vllm")
    watcher = EndpointSliceWatcher(source, api_client=api.api_client(), backoff_initial=60.0, backoff_max=60.0)
    with caplog.at_level(logging.DEBUG, logger="extproc.replicas"):
        watcher.start()
        # The first retry is immediate; after the second failure the watcher waits a minute.
        wait_until(
            lambda: sum("API unavailable" in r.getMessage() for r in caplog.records) >= 2,
            message="two failed lists",
        )

    watcher.stop()

    assert watcher_threads(source) == []


def test_stop_before_start_is_harmless(api: FakeApiServer):
    EndpointSliceWatcher(VLLM, api_client=api.api_client()).stop()


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"service": "vllm", "selector": "app=vllm"}, {"service": "vllm", "port": 0}])
def test_source_needs_exactly_one_of_service_or_selector(options: dict[str, object]):
    with pytest.raises(KubernetesSourceError):
        KubernetesSource(namespace=NS, **options)  # type: ignore[arg-type]


def test_load_api_client_reads_a_kubeconfig(api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{api.url}"}}}}]
users: [{{name: me, user: {{token: not-a-secret}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: me}}}}]
current-context: fake
""")
    api.apply(vllm_slice("vllm-a", "10.0.0.1"))

    watcher = EndpointSliceWatcher(VLLM, api_client=load_api_client(str(kubeconfig)))
    watcher.start()
    try:
        assert watcher.wait_synced(15.0)
        assert watcher.endpoints == ("10.0.0.1:8000",)
    finally:
        watcher.stop()


def test_load_api_client_names_the_missing_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = tmp_path / "nope"
    with pytest.raises(KubernetesConfigError, match=str(missing)):
        load_api_client(str(missing))


@pytest.mark.skipif(
    os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token"),
    reason="runs inside a real pod",
)
def test_load_api_client_in_a_pod_uses_the_service_account(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(KubernetesConfigError, match="service account"):
        load_api_client()
