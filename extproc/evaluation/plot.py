"""The cost-quality plot of one summary (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailableError(RuntimeError):
    pass


def _short(name: str, limit: int = 32) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def plot(summary: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """Quality against cost: the swept policy, each single model, random, the oracle, the
    current setting and the 95%-of-strong line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailableError("plotting needs matplotlib: pip install 'extproc[plot]'") from exc

    models = summary["models"]
    weak, strong = summary["reference"]["weak"], summary["reference"]["strong"]
    sweep = summary["sweep"]
    op = summary["operating_point"]
    metrics = summary["metrics"]
    baselines = summary["baselines"]

    fig, ax = plt.subplots(figsize=(11, 6), dpi=100)
    # oracle: the best any router could do at each budget, and its end point
    curve = baselines["oracle_cost_curve"]
    ax.plot(
        [c for c, _ in curve], [q for _, q in curve], ":", color="tab:green", lw=2, label="oracle (best at each cost)"
    )
    oracle = baselines["oracle"]
    ax.plot(
        oracle["cost_per_1k"], oracle["quality"], "P", color="tab:green", ms=10, label="oracle: cheapest best model"
    )
    # random: the straight line between weak and strong
    w, s = models[weak], models[strong]
    ax.plot(
        [w["cost_per_1k"], s["cost_per_1k"]],
        [w["quality"], s["quality"]],
        "--",
        color="0.45",
        lw=1.5,
        label=f"random ({_short(weak, 16)} ↔ {_short(strong, 16)})",
    )
    # the policy along its knob
    points = sorted(sweep["points"], key=lambda p: p["cost_per_1k"])
    ax.plot(
        [p["cost_per_1k"] for p in points],
        [p["quality"] for p in points],
        "-o",
        color="tab:blue",
        ms=3.5,
        lw=2,
        label=f"policy, swept: {_knob_label(sweep['knob'])}",
    )
    # each single model (named once the axis limits are known)
    for name, m in models.items():
        ax.plot(m["cost_per_1k"], m["quality"], "s", color=_model_color(name, weak, strong), ms=7, zorder=4)
    ax.plot([], [], "s", color="black", ms=7, label="single models (black: weak, strong)")
    # 95% of the strong model's quality
    saving = metrics.get("saving_at_95pct_strong")
    if saving:
        ax.axhline(
            saving["quality_target"], color="tab:red", lw=1, alpha=0.6, label=f"95% of {_short(strong, 26)}'s quality"
        )
    # the current setting
    ax.plot(
        op["cost_per_1k"],
        op["quality"],
        "*",
        color="tab:orange",
        ms=17,
        mec="black",
        mew=0.8,
        zorder=5,
        label=f"current setting ({_fmt(op['value'])})",
    )
    calibration = summary.get("calibration")
    if calibration and calibration.get("value") is not None:
        ax.plot(
            calibration["cost_per_1k"],
            calibration["quality"],
            "D",
            color="tab:purple",
            ms=8,
            mec="black",
            zorder=5,
            label=f"calibrated for quality ≥ {calibration['target_quality']:.3f} ({_fmt(calibration['value'])})",
        )

    assumed = summary["costing"]["output_tokens_assumed"]
    ax.set_xlabel(f"cost, USD per 1,000 prompts  (output {assumed} tokens assumed unless given)")
    ax.set_ylabel("quality (mean score per prompt)")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.06, y=0.06)
    lo, hi = ax.get_xlim()
    for name, m in models.items():
        # names of models in the right half go to the left of their marker, to stay inside the axes
        right_half = m["cost_per_1k"] > (lo + hi) / 2
        ax.annotate(
            _short(name),
            (m["cost_per_1k"], m["quality"]),
            textcoords="offset points",
            xytext=(-7 if right_half else 7, -3),
            ha="right" if right_half else "left",
            fontsize=8.5,
            color=_model_color(name, weak, strong),
        )
    ax.set_title(title or "Routing quality against cost", fontsize=12)
    # legend and figures beside the axes, where no curve can hide them
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9, framealpha=0.95, borderaxespad=0)
    ax.text(
        1.02,
        0.0,
        _metrics_text(summary),
        transform=ax.transAxes,
        va="bottom",
        ha="left",
        fontsize=9,
        family="monospace",
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"},
    )
    fig.subplots_adjust(left=0.07, right=0.64, top=0.93, bottom=0.1)
    fig.savefig(path)
    plt.close(fig)


def _model_color(name: str, weak: str, strong: str) -> str:
    return "black" if name in (weak, strong) else "0.45"


def _knob_label(knob: str) -> str:
    return knob.split(".when.", 1)[-1] if ".when." in knob else knob


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def _metrics_text(summary: dict[str, Any]) -> str:
    m = summary["metrics"]
    axis = {"strong_call_share": "x: strong-call share", "normalized_cost": "x: normalized cost"}.get(
        m["axis"] or "", ""
    )
    apgr = "—" if m["apgr"] is None else f"{m['apgr']:.3f}"
    lines = [
        f"{summary['data']['prompts']} prompts",
        f"APGR      {apgr}  ({axis})",
        f"CPT(50%)  {_pct(m['cpt50'])}",
        f"CPT(80%)  {_pct(m['cpt80'])}",
    ]
    saving = m.get("saving_at_95pct_strong")
    if saving and saving["saving"] is not None:
        lines.append(f"saving at 95% of strong: {_pct(saving['saving'])}")
    op = summary["operating_point"]
    lines.append(f"current setting: quality {op['quality']:.3f},")
    lines.append(f"  saves {_pct(op['saving_vs_strong'])} vs strong")
    return "\n".join(lines)
