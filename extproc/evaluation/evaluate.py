"""One evaluation: decide every prompt at the policy's setting and along a swept knob, price
and score the decisions, and summarize them against the baselines.

The summary is plain JSON (numbers, model and decision names, the knob path) and never holds
prompt text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extproc.evaluation import curves, knobs
from extproc.evaluation.baselines import Single, Table, oracle, reference_pair, share_oracle, singles
from extproc.evaluation.data import DataError, Example
from extproc.evaluation.offline import EvalError, OfflineRouter, Outcome, TextClassifier
from extproc.heads import Head
from extproc.policy import Policy, parse_policy

DEFAULT_OUTPUT_TOKENS = 256
DEFAULT_POINTS = 41
QUALITY_SHARE = 0.95  # "the cost saving at 95% of the strong model's quality"
ORACLE_CURVE_POINTS = 200  # kept in the summary for the plot


@dataclass
class Options:
    knob: str | None = None  # default: the first complexity.above in the policy
    values: Sequence[float] | None = None  # default: quantiles of the prompts' complexity
    points: int = DEFAULT_POINTS
    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    target_quality: str | None = None  # "0.62" (absolute) or "95%" (of the strong model's quality)
    weak: str | None = None
    strong: str | None = None
    model_map: Mapping[str, str] = field(default_factory=dict)  # policy model -> quality key
    headers: Mapping[str, str] = field(default_factory=dict)


async def evaluate(
    policy_text: str,
    examples: Sequence[Example],
    options: Options | None = None,
    *,
    source: str = "<policy>",
    classifier: TextClassifier | None = None,
    base_dir: Path | None = None,
) -> dict[str, Any]:
    """The summary of routing ``examples`` with the policy and its swept knob."""
    options = options or Options()
    policy = parse_policy(policy_text, source, base_dir)
    data = yaml.safe_load(policy_text)
    offline = await OfflineRouter.start(policy, headers=options.headers, classifier=classifier)
    try:
        keys = _quality_keys(policy, examples, options.model_map)
        table, measured_input = _price(policy, examples, keys, offline, options.output_tokens)
        current = await offline.decide(examples)

        knob = options.knob or knobs.default_knob(data)
        current_value = knobs.get(data, knob)
        if isinstance(current_value, bool) or not isinstance(current_value, int | float):
            raise knobs.KnobError(f"knob {knob} is {current_value!r}, not a number")
        values = (
            list(options.values)
            if options.values
            else default_values(knob, offline.complexities(_knob_head(policy, data, knob)), options.points)
        )
        # The current setting is decided on its own (the operating point); keeping it out of the
        # sweep keeps APGR and CPT a property of the signals and the data, not of where the knob sits.
        values = sorted(set(values))
        sweep = []
        for value in values:
            text = knobs.dump(knobs.replaced(data, knob, value))
            offline.use(parse_policy(text, f"{source} with {knob} = {value}", base_dir))
            sweep.append((value, await offline.decide(examples)))
        classified = offline.classified_texts
    finally:
        await offline.aclose()
    return _summary(policy, table, keys, current, knob, current_value, sweep, options, measured_input, classified)


def _knob_head(policy: Policy, data: Any, knob: str) -> Head | None:
    """The fitted head a complexity knob's condition reads, if it names one."""
    if not knob.endswith(("complexity.above", "complexity.below")):
        return None
    condition = knobs.get(data, knob.rsplit(".", 1)[0])
    name = condition.get("head") if isinstance(condition, dict) else None
    return policy.heads.get(name) if name else None


def default_values(knob: str, complexities: Sequence[float], points: int) -> list[float]:
    """Thresholds spread like the prompts' complexity (equal shares of prompts between
    neighbours, as RouteLLM's quantile thresholds), plus both ends."""
    if knob.endswith(("complexity.above", "complexity.below")):
        if not complexities:
            return [i / (points - 1) for i in range(points)]
        c = sorted(complexities)
        quantiles = [c[round(i * (len(c) - 1) / (points - 1))] for i in range(points)]
        return sorted({0.0, 1.0, *quantiles})
    if knob.endswith("min_probability"):
        return [i / (points - 1) for i in range(points)]
    raise knobs.KnobError(f"no default values for knob {knob}; give them with --values, e.g. --values 0.2,0.4,0.6")


def _quality_keys(policy: Policy, examples: Sequence[Example], model_map: Mapping[str, str]) -> dict[str, str]:
    """Policy model -> the key of its scores in the data: --model-map, else its name, else its
    upstream model. Only priced models scored on every line are evaluated."""
    for name in model_map:
        if name not in policy.models:
            raise DataError(f"--model-map names {name!r}, which is not a model of the policy")
    labelled = set.intersection(*(set(e.quality) for e in examples))
    keys: dict[str, str] = {}
    for name, model in policy.models.items():
        for key in (model_map.get(name), name, model.upstream_model):
            if key is not None and key in labelled:
                if model.pricing is None:
                    raise DataError(
                        f"model {name!r} has quality labels but no pricing in the policy; add models.{name}.pricing"
                    )
                keys[name] = key
                break
    if not keys:
        seen = sorted(set().union(*(set(e.quality) for e in examples)))
        raise DataError(
            f"no model of the policy ({', '.join(policy.models)}) has a quality on every line; the data scores: "
            f"{', '.join(seen[:20])}. Name models (or upstream_model) like the data, or use --model-map NAME=KEY"
        )
    return keys


