"""Smoke test of bench/affinity_sim.py's quick mode: structural properties that hold on the seeded
workload whatever the machine (the simulation has no wall-clock input, so no timing asserts)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "affinity_sim.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("affinity_sim", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["affinity_sim"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["affinity_sim"]


@pytest.fixture(scope="module")
def results(sim):
    out = sim.main(["--quick"])
    return {(r.policy, r.replicas): r for r in out}


SIZES = (4, 8, 16)
POLICIES = ("round-robin", "random", "least-loaded", "ring (session)", "ours")


def test_quick_mode_runs_every_policy_at_every_size(results) -> None:
    assert set(results) == {(p, n) for p in POLICIES for n in SIZES}


def test_every_request_completes_and_in_flight_returns_to_zero(results) -> None:
    for r in results.values():
        assert r.completed == r.total > 0, r
        assert 0 < r.counted < r.total  # the warm-up is not counted
        assert r.inflight_left == 0, r
        assert r.leases_left == 0, r  # our LoadTracker: no open lease, no in-flight count left


def test_ours_hits_the_kv_cache_more_than_random_and_round_robin(results) -> None:
    for n in SIZES:
        ours = results["ours", n].hit_rate
        assert ours > results["random", n].hit_rate
        assert ours > results["round-robin", n].hit_rate


def test_ours_bounds_load_better_than_random_and_the_unbounded_ring(results) -> None:
    for n in SIZES:
        ours = results["ours", n].max_mean
        assert ours < results["random", n].max_mean
        assert ours < results["ring (session)", n].max_mean


def test_figures_are_well_formed(results) -> None:
    for r in results.values():
        assert 0.0 <= r.hit_rate <= 1.0
        assert 0.0 < r.ttft_p50 <= r.ttft_p99
        assert r.max_mean >= 1.0


def test_a_seed_gives_the_same_figures_twice(sim) -> None:
    workload = sim.Workload(duration=100.0, warmup=20.0)
    settings = sim.PickingSettings()
    a, b = (sim.simulate(sim.Ours(4, settings), 4, workload, sim.Replica()) for _ in range(2))
    assert (a.hit_rate, a.ttft_p50, a.ttft_p99, a.max_mean) == (b.hit_rate, b.ttft_p50, b.ttft_p99, b.max_mean)


def test_no_policy_beats_the_bounds_on_the_hit_rate(sim) -> None:
    """bounds(): every block ever stored staying cached >= Belady over the pooled caches >= what
    any placement reaches, events and three routers included; and the pooled LRU is below Belady."""
    workload = sim.Workload(duration=160.0, warmup=60.0, rate_per_replica=7.0)
    replica = sim.Replica(kv_blocks=600)  # small caches, so that evictions bind
    settings = sim.PickingSettings()
    ceiling = sim.bounds(workload, 4, replica)
    assert ceiling["infinite"] >= ceiling["Belady"] > ceiling["pooled LRU"]
    for policy in (sim.Ring(4, 1), sim.Ours(4, settings, events=True), sim.Ours(4, settings, routers=3, events=True)):
        result = sim.simulate(policy, 4, workload, replica, profile=True)
        assert result.hit_rate <= ceiling["Belady"], policy.name
        # The profile accounts for every prompt block: hit, or lost in one of the listed ways.
        misses = result.misses
        assert misses is not None and misses["blocks"] == misses["hit"] + sum(misses[k] for k in sim.MISSES)


def test_with_events_the_decode_blocks_continue_their_requests_chains(sim) -> None:
    workload = sim.Workload(duration=120.0, warmup=40.0)
    policy = sim.Ours(4, sim.PickingSettings(), routers=3, events=True)
    sim.simulate(policy, 4, workload, sim.Replica())
    for router in policy.routers:
        peers = router.peers
        assert peers.continued > 2 * peers.started  # several decode blocks per request, none a new one
        assert peers.foreign > peers.own > 0  # two thirds of the starts are the others'
        assert peers.foreign < 2.2 * peers.own
