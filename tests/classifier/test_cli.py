import io
import json

from extproc.classifier import DOMAINS
from extproc.classifier.cli import main


def test_classify_reads_jsonl_and_plain_lines(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "email me at jane.roe@example.com"}) + "\nwhat is 2 + 2?\n\n")
    assert main(["classify", str(src)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["email me at jane.roe@example.com", "what is 2 + 2?"]
    for x in lines:
        assert set(x) == {"prompt", "domain", "domain_probs", "complexity", "pii"}
        assert x["domain"] in DOMAINS and set(x["domain_probs"]) == set(DOMAINS)
    [span] = lines[0]["pii"]
    assert span["type"] == "EMAIL_ADDRESS"
    assert lines[0]["prompt"][span["start"] : span["end"]] == "jane.roe@example.com"


def test_classify_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO('{"prompt": "hello"}\n'))
    assert main(["-"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["prompt"] == "hello"
