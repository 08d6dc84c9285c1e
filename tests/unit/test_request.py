"""Request bodies in, prompt messages and rewritten bodies out."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import BadRequest
from extproc.request import Api, api_for_path, parse, redact, render


def test_llm_paths_are_recognised_with_or_without_a_query() -> None:
    assert api_for_path("/v1/chat/completions") is Api.CHAT
    assert api_for_path("/v1/completions?x=1") is Api.COMPLETIONS
    assert api_for_path("/v1/responses") is Api.RESPONSES
    assert api_for_path("/v1/models") is None
    assert api_for_path("/v1/chat/completions/extra") is None


def test_chat_messages_with_string_and_part_content_tool_calls_and_roles() -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "data:..."}},
                    {"type": "text", "text": "this"},
                ],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "42"},
            {"role": "user", "content": "thanks"},
        ],
    }
    request = parse(Api.CHAT, orjson.dumps(body))
    assert [(m.role, m.text) for m in request.messages] == [
        ("system", "be brief"),
        ("user", "look at\nthis"),
        ("assistant", 'lookup\n{"q": 1}'),
        ("tool", "42"),
        ("user", "thanks"),
    ]
    assert request.last_user_text == "thanks"
    assert request.stream is False


def test_completions_prompt_string_list_and_token_ids() -> None:
    assert [m.text for m in parse(Api.COMPLETIONS, b'{"model":"a","prompt":"once"}').messages] == ["once"]
    assert [m.text for m in parse(Api.COMPLETIONS, b'{"model":"a","prompt":["x","y"]}').messages] == ["x", "y"]
    assert [m.text for m in parse(Api.COMPLETIONS, b'{"model":"a","prompt":[1,2,3]}').messages] == [""]


def test_responses_input_string_items_and_instructions() -> None:
    body = {
        "model": "auto",
        "instructions": "sys",
        "input": [
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "hello"}, {"type": "input_image", "image_url": "x"}],
            },
            {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"},
            {"type": "function_call_output", "call_id": "c", "output": "done"},
            {"type": "reasoning", "summary": []},
        ],
    }
    request = parse(Api.RESPONSES, orjson.dumps(body))
    assert [(m.role, m.text) for m in request.messages] == [
        ("system", "sys"),
        ("user", "hello"),
        ("assistant", "f\n{}"),
        ("tool", "done"),
    ]
    assert [m.text for m in parse(Api.RESPONSES, b'{"model":"a","input":"hi"}').messages] == ["hi"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "empty"),
        (b"{nope", "not valid JSON"),
        (b'"text"', "must be a JSON object"),
        (b'{"messages": []}', "missing required field 'model'"),
        (b'{"model": ["a"], "messages": []}', "'model' must be a string"),
        (b'{"model": "a", "messages": "hi"}', "'messages' must be an array"),
        (b'{"model": "a", "messages": []}', "at least one message"),
        (b'{"model": "a", "messages": [{"content": "x"}]}', "messages[0].role"),
        (b'{"model": "a", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (b'{"model": "a", "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', ".text"),
        (b'{"model": "a", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}', "'stream'"),
        (b'{"model": "a", "model": "b", "messages": [{"role": "user", "content": "x"}]}', "more than once"),
        (b'{"model": 1, "model": "b", "messages": [{"role": "user", "content": "x"}]}', "more than once"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "t": NaN}', "not valid JSON"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "t": 1e999}', "not valid JSON"),
        (b'{"model": "a", "messages": [{"role": "user", "content": "\xff"}]}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON"),
    ],
)
def test_bad_bodies_get_a_message_that_names_the_problem(raw: bytes, fragment: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(Api.CHAT, raw)
    assert fragment in caught.value.message
    assert orjson.loads(caught.value.body())["error"]["type"] == "invalid_request_error"


def test_error_messages_never_quote_the_prompt() -> None:
    with pytest.raises(BadRequest) as caught:
        parse(Api.CHAT, b'{"model": "a", "messages": [{"role": "user", "content": "my secret 123-45-6789"}], }')
    assert "secret" not in caught.value.message and "6789" not in caught.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"auto","messages":[{"role":"user","content":"x"}]}',
        b'{ "messages":[{"role":"user","content":"model"}] ,\n\t"model" :  "auto" , "extra":{"model":"keep"}}',
        b'{"mod\\u0065l":"auto","messages":[{"role":"user","content":"\\"model\\": \\"x\\""}]}',
        b'{"a":"\\\\","model":"auto","messages":[{"role":"user","content":"\xe2\x98\x95"}],"n":1.50}',
    ],
)
def test_rewrite_changes_only_the_model_value(raw: bytes) -> None:
    request = parse(Api.CHAT, raw)
    out = request.with_model("llama-3.1-70b-instruct")
    start, end = request.model_span
    assert out == raw[:start] + b'"llama-3.1-70b-instruct"' + raw[end:]
    decoded, original = orjson.loads(out), orjson.loads(raw)
    assert decoded.pop("model") == "llama-3.1-70b-instruct"
    original.pop("model")
    assert decoded == original


def test_rewrite_to_the_same_model_returns_the_original_bytes() -> None:
    raw = b'{"model":"same","messages":[{"role":"user","content":"x"}]}'
    request = parse(Api.CHAT, raw)
    assert request.with_model("same") is raw


def test_redaction_replaces_spans_across_content_parts() -> None:
    raw = orjson.dumps(
        {
            "model": "auto",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "mail a@b.co"}, {"type": "text", "text": "or c@d.org ok"}],
                }
            ],
        }
    )
    request = parse(Api.CHAT, raw)
    text = request.messages[0].text
    spans = [
        (text.index("a@b.co"), text.index("a@b.co") + 6, "<EMAIL_ADDRESS>"),
        (text.index("c@d.org"), text.index("c@d.org") + 7, "<EMAIL_ADDRESS>"),
    ]
    out = orjson.loads(redact(request, {0: spans}, "private-8b"))
    assert out["model"] == "private-8b"
    assert [p["text"] for p in out["messages"][0]["content"]] == ["mail <EMAIL_ADDRESS>", "or <EMAIL_ADDRESS> ok"]


def test_render_keeps_roles_and_order() -> None:
    request = parse(
        Api.CHAT, b'{"model":"a","messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}'
    )
    assert render(request.messages) == "<system>\ns\n<user>\nu\n"


def test_an_error_body_always_has_param_null_when_unset() -> None:
    assert orjson.loads(BadRequest("nope").body()) == {
        "error": {"message": "nope", "type": "invalid_request_error", "param": None, "code": "invalid_request"}
    }
    assert orjson.loads(BadRequest("nope", param="model").body())["error"]["param"] == "model"


def test_every_text_a_model_reads_is_extracted_not_only_the_turns() -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"enum": ["e"]}}}]
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": "c", "name": "n"},
            {"role": "assistant", "content": None, "refusal": "r", "reasoning_content": "why"},
            {"role": "assistant", "tool_calls": [{"id": "1", "type": "custom", "custom": {"name": "x", "input": "i"}}]},
        ],
        "tools": tools,
    }
    chat = parse(Api.CHAT, orjson.dumps(body))
    assert [(m.role, m.text) for m in chat.messages] == [
        ("user", "c\nn"),
        ("assistant", "r\nwhy"),
        ("assistant", "x\ni"),
        ("tools", "function\nf\nd\ne"),  # the whole definition, as the model reads it
    ]
    completion = parse(Api.COMPLETIONS, b'{"model":"a","prompt":"p","suffix":"s"}')
    assert [m.text for m in completion.messages] == ["p", "s"] and completion.unreadable == ()
    items = [{"type": "mcp_call", "id": "m1", "name": "crm", "arguments": "{}"}, {"type": "reasoning", "summary": []}]
    responses = parse(Api.RESPONSES, orjson.dumps({"model": "a", "input": items}))
    assert [(m.role, m.text) for m in responses.messages] == [("assistant", "crm\n{}")]  # ids are not text


def test_token_ids_and_embeddings_are_named_as_unreadable() -> None:
    assert parse(Api.COMPLETIONS, b'{"model":"a","prompt":[[1,2]]}').unreadable == ("prompt",)
    assert parse(Api.COMPLETIONS, b'{"model":"a","prompt":"","prompt_embeds":"AAAA"}').unreadable == ("prompt_embeds",)
    assert parse(Api.CHAT, b'{"model":"a","messages":[{"role":"user","content":"x"}]}').unreadable == ()
