"""Usage accounting from response bodies, and the freshness of the generated protocol code."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from extproc.usage import Usage, UsageMeter


def feed(chunks: list[bytes]) -> Usage | None:
    meter = UsageMeter()
    for chunk in chunks:
        meter.feed(chunk)
    return meter.usage


def test_usage_of_a_json_response_split_anywhere() -> None:
    body = orjson.dumps(
        {
            "id": "x",
            "choices": [{"message": {"content": '"usage": nope'}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46},
        }
    )
    for cut in range(1, len(body), 7):
        assert feed([body[:cut], body[cut:]]) == Usage(12, 34)


def test_usage_from_the_final_sse_chunk() -> None:
    events = [
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n',
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    assert feed([stream[i : i + 9] for i in range(0, len(stream), 9)]) == Usage(5, 7)


def test_responses_api_usage_names() -> None:
    event = b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":3,"output_tokens":4}}}\n\n'
    assert feed([event]) == Usage(3, 4)


def test_no_usage_and_garbage_are_none() -> None:
    assert feed([b'data: {"choices":[]}\n\n']) is None
    assert feed([b'{"usage": "lots"}']) is None
    assert feed([b"\x00\xff" * 100]) is None


def test_generated_protocol_code_is_fresh() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, "protos/compile.py", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
