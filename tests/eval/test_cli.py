"""`extproc eval` from the command line: the JSON summary, the report, the plot, the errors."""

from __future__ import annotations

import json

import pytest

from extproc.evaluation.cli import main
from tests.eval.conftest import SENTINEL, long_short_rows, write_jsonl

SWEEP = ["--sweep", "decisions[long].when.tokens.min", "--values", "1,100,10000"]


def test_summary_json_holds_the_figures_and_no_prompt_text(tmp_path, rule_policy, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", long_short_rows())
    out = tmp_path / "summary.json"
    code = main(
        ["--config", str(rule_policy), "--data", str(data), "--out", str(out), "--target-quality", "95%", *SWEEP]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    text = out.read_text()
    assert SENTINEL not in text and SENTINEL not in stdout
    summary = json.loads(text)
    assert set(summary) == {
        "data",
        "policy",
        "costing",
        "models",
        "reference",
        "operating_point",
        "sweep",
        "metrics",
        "baselines",
        "calibration",
        "classifier",
    }
    assert summary["data"] == {
        "prompts": 10,
        "evaluated_models": ["weak", "strong"],
        "not_evaluated": [],
        "file": "eval.jsonl",
    }
    assert summary["reference"]["weak"] == "weak" and summary["reference"]["strong"] == "strong"
    assert summary["metrics"]["apgr"] == pytest.approx(0.45)
    assert summary["calibration"]["value"] == 1
    assert "APGR 0.4500" in stdout


def test_output_tokens_assumption_prices_lines_without_token_counts(tmp_path, rule_policy):
    rows = [{"prompt": SENTINEL, "quality": {"weak": 1, "strong": 1}, "tokens": {"input": 0}}]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "s.json"
    assert (
        main(["--config", str(rule_policy), "--data", str(data), "--out", str(out), "--output-tokens", "1000", *SWEEP])
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["costing"]["output_tokens_assumed"] == 1000
    assert summary["models"]["strong"]["cost_per_1k"] == pytest.approx(10.0)  # 1000 tokens x $10/M x 1000 prompts


def test_the_top_level_separator_is_accepted(tmp_path, rule_policy):
    data = write_jsonl(tmp_path / "eval.jsonl", long_short_rows())
    assert main(["--", "--config", str(rule_policy), "--data", str(data), *SWEEP]) == 0


def test_plot_is_written(tmp_path, rule_policy):
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "eval.jsonl", long_short_rows())
    png = tmp_path / "plot.png"
    assert main(["--config", str(rule_policy), "--data", str(data), "--plot", str(png), *SWEEP]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "zanzibar"}', "line 1: 'quality' must be an object"),
        ('{"quality": {"weak": 1}}', "line 1: needs 'prompt'"),
        ('{"prompt": "zanzibar", "quality": {"weak": "yes"}}', "quality['weak'] must be a number"),
        ("not json", "line 1: not valid JSON"),
    ],
)
def test_bad_lines_are_named_by_number_without_their_text(tmp_path, rule_policy, capsys, line, message):
    data = tmp_path / "eval.jsonl"
    data.write_text(line + "\n")
    assert main(["--config", str(rule_policy), "--data", str(data), *SWEEP]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert SENTINEL not in err


def test_a_policy_without_a_default_knob_asks_for_one(tmp_path, rule_policy, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", long_short_rows())
    assert main(["--config", str(rule_policy), "--data", str(data)]) == 1
    assert "--sweep PATH" in capsys.readouterr().err


def test_unlabelled_policy_models_are_reported_with_the_data_keys(tmp_path, rule_policy, capsys):
    data = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": SENTINEL, "quality": {"gpt-x": 1}}])
    assert main(["--config", str(rule_policy), "--data", str(data), *SWEEP]) == 1
    err = capsys.readouterr().err
    assert "the data scores: gpt-x" in err and "--model-map" in err


def test_model_map_scores_a_policy_model_with_another_key(tmp_path, rule_policy):
    rows = [{"prompt": SENTINEL, "quality": {"a": 0, "b": 1}, "tokens": {"input": 10, "output": 0}}]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    out = tmp_path / "s.json"
    argv = [
        "--config",
        str(rule_policy),
        "--data",
        str(data),
        "--out",
        str(out),
        "--model-map",
        "weak=a",
        "--model-map",
        "strong=b",
    ]
    assert main([*argv, *SWEEP]) == 0
    assert json.loads(out.read_text())["models"]["strong"]["data_key"] == "b"


def test_extproc_eval_reaches_this_command(tmp_path, rule_policy):
    from extproc.cli import main as extproc_main

    data = write_jsonl(tmp_path / "eval.jsonl", long_short_rows())
    out = tmp_path / "s.json"
    for separator in ([], ["--"]):
        out.unlink(missing_ok=True)
        argv = ["eval", *separator, "--config", str(rule_policy), "--data", str(data), "--out", str(out), *SWEEP]
        assert extproc_main(argv) == 0
        assert json.loads(out.read_text())["metrics"]["apgr"] == pytest.approx(0.45)