def _price(
    policy: Policy, examples: Sequence[Example], keys: Mapping[str, str], offline: OfflineRouter, output_tokens: int
) -> tuple[Table, int]:
    quality, cost = [], []
    measured = 0
    for e in examples:
        tokens_in = e.input_tokens
        if tokens_in is None:
            tokens_in = offline.input_tokens(e)
            measured += 1
        tokens_out = e.output_tokens if e.output_tokens is not None else output_tokens
        quality.append({m: e.quality[k] for m, k in keys.items()})
        cost.append({m: policy.models[m].pricing.cost(tokens_in, tokens_out) for m in keys})  # type: ignore[union-attr]
    return Table(tuple(keys), quality, cost), measured


@dataclass(frozen=True, slots=True)
class _Point:
    quality: float
    cost: float
    shares: dict[str, float]  # model (or "rejected") -> share of prompts
    decisions: dict[str, int]


def _score(table: Table, outcomes: Sequence[Outcome]) -> _Point:
    n = len(table)
    quality = cost = 0.0
    models: Counter[str] = Counter()
    for i, outcome in enumerate(outcomes):
        if outcome.model is None:
            models["rejected"] += 1  # the router answered itself: no answer, no cost
            continue
        if outcome.model not in table.quality[i]:
            raise EvalError(
                f"the router chose model {outcome.model!r}, which has no quality on every line "
                "(or no pricing); label it in the data or map it with --model-map"
            )
        models[outcome.model] += 1
        quality += table.quality[i][outcome.model]
        cost += table.cost[i][outcome.model]
    decisions = Counter(o.decision for o in outcomes)
    return _Point(quality / n, cost / n, {m: c / n for m, c in sorted(models.items())}, dict(sorted(decisions.items())))


def _summary(
    policy: Policy,
    table: Table,
    keys: Mapping[str, str],
    current: Sequence[Outcome],
    knob: str,
    current_value: float,
    sweep: Sequence[tuple[float, Sequence[Outcome]]],
    options: Options,
    measured_input: int,
    classified: int,
) -> dict[str, Any]:
    single = singles(table)
    for name in (options.weak, options.strong):
        if name is not None and name not in single:
            raise DataError(f"--weak/--strong {name!r} is not an evaluated model; evaluated: {', '.join(single)}")
    weak, strong = reference_pair(single, options.weak, options.strong)
    w, s = single[weak], single[strong]
    op = _score(table, current)
    points = [(value, _score(table, outcomes)) for value, outcomes in sweep]

    def normalized_cost(cost: float) -> float:
        return (cost - w.cost) / (s.cost - w.cost)

    def share_of(p: _Point) -> float:
        return p.shares.get(strong, 0.0)

    gap = s.quality != w.quality
    cost_axis = gap and s.cost != w.cost
    two_models = all(set(p.shares) <= {weak, strong} for _, p in points)
    axes: dict[str, Any] = {}
    if gap and two_models:
        axes["strong_call_share"] = _axis_metrics([(share_of(p), p.quality) for _, p in points], w, s)
    if cost_axis:
        axes["normalized_cost"] = _axis_metrics([(normalized_cost(p.cost), p.quality) for _, p in points], w, s)
    headline_axis = next(iter(axes), None)

    best = oracle(table)
    oracle_summary: dict[str, Any] = {
        "quality": best.quality,
        "cost_per_1k": best.cost * 1000,
        "saving_vs_strong": 1 - best.cost / s.cost if s.cost else None,
        "apgr": {},
    }
    if gap and two_models and set(table.models) == {weak, strong}:
        oracle_summary["apgr"]["strong_call_share"] = curves.apgr(
            share_oracle(table, weak, strong), w.quality, s.quality
        )
    if cost_axis:
        oracle_summary["apgr"]["normalized_cost"] = curves.apgr(
            [(normalized_cost(c), q) for c, q in best.cost_curve], w.quality, s.quality
        )

    summary: dict[str, Any] = {
        "data": {
            "prompts": len(table),
            "evaluated_models": list(table.models),
            # policy models without a price or without a score on every line
            "not_evaluated": sorted(set(policy.models) - set(table.models)),
        },
        "policy": {"digest": policy.digest[:16], "default_model": policy.default_model},
        "costing": {
            "unit": "USD per 1,000 prompts",
            "input_tokens": "the router's token counter, unless a line gives tokens.input",
            "lines_counted_by_router": measured_input,
            "output_tokens_assumed": options.output_tokens,
        },
        "models": {
            m: {
                "data_key": keys[m],
                "pricing": {
                    "input_per_million": policy.models[m].pricing.input_per_million,  # type: ignore[union-attr]
                    "output_per_million": policy.models[m].pricing.output_per_million,  # type: ignore[union-attr]
                },
                "quality": single[m].quality,
                "cost_per_1k": single[m].cost * 1000,
            }
            for m in table.models
        },
        "reference": {
            "weak": weak,
            "strong": strong,
            "rule": "weak: the cheapest single model; strong: the best single model (cheaper on ties)"
            if not (options.weak or options.strong)
            else "named with --weak/--strong",
        },
        "operating_point": _point_summary(op, w, s, strong, knob_value=current_value) | {"decisions": op.decisions},
        "sweep": {
            "knob": knob,
            "current": current_value,
            "points": [_point_summary(p, w, s, strong, knob_value=v) for v, p in points],
        },
        "metrics": {
            "axis": headline_axis,
            **(axes[headline_axis] if headline_axis else {"apgr": None, "cpt50": None, "cpt80": None}),
            "by_axis": axes,
            "saving_at_95pct_strong": _saving(points, w, s) if cost_axis else None,
        },
        "baselines": {
            "random": {"apgr": 0.5, "line": "straight from always-weak to always-strong"},
            "oracle": oracle_summary,
            "oracle_cost_curve": [[c * 1000, q] for c, q in _thin(best.cost_curve, ORACLE_CURVE_POINTS)],
        },
        "calibration": _calibrate(options.target_quality, points, s) if options.target_quality else None,
        "classifier": {"texts_classified": classified},
    }
    return _rounded(summary)


