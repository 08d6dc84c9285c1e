"""Do conversations keep their model? Switches per session and the cache hits they cost.

    python bench/session_switch.py                 # the bundled policy, encoder included (~5 min)
    python bench/session_switch.py --rules         # its rule decisions only (seconds)
    python bench/session_switch.py --quick         # CI smoke

Replays multi-turn conversations through the package's own Router (``Router.route``, no server;
the encoder loads as ``extproc eval`` loads it, without deadlines): each session is 2-10 turns
whose user messages are prompts of the dcrouter train split
(``../shared/data/llmrouter_dcrouter/train.json.gz``: code, math, reasoning and chat, mixed),
drawn at random, with synthetic answers of 300-1,200 characters. The policy is the bundled one
(``extproc/policy/default.yaml``: premium tier, code keywords, long context, hard STEM by domain
and complexity, PII reroute), or with ``--rules`` only its keyword and token rules, under three
settings:

* before: ``sessions: {keep_model: false}``, every turn routed on its own;
* after: the default, a conversation keeps its model;
* after, with ``code`` marked ``switch: always``: a conversation may move up to the large model
  when code appears, never back (the default decision may not switch it). (Marking
  ``long-context`` changes nothing here: no replayed conversation reaches 3,000 tokens.)

Cache cost: each model is assumed to keep every prefix it was sent (an unbounded cache, so only
switching loses hits): a turn's cached tokens are the longest earlier prompt of the same
conversation on the same model; a switch loses what the previous model held. Tokens are
characters / 4.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import statistics
import sys
from pathlib import Path

import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.evaluation.offline import OfflineRouter
from extproc.policy.load import parse_policy
from extproc.router import Call

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llmrouter_dcrouter" / "train.json.gz"

BUNDLED = Path(__file__).resolve().parents[1] / "extproc" / "policy" / "default.yaml"


def policy_text(setting: str, rules_only: bool) -> str:
    data = yaml.safe_load(BUNDLED.read_text())
    for model in data["models"].values():
        model.pop("replicas", None)  # the replay needs the model only
    if rules_only:
        data.pop("pii", None)
        data["decisions"] = [d for d in data["decisions"] if d["name"] in ("code", "long-context")]
    if setting == "before":
        data["sessions"] = {"keep_model": False}
    elif setting == "switch":
        next(d for d in data["decisions"] if d["name"] == "code")["switch"] = "always"
    return yaml.safe_dump(data)


def prompts(limit: int | None) -> list[str]:
    with gzip.open(DATA) as f:
        rows = json.load(f)
    texts = [r["question"] for r in rows if isinstance(r.get("question"), str)]
    return texts[:limit] if limit else texts


async def replay(text: str, sessions: list[list[tuple[str, str]]]) -> dict[str, float]:
    policy = parse_policy(text, "bench")
    router = (await OfflineRouter.start(policy)).router
    switches, turns, cached, prompt_tokens, lost = [], 0, 0, 0, 0
    for n, session in enumerate(sessions):
        history: list[dict[str, str]] = []
        on_model: dict[str, int] = {}  # model -> tokens of the longest prompt it was sent
        previous, count = None, 0
        for question, answer in session:
            history.append({"role": "user", "content": question})
            body = orjson.dumps({"model": "auto", "messages": history})
            routed = await router.route(Call("POST", "/v1/chat/completions", {"x-session-id": f"s{n}"}, body))
            tokens = sum(len(m["content"]) for m in history) // 4
            hit = min(on_model.get(routed.model, 0), tokens)
            if previous is not None and routed.model != previous:
                count += 1
                lost += min(on_model.get(previous, 0), tokens) - hit
            cached += hit
            prompt_tokens += tokens
            on_model[routed.model] = max(on_model.get(routed.model, 0), tokens)
            previous = routed.model
            turns += 1
            history.append({"role": "assistant", "content": answer})
        switches.append(count)
    return {
        "sessions": len(sessions),
        "turns": turns,
        "switches_per_session": statistics.fmean(switches),
        "sessions_switched": sum(1 for c in switches if c) / len(switches),
        "hit_rate": cached / prompt_tokens,
        "tokens_lost_per_switch": lost / max(1, sum(switches)),
        "lost_share": lost / prompt_tokens,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 sessions, rules only")
    parser.add_argument("--rules", action="store_true", help="the bundled policy's rule decisions only")
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    n = 100 if args.quick else args.sessions
    args.rules = args.rules or args.quick
    rng = random.Random(args.seed)
    pool = prompts(2000 if args.quick else None)
    sessions = []
    for _ in range(n):
        turns = rng.randint(2, 10)
        sessions.append(
            [
                (rng.choice(pool), " ".join(rng.choices(("yes", "so", "the", "answer", "is"), k=rng.randint(60, 240))))
                for _ in range(turns)
            ]
        )
    settings = [
        ("before: every turn on its own", "before"),
        ("after: keep the model", "after"),
        ("after, code may switch (up only)", "switch"),
    ]
    which = "rule decisions of the bundled policy" if args.rules else "the bundled policy, encoder included"
    print(f"# {n} sessions ({sum(map(len, sessions))} turns), seed {args.seed}, prompts from {DATA.name}; {which}")
    print(
        f"{'setting':<34} {'switches/session':>16} {'sessions switched':>17} {'hit rate':>8} {'lost/switch':>11} {'lost share':>10}"
    )
    for label, setting in settings:
        r = asyncio.run(replay(policy_text(setting, args.rules), sessions))
        print(
            f"{label:<34} {r['switches_per_session']:>16.2f} {r['sessions_switched']:>17.1%} {r['hit_rate']:>8.1%} "
            f"{r['tokens_lost_per_switch']:>11.0f} {r['lost_share']:>10.1%}",
            flush=True,
        )


if __name__ == "__main__":
    main()
