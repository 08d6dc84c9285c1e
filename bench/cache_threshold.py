"""Pick the semantic cache's default threshold from data: hit rate and false-hit rate on the
paraphrase set (bench/cache_paraphrases.py), with the shipped encoder's sentence embedding.

The threshold is the lowest similarity (in steps of 0.005) at which the false-hit rate on the
pick half is at most the target (1%); the check half, whose templates the pick never saw, shows
whether it holds. A false hit is a look-alike pair (another entity, number, negation or order)
at or above the threshold; a hit is a paraphrase pair at or above it.

    python bench/cache_threshold.py [--target 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cache_paraphrases import Pair, pairs

from extproc.cache import guards
from extproc.classifier import Classifier


def similarities(classifier: Classifier, items: list[Pair]) -> np.ndarray:
    texts = sorted({t for p in items for t in (p.a, p.b)})
    vectors = dict(zip(texts, classifier.embed(texts), strict=True))
    return np.array([float(vectors[p.a] @ vectors[p.b]) for p in items])


def allowed(items: list[Pair], mode: str) -> np.ndarray:
    """Which pairs the cache's exact checks let through (extproc/cache/guards.py): all of them
    for mode 'cosine'; same markers for 'markers'; and no look-alike wording for 'guards'."""
    out = []
    for p in items:
        ok = True
        if mode in ("markers", "guards"):
            ok = guards.markers(p.a) == guards.markers(p.b)
        if ok and mode == "guards":
            ok = not guards.lookalike(guards.words(p.a), guards.words(p.b))
        out.append(ok)
    return np.array(out)


def rates(items: list[Pair], sims: np.ndarray, threshold: float, mode: str = "guards") -> tuple[float, float]:
    same = np.array([p.same for p in items])
    hits = (sims >= threshold) & allowed(items, mode)
    return float(hits[same].mean()), float(hits[~same].mean())


def pick(items: list[Pair], sims: np.ndarray, target: float, mode: str = "guards") -> float:
    for threshold in np.arange(0.5, 1.0001, 0.005):
        if rates(items, sims, threshold, mode)[1] <= target:
            return round(float(threshold), 3)
    return 1.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.01, help="false-hit rate to stay under (default 1%%)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    classifier = Classifier.load(threads=min(2, os.cpu_count() or 1))
    items = pairs()
    sims = similarities(classifier, items)
    halves = {h: [i for i, p in enumerate(items) if p.half == h] for h in ("pick", "check")}
    pick_items = [items[i] for i in halves["pick"]]
    print(f"CPU: {cpu_name()}; {len(items)} pairs ({sum(p.same for p in items)} paraphrases)")
    report: dict = {"cpu": cpu_name(), "target": args.target, "modes": {}}
    for mode in ("cosine", "markers", "guards"):
        threshold = pick(pick_items, sims[halves["pick"]], args.target, mode)
        print(f"\n[{mode}] picked threshold (pick half, false hits <= {args.target:.1%}): {threshold}")
        print(f"{'threshold':>9} {'half':>5} {'hit rate':>9} {'false hits':>10}  false hits by kind")
        sweep = []
        for t in sorted({0.8, 0.85, 0.9, 0.935, 0.95, threshold}):
            for half, index in halves.items():
                sub = [items[i] for i in index]
                s = sims[index]
                hit, false = rates(sub, s, t, mode)
                ok = allowed(sub, mode)
                kinds = collections.defaultdict(list)
                for p, v, a in zip(sub, s, ok, strict=True):
                    if not p.same:
                        kinds[p.kind].append(bool(v >= t and a))
                by_kind = {k: round(float(np.mean(v)), 3) for k, v in sorted(kinds.items())}
                print(f"{t:9.3f} {half:>5} {hit:9.1%} {false:10.1%}  {by_kind}")
                sweep.append({"threshold": t, "half": half, "hit_rate": hit, "false_hit_rate": false, **by_kind})
        report["modes"][mode] = {"threshold": threshold, "sweep": sweep}
    ok = allowed(items, "guards")
    passing = [(float(v), p) for p, v, a in zip(items, sims, ok, strict=True) if not p.same and a and v >= 0.85]
    for v, p in sorted(passing, key=lambda x: -x[0])[:12]:
        print(f"  look-alike through the guards at {v:.3f} ({p.kind}): {p.a!r} / {p.b!r}")
    same = np.array([p.same for p in items])
    print(f"similarity medians: paraphrases {np.median(sims[same]):.3f}, look-alikes {np.median(sims[~same]):.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