def _axis_metrics(curve: list[tuple[float, float]], w: Single, s: Single) -> dict[str, Any]:
    return {
        "apgr": curves.apgr(curve, w.quality, s.quality),
        "cpt50": curves.cpt(curve, w.quality, s.quality, 0.5),
        "cpt80": curves.cpt(curve, w.quality, s.quality, 0.8),
    }


def _point_summary(p: _Point, w: Single, s: Single, strong: str, *, knob_value: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "value": knob_value,
        "quality": p.quality,
        "cost_per_1k": p.cost * 1000,
        "saving_vs_strong": 1 - p.cost / s.cost if s.cost else None,
        "strong_share": p.shares.get(strong, 0.0),
        "shares": p.shares,
    }
    if s.quality != w.quality:
        out["pgr"] = curves.pgr(p.quality, w.quality, s.quality)
    if s.cost != w.cost:
        x = (p.cost - w.cost) / (s.cost - w.cost)
        out["random_quality_at_same_cost"] = curves.random_quality(min(max(x, 0.0), 1.0), w.quality, s.quality)
    return out


def _saving(points: Sequence[tuple[float, _Point]], w: Single, s: Single) -> dict[str, Any]:
    """The least cost reaching 95% of the strong model's quality: on the anchored curve, and at
    the cheapest swept setting that reaches it on its own."""
    target = QUALITY_SHARE * s.quality
    span = s.cost - w.cost
    curve = [((p.cost - w.cost) / span, p.quality) for _, p in points]
    x = curves.least_x_reaching(curves.anchored(curve, w.quality, s.quality), target)
    cost = None if x is None else w.cost + x * span
    reaching = [(v, p) for v, p in points if p.quality >= target]
    setting = None
    if reaching:
        v, p = min(reaching, key=lambda vp: (vp[1].cost, -vp[1].quality))
        setting = {"value": v, "quality": p.quality, "cost_per_1k": p.cost * 1000, "saving": 1 - p.cost / s.cost}
    return {
        "quality_target": target,
        "cost_per_1k": None if cost is None else cost * 1000,
        "saving": None if cost is None else 1 - cost / s.cost,
        "setting": setting,
    }


def _calibrate(target_text: str, points: Sequence[tuple[float, _Point]], s: Single) -> dict[str, Any]:
    """The cheapest swept knob value whose quality reaches the target, on this data."""
    text = target_text.strip()
    target = float(text[:-1]) / 100 * s.quality if text.endswith("%") else float(text)
    reaching = [(v, p) for v, p in points if p.quality >= target]
    out: dict[str, Any] = {"target": text, "target_quality": target}
    if not reaching:
        best = max(p.quality for _, p in points)
        return out | {"value": None, "note": f"no swept value reaches it; the best reaches {best:.4f}"}
    v, p = min(reaching, key=lambda vp: (vp[1].cost, -vp[1].quality))
    return out | {
        "value": v,
        "quality": p.quality,
        "cost_per_1k": p.cost * 1000,
        "saving_vs_strong": 1 - p.cost / s.cost if s.cost else None,
        "note": "chosen on this data; confirm on prompts it was not chosen on",
    }


def _thin(points: list[tuple[float, float]], keep: int) -> list[tuple[float, float]]:
    if len(points) <= keep:
        return points
    step = (len(points) - 1) / (keep - 1)
    return [points[round(i * step)] for i in range(keep)]


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value
