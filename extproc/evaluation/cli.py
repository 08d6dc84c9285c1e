"""``extproc eval``: routing quality and cost on labelled prompts, offline.

Prints a short report (never prompt text), writes the JSON summary (--out) and the plot (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from extproc.evaluation.data import DataError, load_examples
from extproc.evaluation.evaluate import DEFAULT_OUTPUT_TOKENS, DEFAULT_POINTS, Options, evaluate
from extproc.evaluation.knobs import KnobError
from extproc.evaluation.offline import EvalError
from extproc.policy import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extproc eval",
        description="Route labelled prompts offline with a policy, sweep one of its knobs, and report "
        "quality against cost (RouteLLM's APGR and CPT, savings, calibration) beside single-model, "
        "random and oracle baselines.",
    )
    p.add_argument("--config", type=Path, required=True, help="routing policy YAML")
    p.add_argument("--data", type=Path, required=True, help='JSONL: {"prompt" | "messages", "quality": {model: score}}')
    p.add_argument("--out", type=Path, help="write the JSON summary here")
    p.add_argument("--plot", type=Path, help="write the quality-cost PNG here (needs the 'plot' extra)")
    p.add_argument("--title", help="plot title")
    p.add_argument(
        "--sweep",
        metavar="PATH",
        help="the knob to sweep, e.g. 'decisions[hard].when.all[1].complexity.above' "
        "(default: the first complexity.above in the policy)",
    )
    p.add_argument("--values", help="comma-separated knob values (default for complexity: quantiles of the prompts')")
    p.add_argument("--points", type=int, default=DEFAULT_POINTS, help="default sweep points (default %(default)s)")
    p.add_argument(
        "--output-tokens",
        type=int,
        default=DEFAULT_OUTPUT_TOKENS,
        help="output tokens per answer for pricing, where a line has no tokens.output (default %(default)s)",
    )
    p.add_argument(
        "--target-quality",
        help="report the knob value that reaches this quality at least cost: absolute (0.62) or "
        "relative to the strong model (95%%)",
    )
    p.add_argument("--weak", help="reference weak model (default: the cheapest single model)")
    p.add_argument("--strong", help="reference strong model (default: the best single model)")
    p.add_argument(
        "--model-map",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="score policy model NAME with the data's quality KEY (repeatable; default: its name, else upstream_model)",
    )
    p.add_argument(
        "--header", "-H", action="append", default=[], metavar="NAME:VALUE", help="request header for every prompt"
    )
    return p


def _number(text: str) -> float | int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]  # `extproc eval -- --config ...`: the top-level parser keeps the separator
    args = _parser().parse_args(argv)
    try:
        options = Options(
            knob=args.sweep,
            values=[_number(v) for v in args.values.split(",") if v.strip()] if args.values else None,
            points=max(args.points, 3),
            output_tokens=args.output_tokens,
            target_quality=args.target_quality,
            weak=args.weak,
            strong=args.strong,
            model_map=dict(item.split("=", 1) for item in args.model_map),
            headers={k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in args.header)},
        )
        if options.target_quality is not None:
            float(options.target_quality.strip().rstrip("%"))
    except ValueError as exc:
        print(f"extproc eval: bad option value: {exc}", file=sys.stderr)
        return 2
    try:
        text = args.config.read_text(encoding="utf-8")
        examples = load_examples(args.data)
        summary = asyncio.run(evaluate(text, examples, options, source=str(args.config), base_dir=args.config.parent))
    except OSError as exc:
        print(f"extproc eval: cannot read {args.config}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, KnobError, EvalError) as exc:
        print(f"extproc eval: {exc}", file=sys.stderr)
        return 1
    summary["data"]["file"] = args.data.name
    summary["policy"]["file"] = str(args.config)
    if args.out:
        args.out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    if args.plot:
        from extproc.evaluation.plot import PlotUnavailableError, plot

        try:
            plot(summary, args.plot, args.title)
        except PlotUnavailableError as exc:
            print(f"extproc eval: {exc}", file=sys.stderr)
            return 1
    print(report(summary))
    return 0


def report(summary: dict[str, Any]) -> str:
    """A few lines for the terminal: baselines, the current setting, the metrics."""

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{v:6.1%}"

    lines = [f"{summary['data']['prompts']} prompts; cost in {summary['costing']['unit']}"]
    ref = summary["reference"]
    lines.append(f"{'':2}{'model':34} {'quality':>8} {'cost':>9}")
    for name, m in summary["models"].items():
        tag = " (weak)" if name == ref["weak"] else " (strong)" if name == ref["strong"] else ""
        lines.append(f"  {(name + tag)[:34]:34} {m['quality']:8.4f} {m['cost_per_1k']:9.4f}")
    oracle = summary["baselines"]["oracle"]
    lines.append(f"  {'oracle (cheapest best model)':34} {oracle['quality']:8.4f} {oracle['cost_per_1k']:9.4f}")
    op = summary["operating_point"]
    lines.append(
        f"  {'policy as configured':34} {op['quality']:8.4f} {op['cost_per_1k']:9.4f}"
        f"   saves {pct(op['saving_vs_strong'])} vs strong"
    )
    m = summary["metrics"]
    apgr = "—" if m["apgr"] is None else f"{m['apgr']:.4f}"
    lines.append(
        f"sweep {summary['sweep']['knob']} ({len(summary['sweep']['points'])} values): "
        f"APGR {apgr}  CPT(50%) {pct(m['cpt50']).strip()}  CPT(80%) {pct(m['cpt80']).strip()}  [x: {m['axis']}]"
    )
    saving = m.get("saving_at_95pct_strong")
    if saving and saving["saving"] is not None:
        setting = saving["setting"]
        at = f"; best swept value {setting['value']} saves {pct(setting['saving']).strip()}" if setting else ""
        lines.append(f"saving at 95% of the strong model's quality: {pct(saving['saving']).strip()}{at}")
    cal = summary.get("calibration")
    if cal:
        if cal["value"] is None:
            lines.append(f"calibration for {cal['target']}: {cal['note']}")
        else:
            lines.append(
                f"calibration for {cal['target']} (quality ≥ {cal['target_quality']:.4f}): "
                f"use {cal['value']} → quality {cal['quality']:.4f}, saves {pct(cal['saving_vs_strong']).strip()}"
            )
    return "\n".join(lines)
