"""Background load scraping of vLLM and SGLang /metrics, against local HTTP servers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from extproc.replicas.scrape import LoadReport, LoadScraper, parse_load
from tests.replicas.fake_metrics import MetricsServer, sglang_metrics, vllm_metrics
from tests.replicas.waiting import wait_until

MakeScraper = Callable[..., LoadScraper]


@pytest.fixture
def make_scraper() -> Iterator[MakeScraper]:
    started: list[LoadScraper] = []

    def make(*targets: str, **options: float) -> LoadScraper:
        scraper = LoadScraper(**{"interval": 0.05, "timeout": 5.0, **options})  # type: ignore[arg-type]
        scraper.set_targets(targets)
        scraper.start()
        started.append(scraper)
        return scraper

    yield make
    for scraper in started:
        scraper.stop()


def wait_for_report(
    scraper: LoadScraper, endpoint: str, check: Callable[[LoadReport], bool] = lambda r: True
) -> LoadReport:
    wait_until(
        lambda: (report := scraper.report(endpoint)) is not None and check(report),
        message=lambda: f"a report for {endpoint}, have {scraper.report(endpoint)}",
    )
    report = scraper.report(endpoint)
    assert report is not None
    return report


# --- parsing -------------------------------------------------------------------------------


def test_vllm_counts_are_summed_across_models_and_kv_usage_averaged():
    text = vllm_metrics(
        waiting={"llama": 3, "llama-lora": 2},
        running={"llama": 10, "llama-lora": 6},
        kv_cache={"llama": 0.5, "llama-lora": 0.7},
    )
    report = parse_load(text, scraped_at=12.0)
    assert (report.waiting, report.running, report.scraped_at) == (5, 16, 12.0)
    assert report.kv_cache_usage == pytest.approx(0.6)


def test_older_vllm_builds_report_kv_usage_as_gpu_cache_usage():
    text = vllm_metrics(waiting={"m": 1}, running={"m": 2}, kv_cache={"m": 0.25}, legacy=True)
    report = parse_load(text, scraped_at=0.0)
    assert (report.waiting, report.running, report.kv_cache_usage) == (1, 2, 0.25)


def test_the_current_kv_metric_wins_when_both_generations_are_exposed():
    text = 'vllm:kv_cache_usage_perc{model_name="m"} 0.9\nvllm:gpu_cache_usage_perc{model_name="m"} 0.1\n'
    assert parse_load(text, scraped_at=0.0).kv_cache_usage == 0.9


def test_sglang_queue_running_and_token_usage():
    report = parse_load(sglang_metrics(queue=2826, running=162, token_usage=0.28), scraped_at=0.0)
    assert (report.waiting, report.running, report.kv_cache_usage) == (2826, 162, 0.28)


def test_a_page_without_load_metrics_gives_an_empty_report():
    report = parse_load("# TYPE up gauge\nup 1\n", scraped_at=3.0)
    assert report == LoadReport(waiting=None, running=None, kv_cache_usage=None, scraped_at=3.0)


def test_nan_samples_are_ignored_and_kv_usage_is_clamped_to_one():
    text = (
        'vllm:num_requests_waiting{model_name="a"} NaN\n'
        'vllm:num_requests_waiting{model_name="b"} 4\n'
        'vllm:kv_cache_usage_perc{model_name="a"} 1.02\n'
    )
    report = parse_load(text, scraped_at=0.0)
    assert (report.waiting, report.kv_cache_usage) == (4, 1.0)


def test_a_malformed_page_raises_value_error():
    with pytest.raises(ValueError):
        parse_load('vllm:num_requests_waiting{model_name="a"} lots\n', scraped_at=0.0)


# --- scraping ------------------------------------------------------------------------------


def test_scrapes_vllm_and_sglang_targets(make_scraper: MakeScraper):
    vllm_page = vllm_metrics(waiting={"m": 4}, running={"m": 8}, kv_cache={"m": 0.5})
    with MetricsServer(vllm_page) as vllm, MetricsServer(sglang_metrics(1, 2, 0.75)) as sglang:
        scraper = make_scraper(vllm.endpoint, sglang.endpoint)

        v = wait_for_report(scraper, vllm.endpoint)
        s = wait_for_report(scraper, sglang.endpoint)

    assert (v.waiting, v.running, v.kv_cache_usage) == (4, 8, 0.5)
    assert (s.waiting, s.running, s.kv_cache_usage) == (1, 2, 0.75)


def test_reports_follow_the_load_as_it_changes(make_scraper: MakeScraper):
    with MetricsServer(vllm_metrics({"m": 0}, {"m": 1}, {"m": 0.1})) as server:
        scraper = make_scraper(server.endpoint)
        wait_for_report(scraper, server.endpoint, lambda r: r.waiting == 0)

        server.body = vllm_metrics({"m": 7}, {"m": 3}, {"m": 0.9})

        report = wait_for_report(scraper, server.endpoint, lambda r: r.waiting == 7)
    assert (report.running, report.kv_cache_usage) == (3, 0.9)


def test_report_is_none_before_the_first_scrape_and_for_unknown_targets():
    scraper = LoadScraper()
    scraper.set_targets(["10.0.0.1:8000"])
    assert scraper.report("10.0.0.1:8000") is None
    assert scraper.report("10.9.9.9:8000") is None


def test_reports_of_a_target_that_stops_answering_go_stale(make_scraper: MakeScraper):
    with MetricsServer(sglang_metrics(1, 2, 0.5)) as server:
        scraper = make_scraper(server.endpoint, stale_after=0.5)
        wait_for_report(scraper, server.endpoint)
        server.status = 503  # keeps answering, but with an error

        wait_until(lambda: scraper.report(server.endpoint) is None, message="a stale report")
        requests_when_stale = server.requests
        # Still tried: a replica that recovers gets fresh reports again.
        server.status = 200
        wait_for_report(scraper, server.endpoint)
    assert server.requests > requests_when_stale


def test_a_refused_target_goes_stale_too(make_scraper: MakeScraper):
    with MetricsServer(sglang_metrics(1, 2, 0.5)) as server:
        endpoint = server.endpoint
        scraper = make_scraper(endpoint, stale_after=0.5)
        wait_for_report(scraper, endpoint)
    # The port is closed now: connections are refused.

    wait_until(lambda: scraper.report(endpoint) is None, message="a stale report")


def test_a_hanging_target_does_not_hold_up_the_others(make_scraper: MakeScraper):
    page = sglang_metrics(1, 2, 0.5)
    with MetricsServer(page) as hanging, MetricsServer(page) as healthy:
        hanging.hang()
        # A 30 s timeout: the hung scrape stays in flight for the whole test.
        scraper = make_scraper(hanging.endpoint, healthy.endpoint, timeout=30.0, max_workers=2)

        wait_until(lambda: healthy.requests >= 10, message="ten scrapes of the healthy target")

        assert hanging.open_requests == 1
        # Skipped while in flight, not queued again behind itself.
        assert hanging.requests == 1
        assert scraper.report(hanging.endpoint) is None
        assert scraper.report(healthy.endpoint) is not None


def test_a_hanging_scrape_is_abandoned_at_the_timeout(make_scraper: MakeScraper):
    with MetricsServer(sglang_metrics(1, 2, 0.5)) as server:
        server.hang()
        scraper = make_scraper(server.endpoint, timeout=0.2)

        # A second request only comes once the first was given up on.
        wait_until(lambda: server.requests >= 2, message="the scrape to be retried")
        assert scraper.report(server.endpoint) is None


def test_a_trickling_target_is_cut_off_at_the_deadline(make_scraper: MakeScraper):
    """A server that sends a byte at a time never trips a per-read timeout; the total
    deadline must still end the scrape."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = threading.Event()
    cut_off = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        accepted.set()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        try:
            while True:
                conn.sendall(b"#")
                time.sleep(0.01)
        except OSError:
            cut_off.set()  # the scraper closed the connection
        finally:
            conn.close()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        make_scraper(endpoint, timeout=0.3)
        wait_until(cut_off.is_set, message="the scraper to hang up")
    finally:
        listener.close()
    assert accepted.is_set()


