"""The picker built from a policy picks exactly as recorded: the same replicas in the same order
and the same scores, over a fixed sequence of conversations, loads, scraped reports and KV-event
holdings. The recordings (tests/unit/data/picks_*.json) were made with the picker as it stood
before the plugins were registered by name (commit "tests: record the default policy's picks"),
so refactoring the picker cannot change a pick unnoticed.

Re-record only for an intended change of picking behaviour: ``python tests/unit/test_picks_recorded.py``."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from extproc.policy import load_policy, parse_policy
from extproc.policy.config import Policy
from extproc.replicas.kvindex import Mode
from extproc.replicas.load import LoadTracker
from extproc.replicas.picking import PickRequest, build_picker
from extproc.replicas.prefix import PrefixIndex, block_hashes
from extproc.replicas.scrape import LoadReport

DATA = Path(__file__).parent / "data"
ENDPOINTS = tuple(f"10.0.0.{i}:8000" for i in range(1, 6))
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
]

# Policies whose picks are recorded: the bundled default, and today's `weights:` spelling of
# every scorer (`leader` included) with the load-bound settings changed.
POLICIES = {
    "default": None,
    "weights": """\
version: 1
default_model: m
models: {m: {}}
picking:
  weights: {prefix: 2, kv_cache: 4, load: 3, session: 1, leader: 5}
  load_bound: 0.25
  sticky_load_bound: null
  sticky_move_blocks: null
  load_floor: 1
  fallbacks: 3
""",
}


def _policy(name: str) -> Policy:
    text = POLICIES[name]
    return load_policy() if text is None else parse_policy(text)


def replay(policy: Policy, seed: int = 7, steps: int = 400) -> list[dict[str, Any]]:
    """A fixed sequence of picks: conversations growing turn by turn (some with a session id,
    some sharing a system prompt), leases held and released, scraped load reports, and for some
    requests the replicas' KV-event holdings."""
    rng = random.Random(seed)
    settings = policy.picking
    tracker, index = LoadTracker(), PrefixIndex(settings.index_blocks)
    reports: dict[str, LoadReport] = {}
    picker = build_picker(settings, tracker, index, reports.get)
    systems = [" ".join(rng.choices(WORDS, k=rng.randint(60, 300))) for _ in range(3)]
    conversations: list[tuple[str | None, str]] = []
    leases = []
    out = []
    for step in range(steps):
        if not conversations or rng.random() < 0.2:
            session = f"s{step}" if rng.random() < 0.6 else None
            conversations.append((session, rng.choice(systems)))
        i = rng.randrange(len(conversations))
        session, text = conversations[i]
        text += " " + " ".join(rng.choices(WORDS, k=rng.randint(20, 200)))
        conversations[i] = (session, text)
        blocks = block_hashes("m", text, settings.block_chars)
        held = None
        if rng.random() < 0.3:
            held = {
                e: (round(rng.random(), 3), Mode.EXACT if rng.random() < 0.7 else Mode.APPROXIMATE) for e in ENDPOINTS
            }
        if rng.random() < 0.2:
            e = rng.choice(ENDPOINTS)
            reports[e] = LoadReport(rng.choice([None, rng.randint(0, 8)]), None, rng.random(), 0.0)
        pick = picker.pick(PickRequest("m", blocks, session, held=held), ENDPOINTS, explain=True)
        assert pick is not None
        index.record(pick.endpoints[0], blocks)
        leases.append(tracker.acquire(pick.endpoints[0], "m"))
        while leases and rng.random() < 0.45:
            tracker.release(leases.pop(rng.randrange(len(leases))))
        out.append({"endpoints": list(pick.endpoints), "scores": pick.scores})
    return out


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_picks_are_identical_to_the_recording(name: str) -> None:
    recorded = json.loads((DATA / f"picks_{name}.json").read_text())
    picks = json.loads(json.dumps(replay(_policy(name))))
    assert len(picks) == len(recorded)
    for step, (got, want) in enumerate(zip(picks, recorded, strict=True)):
        assert got["endpoints"] == want["endpoints"], f"step {step}"
        assert got["scores"] == want["scores"], f"step {step}"


def test_the_recording_is_not_trivial() -> None:
    # Every replica gets picks, and the picks change with the settings: the replay can fail.
    default, weights = (json.loads((DATA / f"picks_{n}.json").read_text()) for n in ("default", "weights"))
    assert {p["endpoints"][0] for p in default} == set(ENDPOINTS)
    assert [p["endpoints"] for p in default] != [p["endpoints"] for p in weights]


if __name__ == "__main__":
    DATA.mkdir(exist_ok=True)
    for policy_name in POLICIES:
        path = DATA / f"picks_{policy_name}.json"
        path.write_text(json.dumps(replay(_policy(policy_name)), indent=None, separators=(",", ":")) + "\n")
        print(f"wrote {path}", file=sys.stderr)