def test_removed_targets_are_dropped_and_no_longer_scraped(make_scraper: MakeScraper):
    page = vllm_metrics({"m": 1}, {"m": 1}, {"m": 0.5})
    with MetricsServer(page) as kept, MetricsServer(page) as removed:
        scraper = make_scraper(kept.endpoint, removed.endpoint)
        wait_for_report(scraper, kept.endpoint)
        wait_for_report(scraper, removed.endpoint)

        scraper.set_targets([kept.endpoint])
        assert scraper.report(removed.endpoint) is None
        requests_at_removal = removed.requests

        kept_requests = kept.requests
        wait_until(lambda: kept.requests >= kept_requests + 5, message="more scrapes")

        # At most the one scrape that was already in flight, and its result discarded.
        assert removed.requests <= requests_at_removal + 1
        assert scraper.report(removed.endpoint) is None


def test_ipv6_targets_are_scraped(make_scraper: MakeScraper):
    try:
        server = MetricsServer(sglang_metrics(5, 6, 0.5), host="::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        assert server.endpoint.startswith("[::1]:")
        scraper = make_scraper(server.endpoint)
        assert wait_for_report(scraper, server.endpoint).waiting == 5


def test_stop_returns_while_a_scrape_hangs():
    with MetricsServer(sglang_metrics(1, 2, 0.5)) as server:
        server.hang()
        scraper = LoadScraper(interval=0.05, timeout=30.0)
        scraper.set_targets([server.endpoint])
        scraper.start()
        wait_until(lambda: server.open_requests == 1, message="a hung scrape")

        scraper.stop()

        names = [thread.name for thread in threading.enumerate()]
        assert "extproc-scrape-scheduler" not in names


def test_a_scrape_cut_by_stop_logs_nothing(caplog: pytest.LogCaptureFixture):
    """A scrape still in flight when the scraper stops fails by its deadline afterwards; that is
    not a replica failing, and the process's logs may already be closed (at shutdown)."""
    with MetricsServer(sglang_metrics(1, 2, 0.5)) as server:
        server.hang()
        scraper = LoadScraper(interval=0.05, timeout=0.3)
        scraper.set_targets([server.endpoint])
        scraper.start()
        wait_until(lambda: server.open_requests == 1, message="a hung scrape")
        with caplog.at_level("DEBUG", logger="extproc.replicas"):
            scraper.stop()
            time.sleep(0.8)  # past the scrape's 0.3 s deadline: it has failed by now
        assert [r.getMessage() for r in caplog.records if "failed" in r.getMessage()] == []
